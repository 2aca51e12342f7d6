"""What the text-only reference LLM sees, in modes `gap` and `pad` (docs/METHOD.md).

The student splices feature rows in place of each visual placeholder token: the same number for every placeholder,
or (LLaVA-NeXT anyres) one number per placeholder. The reference has no
vision, so in mode `gap` it skips those rows but keeps the student's position ids (a gap in the RoPE positions,
no compute spent on the rows); in mode `pad` it sees `visual_rows` pad tokens instead (the paper's choice).
Either way the supervised labels, and so the answer ordinals, are the student's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .compaction import IGNORE_INDEX

REFERENCE_MODES: tuple[str, ...] = ("gap", "pad")


@dataclass
class ReferenceInput:
    """One sample as the reference LLM sees it."""

    input_ids: torch.Tensor  # int64 [n]
    position_ids: torch.Tensor  # int64 [n]
    labels: torch.Tensor  # int64 [n], IGNORE_INDEX off the answers

    def truncated(self, max_positions: int | None) -> ReferenceInput:
        """Drop what the student's merged sequence loses when the model cuts it at `max_positions` rows."""
        if max_positions is None or self.position_ids.numel() == 0 or int(self.position_ids[-1]) < max_positions:
            return self
        keep = self.position_ids < max_positions
        return ReferenceInput(self.input_ids[keep], self.position_ids[keep], self.labels[keep])

    @property
    def num_targets(self) -> int:
        """Supervised next-token targets: labels off IGNORE_INDEX after the first position."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def build_reference_input(
    input_ids: Sequence[int] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    visual_token_ids: Sequence[int],
    visual_rows: int | Sequence[int],
    mode: str = "gap",
    pad_token_id: int | None = None,
) -> ReferenceInput:
    """Turn one unpadded pre-merge sample into the reference LLM's input.

    `visual_rows`: rows per placeholder, one count for all or one per placeholder in order."""
    ids = torch.as_tensor(input_ids, dtype=torch.int64).reshape(-1)
    lab = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if ids.shape != lab.shape:
        raise ValueError(f"input_ids has {ids.numel()} tokens but labels has {lab.numel()}")
    visual = torch.isin(ids, torch.as_tensor(list(visual_token_ids), dtype=torch.int64))
    if (lab[visual] != IGNORE_INDEX).any():
        raise ValueError("a visual placeholder position carries a supervised label")
    counts = torch.as_tensor(visual_rows, dtype=torch.int64).reshape(-1)
    if counts.numel() != 1 and counts.numel() != int(visual.sum()):
        raise ValueError(f"{counts.numel()} visual row counts for {int(visual.sum())} placeholders")
    if (counts < 1).any():
        raise ValueError(f"visual rows must be >= 1, got {counts.tolist()}")
    rows = torch.ones_like(ids)
    rows[visual] = counts
    # Position of each pre-merge token in the merged sequence: every earlier placeholder adds its rows - 1.
    merged_pos = torch.cumsum(rows, 0) - rows
    if mode == "gap":
        text = ~visual
        return ReferenceInput(ids[text], merged_pos[text], lab[text])
    if mode == "pad":
        if pad_token_id is None:
            raise ValueError("reference mode 'pad' needs a pad_token_id (the tokenizer has none: set one)")
        expanded_ids = torch.where(visual, pad_token_id, ids).repeat_interleave(rows)
        expanded_labels = lab.repeat_interleave(rows)
        return ReferenceInput(expanded_ids, torch.arange(expanded_ids.numel()), expanded_labels)
    raise ValueError(f"reference mode {mode!r} is not one of {list(REFERENCE_MODES)}")
