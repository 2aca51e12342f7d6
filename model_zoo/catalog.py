"""The registered entries (`model_zoo/entries/*.json`), looked up by name, and the hash check of shipped files."""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

from ..core.files import file_sha256
from .errors import ZooError
from .formats import read_json
from .schema import ENTRIES_DIR, SHIPPED_DIR, ZooEntry, parse_entry


@cache
def entries() -> dict[str, ZooEntry]:
    """Every registered entry, by name."""
    return {path.stem: parse_entry(read_json(path), path) for path in sorted(ENTRIES_DIR.glob("*.json"))}


def closest_entries(name: str) -> list[str]:
    """The entry names closest to a misspelled one (difflib), best first."""
    return difflib.get_close_matches(name, list(entries()), n=3, cutoff=0.6)


def get_entry(name: str) -> ZooEntry:
    if name not in entries():
        close = closest_entries(name)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ZooError(f"no model_zoo entry {name!r}; {hint}known: {sorted(entries())} (`regate zoo list`)")
    return entries()[name]


def verify_files(entry: ZooEntry, root: Path | None = None) -> Path:
    """Check every shipped file of `entry` (its paths under `root`, default model_zoo/shipped) against its sha256;
    returns the entry's directory under `root`."""
    root = Path(root) if root is not None else SHIPPED_DIR
    for relative, expected in entry.files.items():
        path = root / relative
        if not path.is_file():
            raise ZooError(f"{entry.name}: shipped file {path} is missing")
        if file_sha256(path) != expected:
            raise ZooError(f"{entry.name}: {path} does not match its recorded sha256 (modified or corrupted)")
    return root / entry.location


def reference_for(entry: ZooEntry) -> str:
    """What `regate precompute --student` loads as the reference: the shipped one (hash-checked), else the hub id."""
    if entry.reference_path:
        verify_files(entry)
        return str(SHIPPED_DIR / entry.reference_path)
    return entry.reference_llm
