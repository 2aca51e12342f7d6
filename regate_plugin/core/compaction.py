"""Compaction after the multimodal merge (docs/ARCHITECTURE.md, "One training step").

Eliding a token in every decoder layer is the same as removing it from the sequence before layer 0, so the
plugin gathers the kept positions of the merged batch once: embeddings, attention mask, the model's *original*
position ids (gaps allowed, strictly increasing per row; 2-D or multi-row M-RoPE) and pre-shifted targets, then
re-pads on the model's padding side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

IGNORE_INDEX = -100
"""The label of a position with no next-token target (the value every upstream codebase uses)."""

PaddingSide = Literal["left", "right"]


def shift_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """tgt[:, p] = labels[:, p + 1]; IGNORE_INDEX at the last column and wherever p or p + 1 is padding."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        valid = attention_mask.bool()
        next_valid = torch.zeros_like(valid)
        next_valid[:, :-1] = valid[:, 1:]
        targets = targets.masked_fill(~(valid & next_valid), IGNORE_INDEX)
    return targets


def elidable_positions(
    labels: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions p with labels[p] and labels[p + 1] both supervised: an answer token that predicts another one."""
    candidates = (labels != IGNORE_INDEX) & (targets != IGNORE_INDEX)
    return candidates if attention_mask is None else candidates & attention_mask.bool()


def target_ordinals(targets: torch.Tensor) -> torch.Tensor:
    """Answer-token ordinal of each position's target (0, 1, ... per row), -1 where there is no target."""
    supervised = targets != IGNORE_INDEX
    return torch.where(supervised, supervised.long().cumsum(dim=1) - 1, torch.full_like(targets, -1))


def infer_padding_side(attention_mask: torch.Tensor | None) -> PaddingSide:
    """'left' when some row starts with padding, else 'right'."""
    if attention_mask is None or attention_mask.numel() == 0:
        return "right"
    return "left" if bool((attention_mask[:, 0] == 0).any()) else "right"


@dataclass(frozen=True)
class CompactionPlan:
    """Where each kept position of the merged [B, L] batch lands in the compact [B, Lc] batch."""

    kept_mask: torch.Tensor  # bool [B, L]
    index: torch.Tensor  # int64 [B, Lc]: source position of each slot (0 in padding slots)
    slot_valid: torch.Tensor  # bool [B, Lc]
    padding_side: PaddingSide
    identity: bool  # the compact batch is the merged batch itself

    @property
    def compact_length(self) -> int:
        return self.index.shape[1]

    def gather(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """values [B, L, ...] -> [B, Lc, ...]; padding slots get `fill`."""
        if self.identity:
            return values
        batch, length = self.index.shape
        index = self.index.view(batch, length, *([1] * (values.ndim - 2))).expand(batch, length, *values.shape[2:])
        gathered = torch.gather(values, 1, index)
        valid = self.slot_valid.view(batch, length, *([1] * (values.ndim - 2)))
        return torch.where(valid, gathered, torch.full_like(gathered, fill))

    def gather_position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Original position ids of the kept tokens: [B, L] / [1, L] / None (= arange) or [R, B, L] (M-RoPE).

        Padding slots continue past the row's last kept position on the right, and are 0 on the left.
        """
        if self.identity:
            return position_ids
        batch, length = self.kept_mask.shape
        device = self.index.device
        if position_ids is None:
            position_ids = torch.arange(length, device=device).unsqueeze(0)
        rows = position_ids.unsqueeze(0) if position_ids.ndim == 2 else position_ids
        rows = rows.expand(rows.shape[0], batch, length)
        index = self.index.unsqueeze(0).expand(rows.shape[0], -1, -1)
        gathered = torch.gather(rows, 2, index)
        if self.padding_side == "right":
            counts = self.slot_valid.sum(dim=1)
            last = gathered.gather(2, (counts - 1).clamp(min=0).view(1, batch, 1).expand(rows.shape[0], batch, 1))
            slots = torch.arange(self.compact_length, device=device).view(1, 1, -1)
            fill = last + slots - counts.view(1, batch, 1) + 1
        else:
            fill = torch.zeros_like(gathered)
        out = torch.where(self.slot_valid.unsqueeze(0), gathered, fill)
        return out[0] if position_ids.ndim == 2 else out

    def gather_attention_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The compact 2-D mask (always explicit once tokens moved: a missing mask with gapped position ids
        would make HF treat the row as packed sequences)."""
        if self.identity:
            return attention_mask
        dtype = attention_mask.dtype if attention_mask is not None else torch.long
        return self.slot_valid.to(dtype)


def plan_compaction(
    kept_mask: torch.Tensor,
    padding_side: PaddingSide = "right",
    attention_mask: torch.Tensor | None = None,
    compact_length: int | None = None,
    identity: bool | None = None,
) -> CompactionPlan:
    """Gather indices for the kept positions of each row, in order, re-padded on `padding_side`.

    `compact_length` (the most kept positions of any row) and `identity` (nothing moves) are read from the device
    when not given; a caller that knows them on the host (`BatchLayout`) passes them and the plan needs no sync.
    """
    if kept_mask.ndim != 2:
        raise ValueError(f"kept_mask must be [batch, length], got {tuple(kept_mask.shape)}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batch, length = kept_mask.shape
    counts = kept_mask.sum(dim=1)
    if compact_length is None:
        compact_length = int(counts.max()) if batch else 0
    compact_length = max(compact_length, 1)
    order = torch.sort((~kept_mask).to(torch.int8), dim=1, stable=True).indices[:, :compact_length]
    slots = torch.arange(compact_length, device=kept_mask.device).expand(batch, compact_length)
    if padding_side == "right":
        slot_valid = slots < counts.unsqueeze(1)
        index = torch.where(slot_valid, order, torch.zeros_like(order))
    else:
        offset = (compact_length - counts).unsqueeze(1)
        slot_valid = slots >= offset
        index = torch.where(slot_valid, order.gather(1, (slots - offset).clamp(min=0)), torch.zeros_like(order))
    if identity is None:
        valid = torch.ones_like(kept_mask) if attention_mask is None else attention_mask.bool()
        identity = (
            compact_length == length and torch.equal(slot_valid, valid) and bool((index == slots)[slot_valid].all())
        )
    return CompactionPlan(kept_mask, index, slot_valid, padding_side, identity)
