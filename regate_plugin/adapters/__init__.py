"""Adapters: find a codebase's post-merge, pre-decoder point and hand it to the core (glue only)."""

from .base import Adapter, register_adapter
from .registry import (
    UnsupportedModelError,
    disable_token_elision,
    enable_token_elision,
    get_token_elision,
    supported_models,
)

__all__ = [
    "Adapter",
    "UnsupportedModelError",
    "disable_token_elision",
    "enable_token_elision",
    "get_token_elision",
    "register_adapter",
    "supported_models",
]
