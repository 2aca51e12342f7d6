"""A model_zoo entry (`ZooEntry`) and the schema check of its JSON file (`parse_entry`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ZooError
from .formats import FORMATS

ZOO_DIR = Path(__file__).parent
ENTRIES_DIR = ZOO_DIR / "entries"
SHIPPED_DIR = ZOO_DIR / "shipped"
AVAILABILITY = ("shipped", "hub", "announced")


@dataclass(frozen=True)
class EvalResult:
    benchmark: str
    protocol: str  # how it was scored (e.g. "official" for MVBench, "llava-1.5" for the image benchmarks)
    metric: str
    value: float
    source: str  # where the number comes from: our run (with its command) or the publication
    data: str = ""  # shipped entries: the bundled test set it reproduces on, relative to model_zoo/shipped


@dataclass(frozen=True)
class ZooEntry:
    name: str
    format: str
    location: str  # shipped: its directory under model_zoo/shipped; else a hub id
    availability: str
    student_base: str
    reference_llm: str
    reference_template: str  # `regate precompute --template` for this student's training data
    recipe: dict[str, Any]
    tokens_used: int | None  # answer tokens trained on, where known
    eval: tuple[EvalResult, ...]
    license: str
    files: dict[str, str] = field(default_factory=dict)  # shipped: path relative to model_zoo/shipped -> sha256
    model_base: str | None = None  # llava-lora and projector-only checkpoints: what they apply to
    reference_path: str | None = None  # shipped: the reference LLM's directory under model_zoo/shipped
    card: Path = Path()

    @property
    def path(self) -> Path:
        """A shipped entry's directory."""
        return SHIPPED_DIR / self.location

    def headline(self) -> str:
        return ", ".join(f"{e.benchmark} {e.metric} {round(e.value, 1):g}" for e in self.eval[:2]) or "-"


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "format": str,
    "location": str,
    "availability": str,
    "student_base": str,
    "reference_llm": str,
    "reference_template": str,
    "recipe": dict,
    "tokens_used": (int, type(None)),
    "eval": list,
    "license": str,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "files": dict,
    "model_base": (str, type(None)),
    "reference_path": (str, type(None)),
}
_EVAL_FIELDS = {"benchmark": str, "protocol": str, "metric": str, "value": (int, float), "source": str, "data": str}


def _holds_files(directory: str, files: dict[str, str]) -> bool:
    return any(f.startswith(directory.rstrip("/") + "/") for f in files)


def parse_entry(raw: Any, source: Path) -> ZooEntry:
    """Check one entry against the schema; every error names the file and the field."""
    if not isinstance(raw, dict):
        raise ZooError(f"{source}: an entry must be a JSON object")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ZooError(f"{source}: unknown field(s) {unknown}")
    for name, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if name not in raw:
            if name in _REQUIRED:
                raise ZooError(f"{source}: missing field {name!r}")
            continue
        if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
            raise ZooError(f"{source}: field {name!r} has the wrong type ({type(raw[name]).__name__})")
    if raw["name"] != source.stem:
        raise ZooError(f"{source}: 'name' is {raw['name']!r} but the file is named {source.name}")
    if raw["format"] not in FORMATS:
        raise ZooError(f"{source}: 'format' must be one of {FORMATS.names()}, got {raw['format']!r}")
    if raw["availability"] not in AVAILABILITY:
        raise ZooError(f"{source}: 'availability' must be one of {list(AVAILABILITY)}, got {raw['availability']!r}")
    files = raw.get("files", {})
    if raw["availability"] == "shipped":
        if not _holds_files(raw["location"], files) or not all(
            isinstance(v, str) and len(v) == 64 for v in files.values()
        ):
            raise ZooError(f"{source}: a shipped entry lists every file with its sha256 in 'files'")
    elif "/" not in raw["location"]:
        raise ZooError(f"{source}: 'location' of a {raw['availability']} entry is a hub id (owner/name)")
    reference_path = raw.get("reference_path")
    if reference_path and not _holds_files(reference_path, files):
        raise ZooError(f"{source}: 'reference_path' {reference_path!r} must be a shipped directory listed in 'files'")
    if raw["format"] == "llava-lora" and not raw.get("model_base"):
        raise ZooError(f"{source}: a llava-lora entry needs 'model_base'")
    results = []
    for n, item in enumerate(raw["eval"]):
        if not isinstance(item, dict) or set(item) - set(_EVAL_FIELDS) or set(_EVAL_FIELDS) - {"data"} - set(item):
            raise ZooError(f"{source}: eval[{n}] needs exactly {sorted(_EVAL_FIELDS)} ('data' optional)")
        for name, kind in _EVAL_FIELDS.items():
            if name in item and not isinstance(item[name], kind):
                raise ZooError(f"{source}: eval[{n}].{name} has the wrong type")
        results.append(EvalResult(**item))
    card = source.with_suffix(".md")
    if not card.is_file():
        raise ZooError(f"{source}: its model card {card.name} is missing")
    return ZooEntry(**{**raw, "eval": tuple(results), "files": files, "card": card})
