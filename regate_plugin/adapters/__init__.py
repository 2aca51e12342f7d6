"""Adapters: find a codebase's post-merge, pre-decoder point and hand it to the core (glue only)."""

from .registry import (
    UnsupportedModelError,
    disable_token_elision,
    enable_token_elision,
    get_token_elision,
    register_adapter,
    supported_models,
)

__all__ = [
    "UnsupportedModelError",
    "disable_token_elision",
    "enable_token_elision",
    "get_token_elision",
    "register_adapter",
    "supported_models",
]
