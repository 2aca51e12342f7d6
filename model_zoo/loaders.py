"""`load(name_or_path)`: a zoo entry or a local checkpoint directory, loaded by its format's loader."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import get_entry
from .formats import FORMATS, detect_format
from .hub import resolve
from .schema import ZooEntry


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
    model, processor, tokenizer = FORMATS.get(fmt).load(path, model_base, **kw)
    return LoadedModel(model, processor, tokenizer, fmt, path, entry)
