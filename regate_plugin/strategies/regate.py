"""`regate`: reference-guided elision, keeping the candidates with the highest fused score of the student's EMA
loss and the reference loss (docs/METHOD.md)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.config import ReGATEConfig
from ..core.selection import fused_score
from .scored import ReferenceScoredElision


class ReGATEElision(ReferenceScoredElision):
    """Keeps the candidates with the highest d = (1 - lam) * EMA + lam * reference (`selection.fused_score`)."""

    name = "regate"
    config_class: ClassVar[type[ReGATEConfig]] = ReGATEConfig
    cfg: ReGATEConfig

    def describe(self) -> str:
        return f"score (1 - {self.cfg.lam}) * EMA + {self.cfg.lam} * reference, EMA beta {self.cfg.ema_beta}"

    def score(self, difficulty: torch.Tensor, reference: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        zscore = self.cfg.score_norm == "zscore"
        return fused_score(difficulty, reference, self.cfg.lam, zscore=zscore, mask=candidates)
