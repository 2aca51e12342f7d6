"""`Adapter`: what an adapter module registers, and the registry `enable_token_elision` searches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..registry import Registry
from ..strategies import TokenElision


@dataclass
class Adapter:
    name: str
    class_names: tuple[str, ...]
    install: Callable[[Any, TokenElision], Callable[[], None]]
    """Installs elision on a model of one of `class_names`; returns the function that removes it."""


def _load_builtin_adapters() -> None:
    """Import the adapter modules that ship with the plugin (they import transformers, so only on demand)."""
    from . import hf, upstream, videochat2  # noqa: F401


ADAPTERS: Registry[Adapter] = Registry("adapter", group="regate_plugin.adapters", builtins=_load_builtin_adapters)
"""Adapters by name; third-party packages add theirs under the `regate_plugin.adapters` entry-point group."""


def register_adapter(adapter: Adapter, *, overwrite: bool = False) -> Adapter:
    """Add `adapter` under its name; a name already registered is refused unless `overwrite`."""
    return ADAPTERS.register(adapter.name, adapter, overwrite=overwrite)
