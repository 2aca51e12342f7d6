"""The adaptive keep ratio (`keep_control='adaptive'`, docs/METHOD.md): a rule that raises or lowers the share of
candidates sparse steps keep, from signals training already computes, within the bounds the user sets.

Signals, summed on the device over a window of `keep_control_interval` optimizer steps (six float64 sums,
`sparse_signals` and `dense_signals`; under data parallelism every rank adds every rank's, so all hold the same):

- sparse steps: the kept candidates the student has not learnt (EMA at or above `keep_control_low`), weighted by
  their reference loss: the relative change their losses make to their EMA (sum of w * (loss - EMA) over sum of
  w * EMA, where each update moves the EMA by (1 - beta) * (loss - EMA)). At or above 0 their EMA did not fall over
  the window: the student is not learning the hard tokens it keeps, it lacks what the elided ones gave it (context):
  keep more.
- dense steps: the student's mean loss on the candidates the sparse rule would elide at the current ratio, and on
  those it would keep. Elided ones above `keep_control_gap` x the kept ones: the rule elides what the student has
  not learnt, keep more; both below `keep_control_low`: the student knows both, keep less.

`next_keep_ratio` is the rule: one `keep_control_step` up or down per window, clamped to [`keep_ratio_min`,
`keep_ratio_max`]; a pure function of the sums, so every rank decides the same. `KeepController` holds the ratio
and the window's sums, and reads the sums on the host once per window (`advance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import ReferenceScoredConfig

SIGNALS = 6
DRIFT, EMA, ELIDED_LOSS, ELIDED, KEPT_LOSS, KEPT = range(SIGNALS)
"""Indexes of the window's sums: over the unlearnt kept candidates (sparse steps), sum of w * (loss - EMA) and of
w * EMA (w: the reference loss); the loss and count of the candidates the sparse rule would elide, and of those it
would keep (dense steps)."""


@dataclass(frozen=True)
class Signals:
    """A window's signals; None where the window had no step of that kind."""

    drift: float | None  # relative change of the unlearnt kept candidates' weighted EMA (sparse steps)
    elided_loss: float | None  # mean student loss on the candidates the sparse rule would elide (dense steps)
    kept_loss: float | None  # ... and on those it would keep

    @classmethod
    def of(cls, sums: list[float]) -> Signals:
        def ratio(numerator: int, denominator: int) -> float | None:
            return sums[numerator] / sums[denominator] if sums[denominator] > 0 else None

        return cls(ratio(DRIFT, EMA), ratio(ELIDED_LOSS, ELIDED), ratio(KEPT_LOSS, KEPT))


def next_keep_ratio(ratio: float, signals: Signals, cfg: ReferenceScoredConfig) -> float:
    """The keep ratio after a window: lower by one step when the student knows both the kept and the elided
    candidates (dense steps), else higher by one step when the unlearnt kept candidates' EMA did not fall (sparse
    steps) or the elided ones' loss is above `keep_control_gap` x the kept ones' (dense steps); within the bounds
    (rounded to 1e-9, so that steps of 0.05 stay on their grid)."""
    elided, kept = signals.elided_loss, signals.kept_loss
    learnt = behind = False
    if elided is not None and kept is not None:
        learnt = max(elided, kept) < cfg.keep_control_low
        behind = elided > cfg.keep_control_gap * kept
    stalled = signals.drift is not None and signals.drift >= 0.0
    change = -cfg.keep_control_step if learnt else cfg.keep_control_step if stalled or behind else 0.0
    return round(min(max(ratio + change, cfg.keep_ratio_min), cfg.keep_ratio_max), 9)


def sparse_signals(losses: torch.Tensor, ema: torch.Tensor, reference: torch.Tensor, low: float) -> torch.Tensor:
    """Float64 [SIGNALS]: one sparse step's sums over its kept candidates (1-D, aligned): their `losses`, their EMA
    before this step's update, their reference losses; those whose EMA is below `low` (learnt) or any of whose
    values is unknown (NaN) count nowhere."""
    unlearnt = torch.isfinite(losses) & torch.isfinite(ema) & torch.isfinite(reference) & (ema >= low)
    weight = torch.where(unlearnt, reference.clamp(min=0), 0.0).double()
    loss, ema = torch.where(unlearnt, losses, 0.0).double(), torch.where(unlearnt, ema, 0.0).double()
    zero = weight.new_zeros(())
    return torch.stack([(weight * (loss - ema)).sum(), (weight * ema).sum(), zero, zero, zero, zero])


def dense_signals(losses: torch.Tensor, would_keep: torch.Tensor) -> torch.Tensor:
    """Float64 [SIGNALS]: one dense step's sums over its candidates (1-D, aligned): their `losses`, and whether the
    sparse rule would keep each. Non-finite losses count nowhere."""
    known = torch.isfinite(losses)
    loss = torch.where(known, losses, 0.0).double()
    elided, kept = known & ~would_keep, known & would_keep
    zero = loss.new_zeros(())
    return torch.stack([zero, zero, (loss * elided).sum(), elided.sum().double(), (loss * kept).sum(), kept.sum()])


class KeepController:
    """The current keep ratio of sparse steps and the open window's sums (on the device)."""

    def __init__(self, cfg: ReferenceScoredConfig) -> None:
        self.cfg = cfg
        self.ratio = cfg.keep_ratio
        self.updated_at = 0  # the optimizer step of the last update (0: none yet)
        self.sums = torch.zeros(SIGNALS, dtype=torch.float64)

    def add(self, increment: torch.Tensor) -> None:
        """Add one micro-batch's signals (every rank's, under data parallelism); no sync."""
        self.sums = self.sums.to(increment.device) + increment

    def advance(self, step: int) -> bool:
        """At the first step of a new window (every `keep_control_interval` steps), decide the ratio from the window
        that ended and open the next; True where it decided. One host read per window."""
        interval = self.cfg.keep_control_interval
        if step // interval <= self.updated_at // interval:
            return False
        self.ratio = next_keep_ratio(self.ratio, Signals.of(self.sums.tolist()), self.cfg)
        self.updated_at, self.sums = step, torch.zeros_like(self.sums)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "updated_at": self.updated_at, "sums": self.sums.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ratio, self.updated_at = float(state["ratio"]), int(state["updated_at"])
        self.sums = state["sums"].to(self.sums.device, torch.float64)
