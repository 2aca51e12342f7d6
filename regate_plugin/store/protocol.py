"""`ReferenceStore`: what a strategy reads of reference losses, whether they live on disk or in memory."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..core.keys import SampleKey
from .index import ReferenceLossCache
from .manifest import CacheManifest


@runtime_checkable
class ReferenceStore(Protocol):
    """Per-answer-token reference losses by sample key, over one token space (every sample's losses at a start)."""

    directory: Path | None  # where the losses live; None for a store in memory
    manifest: CacheManifest  # what the losses mean and how the samples were made
    tokens: int  # size of the token space

    @property
    def layout_digest(self) -> str:
        """Identifies the token space: state aligned to it (the EMA) is only valid for this digest."""
        ...

    def locate(self, keys: Sequence[SampleKey]) -> np.ndarray:
        """Int64 [B] rows of the keys, -1 where the store has no such sample."""
        ...

    def spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start in token space, number of losses) of located rows; (-1, 0) where a row is -1."""
        ...

    def losses_block(self, rows: np.ndarray, width: int) -> np.ndarray:
        """float32 [B, width]: each located row's first `width` losses, NaN past its length and where it is -1."""
        ...

    def expected_visual_rows(self, rows: np.ndarray, placeholders: np.ndarray) -> np.ndarray:
        """Int64 [B]: the visual rows each located sample was scored with; -1 where unknown or not located."""
        ...

    def check_tokenizer(self, fingerprint: str) -> None:
        """Raise `TokenizerMismatchError` unless the losses were computed with this tokenizer."""
        ...

    def __getitem__(self, key: SampleKey) -> torch.Tensor: ...

    def get(self, key: SampleKey) -> torch.Tensor | None: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def keys(self) -> Iterator[SampleKey]: ...


def open_store(reference: ReferenceStore | str | os.PathLike[str]) -> ReferenceStore:
    """`reference` itself when it is a store (in memory, or a cache already open), else the cache at that path."""
    return reference if isinstance(reference, ReferenceStore) else ReferenceLossCache(reference)
