"""The `with_input` unit and the `repeats='last'` rule against brute-force loops, and the `auto` schedule."""

from __future__ import annotations

import pytest
import torch

from regate_plugin.core import ReGATEConfig
from regate_plugin.core.config import ConfigError
from regate_plugin.core.schedule import auto_schedule, expected_keep_fraction, is_dense_step
from regate_plugin.core.selection import keep_counts, repeated_targets, select_with_inputs


def _with_inputs_loop(scores: list[float], candidates: list[bool], k: int) -> set[int]:
    """The rule as written: walk candidates best first (ties to the earlier position); take each with its next
    position when that is a candidate, while the kept set fits in k; then fill one slot with the best left."""
    ranked = sorted((p for p, c in enumerate(candidates) if c), key=lambda p: (-scores[p], p))
    kept: set[int] = set()
    for p in ranked:
        grown = kept | {p} | ({p + 1} if p + 1 < len(candidates) and candidates[p + 1] else set())
        if len(grown) > k:
            break
        kept = grown
    for p in ranked:
        if len(kept) == k:
            break
        if p not in kept:
            kept.add(p)
    return kept


def test_with_inputs_matches_the_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        length = 1 + trial % 23
        scores = torch.rand(4, length, generator=generator).round(decimals=1)  # ties happen
        candidates = torch.rand(4, length, generator=generator) < 0.7
        keep = keep_counts(candidates.sum(dim=1), 0.2 + 0.1 * (trial % 8))
        kept = select_with_inputs(scores, candidates, keep)
        for b in range(4):
            expected = _with_inputs_loop(scores[b].tolist(), candidates[b].tolist(), int(keep[b]))
            assert set(torch.nonzero(kept[b]).flatten().tolist()) == expected, (trial, b)


def test_repeated_targets_matches_the_loop() -> None:
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 6, (5, 30), generator=generator)
    supervised = torch.rand(5, 30, generator=generator) < 0.6
    got = repeated_targets(targets, supervised)
    for b in range(5):
        for p in range(30):
            earlier = any(supervised[b, q] and targets[b, q] == targets[b, p] for q in range(p))
            assert bool(got[b, p]) == (bool(supervised[b, p]) and earlier)


def test_auto_schedule_scales_with_the_run_and_fixed_is_the_paper() -> None:
    paper = ReGATEConfig()
    assert paper.scaled_to(600) == paper
    for total in (200, 400, 600, 5197):
        cfg = ReGATEConfig(schedule="auto", keep_ratio=0.35).scaled_to(total)
        assert cfg.warmup_steps == auto_schedule(total)["warmup_steps"]
        # the whole run's share of candidates kept stays near the same value whatever its length
        assert 0.44 < expected_keep_fraction(total, cfg) < 0.50
    with pytest.raises(ConfigError, match="scaled_to"):
        is_dense_step(0, ReGATEConfig(schedule="auto"))
