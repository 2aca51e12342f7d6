"""`InMemoryReferenceStore`: reference losses held in memory, behind the same interface as an on-disk cache, for
research scripts and tests that build the `regate` strategy without writing a cache."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..core.keys import KEY_BYTES, SampleKey, format_key
from .errors import CacheError
from .index import IndexedStore
from .manifest import CacheManifest, Provenance


class InMemoryReferenceStore(IndexedStore):
    """Per-answer-token reference losses by sample key, in one float32 array (token space in insertion order)."""

    directory = None

    def __init__(
        self,
        losses: Mapping[SampleKey, torch.Tensor | np.ndarray],
        manifest: CacheManifest,
        visual_rows: Mapping[SampleKey, int] | None = None,
    ) -> None:
        if (visual_rows is not None) != (manifest.visual_layout is not None):
            raise CacheError("pass visual_rows (one count per sample) exactly when the manifest has a visual_layout")
        keys = list(losses)
        if any(len(key) != KEY_BYTES for key in keys):
            raise CacheError(f"sample keys are {KEY_BYTES} bytes")
        values = [torch.as_tensor(losses[key], dtype=torch.float32).reshape(-1).numpy() for key in keys]
        if not all(np.isfinite(v).all() for v in values):
            bad = next(key for key, v in zip(keys, values) if not np.isfinite(v).all())
            raise CacheError(f"sample {format_key(bad)} has non-finite reference losses")
        lengths = np.array([v.size for v in values], np.int64)
        flat = np.concatenate(values) if values else np.zeros(0, np.float32)
        self.manifest = manifest
        self.manifest.samples, self.manifest.tokens = len(keys), int(flat.size)
        self.manifest.empty_samples = int((lengths == 0).sum())
        self._index(
            np.frombuffer(b"".join(keys), np.uint8).reshape(-1, KEY_BYTES),
            np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if keys else np.zeros(0, np.int64),
            lengths,
            np.zeros(len(keys), np.int64),
            None if visual_rows is None else np.array([visual_rows[key] for key in keys], np.int32),
            [int(flat.size)],
            flat,
            [0],
        )

    @classmethod
    def from_losses(
        cls,
        losses: Mapping[SampleKey, torch.Tensor | np.ndarray],
        *,
        tokenizer_fingerprint: str,
        reference: str = "in memory",
        reference_mode: str = "gap",
        visual_tokens: int | None = None,
        visual_rows: Mapping[SampleKey, int] | None = None,
        provenance: Provenance | None = None,
    ) -> InMemoryReferenceStore:
        """A store of `losses` ({sample key: float losses, one per answer target}) for the student tokenizer with
        `tokenizer_fingerprint`; `visual_tokens` (rows per placeholder) or `visual_rows` (per sample) as the
        on-disk cache records them."""
        layout: dict[str, Any] | None = {"per_sample": True} if visual_rows is not None else None
        manifest = CacheManifest(
            reference=reference,
            tokenizer_fingerprint=tokenizer_fingerprint,
            reference_mode=reference_mode,
            dtype="float32",
            visual_tokens=visual_tokens,
            visual_layout=layout,
            provenance=provenance,
        )
        return cls(losses, manifest, visual_rows)

    @functools.cached_property
    def layout_digest(self) -> str:
        """Identifies the token space: a hash of the keys in token-space order, their lengths and losses."""
        order = np.argsort(self._address, kind="stable")
        digest = hashlib.sha256(np.stack([self._hi, self._lo], axis=1)[order].tobytes())
        digest.update(self._length[order].tobytes())
        digest.update(self._space.tobytes())
        return digest.hexdigest()[:32]
