"""The checkpoint registry: one JSON entry and one Markdown card per checkpoint in `model_zoo/entries/`.

An entry names the checkpoint's format and location (a hub id, or a directory shipped in this package under
`model_zoo/shipped/`), the student base and the reference LLM that matches it, the training recipe, the tokens it
used, its eval results with their protocol, the sha256 of every shipped file, its license and its availability:

- `shipped`: in the package; loads with no network, after its hashes are checked.
- `hub`: resolved through the local HF cache first; when it is not there and the hub cannot be reached, the error
  says what to download.
- `announced`: named by its authors, not public yet; loading it says so.

`load(name_or_path)` also takes a local directory and detects its format (`formats`). Modules: `schema` (an entry
and its check), `catalog` (the entries by name, hash checks), `hub` (resolving a name), `formats` (detecting and
loading each format), `loaders` (`load`), `table` (`regate zoo list`). Nothing heavy is imported at import time.
"""

from .catalog import closest_entries, entries, get_entry, reference_for, verify_files
from .errors import ZooError
from .formats import FORMATS, ZooFormat, detect_format
from .hub import locate, resolve
from .loaders import LoadedModel, load
from .schema import ENTRIES_DIR, SHIPPED_DIR, EvalResult, ZooEntry, parse_entry
from .table import format_table

__all__ = [
    "ENTRIES_DIR",
    "FORMATS",
    "SHIPPED_DIR",
    "EvalResult",
    "LoadedModel",
    "ZooEntry",
    "ZooError",
    "ZooFormat",
    "closest_entries",
    "detect_format",
    "entries",
    "format_table",
    "get_entry",
    "load",
    "locate",
    "parse_entry",
    "reference_for",
    "resolve",
    "verify_files",
]
