"""`DifficultyEMA`: the student's running per-token loss, m <- beta*m + (1-beta)*loss (docs/METHOD.md).

Values are kept per (sample key, answer ordinal). A sample never seen before (the common case in one-epoch
fine-tuning) falls back to an EMA kept per target token id; a token id never seen either has no value (NaN), and
the score then uses the reference loss alone. The first observation initialises an entry (no bias towards 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .keys import KEY_BYTES, SampleKey


@dataclass
class EMAUpdate:
    """Student losses observed for one sample: what one rank sends the others."""

    key: SampleKey
    ordinals: torch.Tensor  # int64 [n]
    token_ids: torch.Tensor  # int64 [n]
    losses: torch.Tensor  # float32 [n]


class DifficultyEMA:
    def __init__(self, beta: float = 0.9, vocab_size: int = 0) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ema beta={beta!r} is outside the allowed range [0, 1)")
        self.beta = beta
        self._per_sample: dict[SampleKey, torch.Tensor] = {}
        self._per_token = torch.full((vocab_size,), float("nan"))
        self._pending: list[EMAUpdate] = []

    def __len__(self) -> int:
        """Number of samples with at least one observed token."""
        return len(self._per_sample)

    def lookup(self, key: SampleKey, ordinals: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Difficulty of each (ordinal, token id) of one sample, float32; NaN where nothing is known."""
        ordinals = ordinals.to(torch.int64).cpu()
        token_ids = token_ids.to(torch.int64).cpu()
        out = torch.full((ordinals.numel(),), float("nan"))
        row = self._per_sample.get(key)
        if row is not None:
            inside = ordinals < row.numel()
            out[inside] = row[ordinals[inside]]
        missing = torch.isnan(out)
        if missing.any() and self._per_token.numel():
            ids = token_ids[missing]
            known = (ids >= 0) & (ids < self._per_token.numel())
            fallback = torch.full((ids.numel(),), float("nan"))
            fallback[known] = self._per_token[ids[known]]
            out[missing] = fallback
        return out

    def update(self, key: SampleKey, ordinals: torch.Tensor, token_ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold this rank's observed losses in and queue them for `drain_pending` (cross-rank exchange)."""
        update = EMAUpdate(
            key=key,
            ordinals=ordinals.detach().to(torch.int64).cpu(),
            token_ids=token_ids.detach().to(torch.int64).cpu(),
            losses=losses.detach().to(torch.float32).cpu(),
        )
        self._apply(update)
        self._pending.append(update)

    def drain_pending(self) -> list[EMAUpdate]:
        """Updates made by `update` since the last drain, to send to the other ranks."""
        pending, self._pending = self._pending, []
        return pending

    def merge(self, updates: list[EMAUpdate]) -> None:
        """Apply updates that another rank made (they are not queued again)."""
        for update in updates:
            self._apply(update)

    def _apply(self, update: EMAUpdate) -> None:
        if not (update.ordinals.numel() == update.token_ids.numel() == update.losses.numel()):
            raise ValueError("EMA update: ordinals, token_ids and losses must have the same length")
        if update.ordinals.numel() == 0:
            return
        if len(update.key) != KEY_BYTES:
            raise ValueError(f"sample keys are {KEY_BYTES} bytes, got {len(update.key)}")
        needed = int(update.ordinals.max()) + 1
        row = self._per_sample.get(update.key)
        if row is None or row.numel() < needed:
            grown = torch.full((needed,), float("nan"))
            if row is not None:
                grown[: row.numel()] = row
            row = grown
            self._per_sample[update.key] = row
        row[update.ordinals] = self._blend(row[update.ordinals], update.losses)
        ids = update.token_ids
        if self._per_token.numel() <= int(ids.max()):
            grown = torch.full((int(ids.max()) + 1,), float("nan"))
            grown[: self._per_token.numel()] = self._per_token
            self._per_token = grown
        # A token id can occur several times in one update: fold its k-th occurrences in round k, in order.
        for round_ids, round_losses in _occurrence_rounds(ids, update.losses):
            self._per_token[round_ids] = self._blend(self._per_token[round_ids], round_losses)

    def _blend(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isnan(old), new, self.beta * old + (1.0 - self.beta) * new)

    def state_dict(self) -> dict[str, Any]:
        keys = list(self._per_sample)
        rows = [self._per_sample[k] for k in keys]
        return {
            "beta": self.beta,
            "keys": torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).copy()).reshape(-1, KEY_BYTES),
            "lengths": torch.tensor([r.numel() for r in rows], dtype=torch.int64),
            "values": torch.cat(rows) if rows else torch.zeros(0),
            "per_token": self._per_token.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        keys = state["keys"].to(torch.uint8).numpy()
        rows = torch.split(state["values"].float(), state["lengths"].tolist()) if len(keys) else []
        self._per_sample = {keys[i].tobytes(): rows[i].clone() for i in range(len(keys))}
        self._per_token = state["per_token"].float().clone()
        self._pending = []


def _occurrence_rounds(ids: torch.Tensor, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split (ids, values) into rounds in which each id occurs once; round k holds every id's k-th occurrence."""
    order = torch.sort(ids, stable=True).indices
    sorted_ids = ids[order]
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    position = torch.arange(ids.numel())
    group_start = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), 0).values
    rank = torch.empty_like(position)
    rank[order] = position - group_start
    return [(ids[rank == k], values[rank == k]) for k in range(int(rank.max()) + 1)]
