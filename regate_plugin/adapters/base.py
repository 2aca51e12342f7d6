"""`Adapter`: what an adapter module registers, and the list the registry searches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..strategies import TokenElision


@dataclass
class Adapter:
    name: str
    class_names: tuple[str, ...]
    install: Callable[[Any, TokenElision], Callable[[], None]]
    """Installs elision on a model of one of `class_names`; returns the function that removes it."""


ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> None:
    ADAPTERS.append(adapter)
