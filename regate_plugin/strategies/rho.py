"""`rho`: Rho-1's excess-loss selection (Lin et al. 2024, "Not all tokens are what you need"), keeping the
candidates whose student loss most exceeds the reference loss (docs/METHOD.md)."""

from __future__ import annotations

import torch

from ..core.selection import excess_loss
from .scored import ReferenceScoredElision


class RhoElision(ReferenceScoredElision):
    """Keeps the candidates with the highest excess loss EMA - reference (`selection.excess_loss`)."""

    name = "rho"

    def describe(self) -> str:
        return f"score EMA - reference (excess loss), EMA beta {self.cfg.ema_beta}"

    def score(self, difficulty: torch.Tensor, reference: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return excess_loss(difficulty, reference)
