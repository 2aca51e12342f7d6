"""`random`: the baseline that keeps a uniformly random k of the candidates."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..core.selection import random_scores
from .base import TokenElision


class RandomElision(TokenElision):
    """A uniformly random k of the candidates, from a generator seeded by (seed, step, batch)."""

    name = "random"
    selects_exact_counts = True

    def describe(self) -> str:
        return f"a uniformly random choice (seed {self.cfg.seed})"

    def select(
        self, targets: torch.Tensor, candidates: torch.Tensor, ordinals: torch.Tensor, rows: Any, keep: torch.Tensor
    ) -> torch.Tensor:
        stream = f"{self.cfg.seed}:{self.step}:{self.batches}".encode()
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.blake2b(stream, digest_size=8).digest(), "little") >> 1
        )
        return self.choose(random_scores(tuple(candidates.shape), generator).to(candidates.device), candidates, keep)
