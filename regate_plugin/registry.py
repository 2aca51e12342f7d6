"""`Registry`: the one kind of name -> entry table behind strategies, adapters, benchmarks, eval runners and zoo
formats. It refuses a duplicate name unless asked to replace it, lists what it holds, and loads third-party entries
that installed packages declare under its entry-point group."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from .core.errors import UserError

T = TypeVar("T")


class UnknownEntryError(UserError, KeyError):
    """A name that no entry of a registry has; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])


class Registry(Generic[T]):
    """Entries of one kind by name. `group` is the entry-point group third-party packages register under (each entry
    point's object is registered under the entry point's name when the registry is first read); `builtins` imports
    the plugin's own entries on first read, for modules that cannot be imported eagerly."""

    def __init__(self, kind: str, group: str | None = None, builtins: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, entry: T, *, overwrite: bool = False) -> T:
        """Add `entry` as `name`; a name already taken is refused unless `overwrite`. Returns `entry`."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} names are letters, digits, '-' and '_', got {name!r}")
        if name in self._entries and not overwrite and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} '{name}' is already registered; pass overwrite=True to replace it")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        """`@registry.decorator("name")` registers what it decorates."""
        return lambda entry: self.register(name, entry, overwrite=overwrite)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownEntryError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        yield from sorted(self._entries.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._builtins is not None:
            self._builtins()
        if self.group is not None:
            for point in entry_points(group=self.group):
                if point.name not in self._entries:
                    self.register(point.name, point.load())
