"""Where the answers in an answer file came from: the model (its path or hub id, and a fingerprint of its weights)
and the settings that shape an answer (docs/EVAL.md#answer-files).

Every record an eval run writes carries this description under `metadata.run` (LLaVA's answer records have a
`metadata` field that no official scorer reads), so a rerun into the same file adds answers only when it runs the
same weights under the same settings; a file of another model, or with records that do not say, is refused.

The weights fingerprint is cheap by design (it runs before the model loads): sha256 over `config.json` and
`adapter_config.json`, and, for each weights file (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, `*.gguf`, in name
order), its name, its size and `SAMPLED_BLOCKS` blocks of `BLOCK_BYTES` spread evenly over it, first and last
included (a file no larger than those blocks is hashed whole). It reads at most 1 MiB per file. Headers alone
(the safetensors header, a weights index) name shapes and dtypes, which two checkpoints of one training run share,
so sampled tensor bytes are what tells them apart: training changes every tensor, so two checkpoints differ in
every block. A hub id is identified by the revision its local HF cache snapshot holds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import BenchmarkError, PredictionFile

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "adapter_config.json")
SAMPLED_BLOCKS = 16
BLOCK_BYTES = 1 << 16
RUN_FIELD = "run"  # the key of the description in each record's `metadata`


class AnswerFileMismatchError(BenchmarkError):
    """An answer file holds answers of another model or settings than the run that would add to it."""


def _sampled_digest(path: Path, digest: Any) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as handle:
        if size <= SAMPLED_BLOCKS * BLOCK_BYTES:
            digest.update(handle.read())
            return
        for i in range(SAMPLED_BLOCKS):
            handle.seek((size - BLOCK_BYTES) * i // (SAMPLED_BLOCKS - 1))
            digest.update(handle.read(BLOCK_BYTES))


def weights_fingerprint(directory: str | Path) -> str:
    """ "sha256:<hex>" of a checkpoint directory's config and sampled weight bytes (module docstring)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in CONFIG_FILES:
        if (directory / name).is_file():
            digest.update(f"{name}\0".encode() + (directory / name).read_bytes())
    for path in sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        _sampled_digest(path, digest)
    return f"sha256:{digest.hexdigest()}"


def model_fingerprint(model: str) -> str | None:
    """A local checkpoint directory's `weights_fingerprint`; a hub id's "<id>@<revision>" from the local HF
    cache, or None while the cache does not hold it yet (it does once the model has loaded)."""
    if Path(model).is_dir():
        return weights_fingerprint(model)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(model, "config.json")
    return f"{model}@{Path(config).parent.name}" if isinstance(config, str) else None


def run_description(model: str, weights: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What each record of a run carries: the model as given, its weights fingerprint, and the settings."""
    return {"model": model, "weights": weights, "settings": settings}


def record_run(record: dict[str, Any]) -> dict[str, Any] | None:
    """The run description a record carries, or None."""
    metadata = record.get("metadata")
    return metadata.get(RUN_FIELD) if isinstance(metadata, dict) else None


def default_out(model: str, benchmark: str) -> Path:
    """eval_out/<model>/<benchmark>: <model> is a local checkpoint's directory name, or a hub id (or model_zoo
    entry) with "/" written "--". Two checkpoints in directories of the same name share it; the second is refused
    (their weights differ) and is given its own --out."""
    path = Path(model).expanduser()
    name = path.resolve().name if path.is_dir() else model.replace("/", "--")
    return Path("eval_out") / re.sub(r"[^\w.+-]", "_", name) / benchmark


def _differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    found = []
    if theirs.get("weights") != ours["weights"]:
        found.append(
            f"model {theirs.get('model')!r} (weights {theirs.get('weights')}), this run's is {ours['model']!r} "
            f"(weights {ours['weights']})"
        )
    settings = theirs.get("settings") if isinstance(theirs.get("settings"), dict) else {}
    for name in sorted(set(settings) | set(ours["settings"])):
        if settings.get(name) != ours["settings"].get(name):
            found.append(f"{name} {settings.get(name)!r}, this run's is {ours['settings'].get(name)!r}")
    return found


def refuse_another_run(answers: PredictionFile, run: dict[str, Any]) -> None:
    """Raise unless every record of `answers` carries `run`'s weights and settings (the model path may differ:
    the same weights moved are the same model)."""
    for number, record in enumerate(answers.records, start=1):
        theirs = record_run(record)
        if theirs is None:
            problem = "does not record the model and settings it came from (written by another tool or version)"
        elif differences := _differences(theirs, run):
            problem = "holds answers of " + "; ".join(differences)
        else:
            continue
        raise AnswerFileMismatchError(
            f"{answers.path} (record {number}) {problem}: a rerun adds answers only to a file of the same model and "
            "settings; pass --overwrite to answer every question again into it, or choose another --out"
        )


def resumable(
    path: Path, read: Callable[[Path], PredictionFile], run: dict[str, Any] | None, overwrite: bool
) -> PredictionFile:
    """The answers a run resumes from: `path`'s records, once they are checked to be `run`'s (when given). With
    `overwrite`, the file is removed first and every question is answered again."""
    if overwrite:
        path.unlink(missing_ok=True)
    answers = read(path)
    if run is not None:
        refuse_another_run(answers, run)
    return answers
