"""What a strategy's `plan` produces: the host layout of a merged batch, and one batch's elision decision with
the gather that executes it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.compaction import (
    IGNORE_INDEX,
    CompactionPlan,
    PaddingSide,
    elidable_positions,
    infer_padding_side,
    shift_targets,
)
from ..core.keys import SampleKey


@dataclass(frozen=True)
class BatchLayout:
    """Host-side counts of a merged batch, from its labels and mask alone (one device-to-host copy, or none when
    the Trainer integration derives them before the forward): they size the compact batch without a device sync."""

    valid: np.ndarray  # int64 [B] unpadded length of each row
    targets: np.ndarray  # int64 [B] supervised next-token targets per row
    candidates: np.ndarray  # int64 [B] elidable positions per row
    length: int  # L
    padding_side: PaddingSide
    contiguous: bool  # every row's valid positions form one block on `padding_side`
    max_target_id: int  # -1 when the batch has no target

    @classmethod
    def of(
        cls, labels: torch.Tensor, attention_mask: torch.Tensor | None = None, padding_side: PaddingSide | None = None
    ) -> BatchLayout:
        labels = labels.detach().cpu()
        mask = attention_mask.detach().cpu() if attention_mask is not None else None
        targets = shift_targets(labels, mask)
        supervised = targets != IGNORE_INDEX
        valid = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
        side = padding_side or infer_padding_side(mask)
        counts = valid.sum(dim=1)
        columns = torch.arange(labels.shape[1])
        block = columns < counts[:, None] if side == "right" else columns >= labels.shape[1] - counts[:, None]
        return cls(
            valid=counts.numpy(),
            targets=supervised.sum(dim=1).numpy(),
            candidates=elidable_positions(labels, targets, mask).sum(dim=1).numpy(),
            length=labels.shape[1],
            padding_side=side,
            contiguous=bool(torch.equal(block, valid)),
            max_target_id=int(targets[supervised].max()) if bool(supervised.any()) else -1,
        )


@dataclass
class ElisionPlan:
    """One batch's elision decision and the gather that executes it."""

    compaction: CompactionPlan
    targets: torch.Tensor  # int64 [B, L] pre-shifted, IGNORE_INDEX at elided candidates: the loss terms
    ordinals: torch.Tensor  # int64 [B, L] answer ordinal of each target, -1 where none
    candidates: torch.Tensor  # bool [B, L]
    kept_candidates: torch.Tensor  # bool [B, L]: the candidates whose loss term is kept
    sample_keys: list[SampleKey] | None
    dense: bool
    keep_ratio: float
    layout: BatchLayout
    keep_counts: np.ndarray  # int64 [B]: candidates each row keeps (`TokenElision.keep_counts`)
    decoder_tokens: np.ndarray  # int64 [B]: positions each row runs through the decoder
    rows: Any = None  # what the strategy's `locate` found for the batch's rows (None for most strategies)

    @property
    def kept_mask(self) -> torch.Tensor:
        return self.compaction.kept_mask

    def compact_embeddings(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.compaction.gather(inputs_embeds)

    def compact_attention_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return self.compaction.gather_attention_mask(attention_mask)

    def compact_position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        return self.compaction.gather_position_ids(position_ids)

    def compact_targets(self) -> torch.Tensor:
        return self.compaction.gather(self.targets, fill=IGNORE_INDEX)

    @functools.cached_property
    def counts(self) -> dict[str, int]:
        """Candidates, kept candidates, kept targets and decoder tokens, from the host layout (no device sync)."""
        kept = self.keep_counts
        candidates = self.layout.candidates
        return {
            "candidates": int(candidates.sum()),
            "kept": int(kept.sum()),
            "targets": int((self.layout.targets - candidates + kept).sum()),
            "tokens": int(self.decoder_tokens.sum()),
        }

    def report(self) -> dict[str, Any]:
        """What `out.token_elision` carries (docs/ARCHITECTURE.md, "One training step")."""
        return {
            "kept_mask": self.kept_mask,
            "kept_candidates": self.kept_candidates,
            "dense": self.dense,
            "keep_ratio": self.keep_ratio,
            **self.counts,
        }
