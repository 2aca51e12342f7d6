"""The checkpoint registry: one JSON entry and one Markdown card per checkpoint in `model_zoo/entries/`.

An entry names the checkpoint's format and location (a hub id, or a directory shipped in this package under
`model_zoo/shipped/`), the student base and the reference LLM that matches it, the training recipe, the tokens it
used, its eval results with their protocol, the sha256 of every shipped file, its license and its availability:

- `shipped`: in the package; loads with no network, after its hashes are checked.
- `hub`: resolved through the local HF cache first; when it is not there and the hub cannot be reached, the error
  says what to download.
- `announced`: named by its authors, not public yet; loading it says so.

`load(name_or_path)` also takes a local directory and detects its format. Upstream LLaVA formats go through the
real `llava` loader (full, LoRA with `model_base`, projector-only), VideoLLaMA2 through `videollama2.model_init`,
HF formats through transformers. This module imports nothing heavy at import time, so it also works in the
upstream environments (transformers 4.37 / 4.40).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import file_sha256

ZOO_DIR = Path(__file__).parent
ENTRIES_DIR = ZOO_DIR / "entries"
SHIPPED_DIR = ZOO_DIR / "shipped"
FORMATS = ("hf-llava", "hf-qwen2-vl", "llava", "llava-lora", "videollama2")
AVAILABILITY = ("shipped", "hub", "announced")


class ZooError(UserError, ValueError):
    """A bad entry, an unknown name, a file that fails its hash, or a checkpoint that cannot be had here."""


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
    location: str
    availability: str
    student_base: str
    reference_llm: str
    reference_template: str  # `regate precompute --template` for this student's training data
    recipe: dict[str, Any]
    tokens_used: int | None  # answer tokens trained on, where known
    eval: tuple[EvalResult, ...]
    license: str
    files: dict[str, str] = field(default_factory=dict)  # shipped: relative path -> sha256
    model_base: str | None = None  # llava-lora and projector-only checkpoints: what they apply to
    reference_path: str | None = None  # shipped entries: the reference LLM shipped with it, relative to its directory
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
        raise ZooError(f"{source}: 'format' must be one of {list(FORMATS)}, got {raw['format']!r}")
    if raw["availability"] not in AVAILABILITY:
        raise ZooError(f"{source}: 'availability' must be one of {list(AVAILABILITY)}, got {raw['availability']!r}")
    files = raw.get("files", {})
    if raw["availability"] == "shipped":
        if not files or not all(isinstance(v, str) and len(v) == 64 for v in files.values()):
            raise ZooError(f"{source}: a shipped entry lists every file with its sha256 in 'files'")
    elif "/" not in raw["location"]:
        raise ZooError(f"{source}: 'location' of a {raw['availability']} entry is a hub id (owner/name)")
    reference_path = raw.get("reference_path")
    if reference_path and not any(f.startswith(reference_path.rstrip("/") + "/") for f in files):
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ZooError(f"{path}: not valid JSON ({err})") from None


@cache
def entries() -> dict[str, ZooEntry]:
    """Every registered entry, by name."""
    return {path.stem: parse_entry(_read_json(path), path) for path in sorted(ENTRIES_DIR.glob("*.json"))}


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
    """Check every shipped file of `entry` (under `root`, default its shipped directory) against its sha256."""
    root = Path(root) if root is not None else entry.path
    for relative, expected in entry.files.items():
        path = root / relative
        if not path.is_file():
            raise ZooError(f"{entry.name}: shipped file {path} is missing")
        if file_sha256(path) != expected:
            raise ZooError(f"{entry.name}: {path} does not match its recorded sha256 (modified or corrupted)")
    return root


def reference_for(entry: ZooEntry) -> str:
    """What `regate precompute --student` loads as the reference: the shipped one (hash-checked), else the hub id."""
    if entry.reference_path:
        return str(verify_files(entry) / entry.reference_path)
    return entry.reference_llm


# A hub model id: owner/name, each of letters, digits, '-', '_' and '.' (what the hub accepts, less the legacy
# owner-less names, which no multimodal checkpoint uses).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def _local_snapshot(repo_id: str) -> Path | None:
    """The local HF cache's snapshot of `repo_id`, or None when it holds none (the hub is never asked)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: not in the local cache
        return None


def _not_cached(what: str, repo_id: str, reason: str) -> ZooError:
    cache_dir = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    return ZooError(
        f"{what}: {repo_id} is not in the local HF cache ({cache_dir}) and {reason}. "
        f"Download it where the hub is reachable: `huggingface-cli download {repo_id}`, then copy "
        "the cache, or pass the downloaded directory instead of the name"
    )


def resolve(entry: ZooEntry) -> Path:
    """A local directory holding `entry`'s files (verified, for shipped entries)."""
    if entry.availability == "announced":
        raise ZooError(
            f"{entry.name} is announced by its authors ({entry.location}) but not public yet; "
            f"see {entry.card} for what is known"
        )
    if entry.availability == "shipped":
        return verify_files(entry)
    cached = _local_snapshot(entry.location)
    if cached is not None:
        return cached
    if _hub_offline():
        raise _not_cached(entry.name, entry.location, "the hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(entry.location))
    except Exception as err:  # noqa: BLE001
        raise _not_cached(entry.name, entry.location, f"the hub cannot be reached ({type(err).__name__})") from None


def locate(model: str, what: str = "--model") -> tuple[str, ZooEntry | None]:
    """What a `--model` names, decided before anything loads: a local directory; a model_zoo entry (resolved,
    hash-checked when shipped); or a hub id (owner/name), which with the hub switched off must be in the local
    HF cache. Anything else is an error naming the closest zoo entries. Returns the path or hub id to load, and
    the entry."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser()), None
    if model in entries():
        return str(resolve(entries()[model])), entries()[model]
    if HUB_ID.fullmatch(model) and ".." not in model:
        if _hub_offline() and _local_snapshot(model) is None:
            raise _not_cached(
                f"{what} {model}",
                model,
                "the hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); it is no local directory either",
            )
        return model, None
    close = closest_entries(model)
    hint = f"; did you mean the model_zoo entry {' or '.join(close)}?" if close else ""
    raise ZooError(
        f"{what} {model!r} is not a checkpoint directory, a model_zoo entry (`regate zoo list`), or a hub id "
        f"(owner/name){hint}"
    )


def _read_config(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    if not config.is_file():
        raise ZooError(f"{path}: no config.json, so it is not a checkpoint directory this loader knows")
    return _read_json(config)


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a local checkpoint directory, from its files and config.json."""
    path = Path(path)
    config = _read_config(path)
    architectures = config.get("architectures") or []
    model_type = str(config.get("model_type", ""))
    if model_type.startswith("videollama2"):
        return "videollama2"
    if any(a.startswith(("Qwen2VL", "Qwen2_5_VL")) for a in architectures):
        return "hf-qwen2-vl"
    if any(a.startswith(("LlavaForConditional", "LlavaNext", "LlavaOnevision")) for a in architectures):
        return "hf-llava"
    if "mm_vision_tower" in config or model_type.startswith("llava"):
        return "llava-lora" if (path / "adapter_config.json").is_file() else "llava"
    raise ZooError(
        f"{path}: cannot tell its format from config.json (model_type {model_type!r}, "
        f"architectures {architectures}); known formats: {list(FORMATS)}"
    )


@dataclass
class LoadedModel:
    model: Any
    processor: Any  # HF processor; upstream: the image processor (or VideoLLaMA2's processor dict)
    tokenizer: Any
    format: str
    path: Path
    entry: ZooEntry | None = None

    def summary(self) -> str:
        parameters = sum(p.numel() for p in self.model.parameters())
        name = self.entry.name if self.entry else str(self.path)
        return f"{name}: {type(self.model).__name__}, {parameters:,} parameters, format {self.format}, from {self.path}"


def _load_hf(path: Path, **kw: Any) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **kw)
    return model, processor, getattr(processor, "tokenizer", None)


def _load_llava(path: Path, model_base: str | None, **kw: Any) -> tuple[Any, Any, Any]:
    try:
        from llava.model.builder import load_pretrained_model
    except ImportError:
        raise ZooError(
            f"{path} is an upstream LLaVA checkpoint: load it where the `llava` package is installed "
            "(pip install llava-torch==1.2.2.post1; scripts/setup_llava_env.sh)"
        ) from None
    # Upstream picks its loading branch from the name: it must contain "llava", and "lora" for LoRA weights.
    name = path.name if "llava" in path.name.lower() else f"llava-{path.name}"
    if (path / "adapter_config.json").is_file() and "lora" not in name.lower():
        name += "-lora"
    kw.setdefault("device_map", "cpu")
    kw.setdefault("device", "cpu")
    tokenizer, model, image_processor, _ = load_pretrained_model(str(path), model_base, name, **kw)
    return model, image_processor, tokenizer


def _load_videollama2(path: Path, **kw: Any) -> tuple[Any, Any, Any]:
    try:
        from videollama2 import model_init
    except ImportError:
        raise ZooError(
            f"{path} is a VideoLLaMA2 checkpoint: load it from a DAMO-NLP-SG/VideoLLaMA2 checkout "
            "(its `videollama2` package must be importable)"
        ) from None
    model, processor, tokenizer = model_init(str(path), **kw)
    return model, processor, tokenizer


def load(name_or_path: str | os.PathLike[str], model_base: str | None = None, **kw: Any) -> LoadedModel:
    """A zoo entry by name, or a local checkpoint directory (format detected): model, processor, tokenizer, entry.

    `model_base` is for LoRA and projector-only LLaVA checkpoints (an entry's own is used by default); other
    keywords go to the underlying loader (e.g. `dtype` for transformers)."""
    entry = None
    if Path(name_or_path).is_dir():
        path = Path(name_or_path)
        fmt = detect_format(path)
    else:
        entry = get_entry(str(name_or_path))
        path, fmt = resolve(entry), entry.format
        model_base = model_base or entry.model_base
    if fmt in ("hf-llava", "hf-qwen2-vl"):
        model, processor, tokenizer = _load_hf(path, **kw)
    elif fmt in ("llava", "llava-lora"):
        if fmt == "llava-lora" and model_base is None:
            raise ZooError(f"{path} holds LoRA weights: pass model_base (the LLM they were trained on)")
        model, processor, tokenizer = _load_llava(path, model_base, **kw)
    else:
        model, processor, tokenizer = _load_videollama2(path, **kw)
    return LoadedModel(model, processor, tokenizer, fmt, path, entry)


def format_table() -> str:
    rows = [("name", "format", "availability", "reference LLM", "tokens", "results")]
    for e in entries().values():
        rows.append(
            (
                e.name,
                e.format,
                e.availability,
                e.reference_llm,
                f"{e.tokens_used:,}" if e.tokens_used else "-",
                e.headline(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


__all__ = [
    "FORMATS",
    "EvalResult",
    "LoadedModel",
    "ZooEntry",
    "ZooError",
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
