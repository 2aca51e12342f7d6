"""The adaptive keep ratio (`keep_control='adaptive'`): the pure rule on a hand-worked sequence of signals, bounded
and monotone; the device signals against brute-force sums; the controller deciding once per window and resuming to
the same decisions; the strategy keeping ceil(ratio * n) candidates per row as the controller moves the ratio, and
resuming it exactly; two gloo ranks with different data holding the keep ratios of one process that sees both."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from regate_plugin.core import IGNORE_INDEX, ConfigError, ReGATEConfig, batch_sample_keys
from regate_plugin.core.controller import (
    SIGNALS,
    KeepController,
    Signals,
    dense_signals,
    next_keep_ratio,
    sparse_signals,
)
from regate_plugin.strategies import build_token_elision

from .ranks import free_port
from .tiny import VOCAB, make_batch, write_cache_for

BOUNDED = ReGATEConfig(
    keep_ratio=0.3,
    keep_control="adaptive",
    keep_ratio_min=0.2,
    keep_ratio_max=0.4,
    keep_control_step=0.05,
    keep_control_gap=0.5,
    keep_control_low=0.05,
)


def test_the_rule_on_a_hand_worked_sequence():
    # (drift, elided loss, kept loss) -> the ratio after the window, worked out by hand from the rule's text
    sequence = [
        ((None, None, None), 0.30),  # no signal: unchanged
        ((0.1, None, None), 0.35),  # unlearnt kept targets' EMA rose: keep more
        ((-0.2, 0.1, 1.0), 0.35),  # learning, elided 0.1 <= 0.5 * kept 1.0: unchanged
        ((-0.2, 0.6, 1.0), 0.40),  # elided 0.6 > 0.5 * kept 1.0: keep more
        ((0.0, 0.6, 1.0), 0.40),  # EMA flat and elided behind, but at keep_ratio_max
        ((0.3, 0.01, 0.04), 0.35),  # both below keep_control_low = 0.05: keep less, whatever the drift
        ((None, 0.01, 0.04), 0.30),
        ((None, 0.01, 0.04), 0.25),
        ((None, 0.01, 0.04), 0.20),
        ((None, 0.01, 0.04), 0.20),  # at keep_ratio_min
        ((None, 0.04, 0.06), 0.25),  # kept 0.06 not below low; elided 0.04 > 0.5 * 0.06: keep more
        ((-0.01, None, None), 0.25),
    ]
    ratio, got = BOUNDED.keep_ratio, []
    for signals, _ in sequence:
        ratio = next_keep_ratio(ratio, Signals(*signals), BOUNDED)
        got.append(ratio)
    assert got == [want for _, want in sequence]


def test_the_response_is_bounded_and_monotone_in_each_keep_more_signal():
    drifts = [None, -1.0, -0.01, 0.0, 0.5]
    losses = [None, 0.001, 0.02, 0.3, 2.0]
    ratios = [0.2, 0.25, 0.3, 0.35, 0.4]
    for ratio, drift, elided, kept in itertools.product(ratios, drifts, losses, losses):
        if (elided is None) != (kept is None):  # a window has both dense means or neither
            continue
        after = next_keep_ratio(ratio, Signals(drift, elided, kept), BOUNDED)
        assert 0.2 <= after <= 0.4 and abs(after - ratio) <= 0.05 + 1e-12
        for more in drifts[drifts.index(drift) + 1 :]:  # a larger drift never keeps less
            assert next_keep_ratio(ratio, Signals(more, elided, kept), BOUNDED) >= after
        if elided is not None:  # nor does a larger loss on what the sparse rule elides
            for more in losses[losses.index(elided) + 1 :]:
                assert next_keep_ratio(ratio, Signals(drift, more, kept), BOUNDED) >= after


def test_the_bounds_must_hold_the_starting_ratio_only_when_adaptive():
    with pytest.raises(ConfigError, match="keep_ratio"):
        ReGATEConfig(keep_ratio=0.05, keep_control="adaptive")  # below the default keep_ratio_min 0.1
    ReGATEConfig(keep_ratio=0.05)  # 'off' ignores the bounds
    with pytest.raises(ConfigError, match="keep_ratio_max"):
        ReGATEConfig(keep_ratio_min=0.5, keep_ratio_max=0.4)
    with pytest.raises(ConfigError, match="keep_control"):
        ReGATEConfig(keep_control="sometimes")


def test_the_signals_are_the_brute_force_sums():
    rng = np.random.default_rng(0)
    n, low = 40, 0.3
    losses, ema, reference = (rng.uniform(0, 2, n) for _ in range(3))
    for values, holes in ((losses, 3), (ema, 5), (reference, 2)):
        values[rng.choice(n, holes, replace=False)] = np.nan
    would_keep = rng.random(n) < 0.4
    drift = weight = elided_loss = kept_loss = 0.0
    elided = kept = 0
    for i in range(n):
        if not (np.isnan(losses[i]) or np.isnan(ema[i]) or np.isnan(reference[i])) and ema[i] >= low:
            drift += reference[i] * (losses[i] - ema[i])
            weight += reference[i] * ema[i]
        if not np.isnan(losses[i]):
            if would_keep[i]:
                kept_loss, kept = kept_loss + losses[i], kept + 1
            else:
                elided_loss, elided = elided_loss + losses[i], elided + 1
    as_tensor = [torch.from_numpy(v).float() for v in (losses, ema, reference)]
    sparse = sparse_signals(*as_tensor, low)
    dense = dense_signals(as_tensor[0], torch.from_numpy(would_keep))
    assert sparse.dtype == dense.dtype == torch.float64 and sparse.shape == dense.shape == (SIGNALS,)
    np.testing.assert_allclose(sparse.numpy(), [drift, weight, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(dense.numpy(), [0, 0, elided_loss, elided, kept_loss, kept], rtol=1e-6)


def _increment(step: int) -> torch.Tensor:
    """A scripted micro-batch's signals: the EMA rises, then falls; the elided loss moves about the gap; from step
    12 the student knows both."""
    drift = 1.0 if step < 6 else -1.0
    elided = [0.2, 0.8, 0.01, 2.0][step % 4] if step < 12 else 0.01
    kept = 0.02 if step >= 12 else 1.0
    return torch.tensor([drift, 10.0, elided, 1.0, kept, 1.0], dtype=torch.float64)


def _trajectory(controller: KeepController, steps: range) -> list[float]:
    ratios = []
    for step in steps:
        controller.advance(step)
        ratios.append(controller.ratio)
        controller.add(_increment(step))
    return ratios


def test_the_controller_decides_once_per_window_and_resumes_to_the_same_decisions():
    cfg = BOUNDED.replace(keep_control_interval=3, keep_ratio_min=0.1, keep_ratio_max=0.6)
    straight = KeepController(cfg)
    ratios = _trajectory(straight, range(20))
    # by hand: each window's summed increments (Signals of the sums) through the rule, at steps 3, 6, 9, ...
    want, ratio = [], cfg.keep_ratio
    for step in range(20):
        if step and step % 3 == 0:
            sums = torch.stack([_increment(s) for s in range(step - 3, step)]).sum(0).tolist()
            ratio = next_keep_ratio(ratio, Signals.of(sums), cfg)
        want.append(ratio)
    assert ratios == want == [0.3] * 3 + [0.35] * 3 + [0.4] * 3 + [0.45] * 3 + [0.5] * 3 + [0.45] * 3 + [0.4] * 2

    first = KeepController(cfg)
    head = _trajectory(first, range(8))  # stops inside a window, whose first two steps decide it (up at step 9)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = KeepController(cfg)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert head + _trajectory(resumed, range(8, 20)) == ratios
    assert resumed.state_dict()["updated_at"] == straight.state_dict()["updated_at"] == 18


# --- the strategy ---------------------------------------------------------------------------------------------


def _candidate_counts(labels: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Per row, from scratch: positions whose label and next label are both supervised answer tokens."""
    counts = []
    for row, valid in zip(labels.tolist(), mask.bool().tolist()):
        tokens = [t for t, v in zip(row, valid) if v]
        counts.append(sum(a != IGNORE_INDEX and b != IGNORE_INDEX for a, b in zip(tokens, tokens[1:])))
    return counts


def _hidden(compact_targets: torch.Tensor, scale: float, seed: int | None = None) -> torch.Tensor:
    """Logits through an identity head: `scale` on each position's own target (0: uniform, loss ln VOCAB; large:
    loss ~ 0), plus seeded noise where `seed` is given."""
    hidden = F.one_hot(compact_targets.clamp(min=0), VOCAB).float() * scale
    if seed is not None:
        hidden = hidden + torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed))
    return hidden


def _train_step(elision, batch: dict, keys: list, step: int, scale: float, seed: int | None = None):
    elision.set_step(step)
    plan = elision.plan(batch["labels"], batch["attention_mask"], keys)
    elision.loss(plan, _hidden(plan.compact_targets(), scale, seed), lambda h: h)
    elision.sync()
    return plan


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> tuple[list[dict], Path]:
    batches = [make_batch(batch=4, seed=seed, turns=3) for seed in (5, 6)]
    return batches, write_cache_for(tmp_path_factory.mktemp("cache") / "cache", batches)


ADAPTIVE = ReGATEConfig(
    keep_ratio=0.3,
    warmup_steps=1,
    cycle_steps=3,
    dense_steps=1,
    keep_control="adaptive",
    keep_ratio_min=0.1,
    keep_ratio_max=0.7,
    keep_control_step=0.1,
    keep_control_interval=3,
)


@pytest.mark.parametrize(("scale", "direction"), [(0.0, 1), (40.0, -1)])
def test_the_kept_count_per_row_follows_the_ratio_the_controller_sets(batches, scale, direction):
    """Uniform logits (every loss ln 96) leave what the sparse rule elides as far behind as what it keeps: one step
    up per window (each holds a dense step); logits sure of their target (losses ~ 0): one step down."""
    (batch, _), cache = batches
    keys = batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])
    elision = build_token_elision("regate", ADAPTIVE, reference=cache)
    n = _candidate_counts(batch["labels"], batch["attention_mask"])
    for step in range(12):
        plan = _train_step(elision, batch, keys, step, scale)
        ratio = round(min(max(0.3 + direction * 0.1 * (step // 3), 0.1), 0.7), 9)
        assert elision.sparse_keep_ratio() == pytest.approx(ratio)
        want = n if plan.dense else [max(1, math.ceil(round(ratio * c, 9))) for c in n]
        assert plan.keep_counts.tolist() == plan.kept_candidates.sum(1).tolist() == want, step
        assert plan.keep_ratio == (1.0 if plan.dense else elision.sparse_keep_ratio())


def test_a_resumed_strategy_makes_the_same_decisions(batches):
    (batch, _), cache = batches
    keys = batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])
    cfg = ADAPTIVE.replace(keep_control_gap=0.9, keep_ratio=0.4)
    straight = build_token_elision("regate", cfg, reference=cache)
    kept, ratios = [], []
    for s in range(16):
        kept.append(_train_step(straight, batch, keys, s, 2.0, seed=s).kept_candidates)
        ratios.append(straight.sparse_keep_ratio())
    assert len(set(ratios[7:])) > 1  # the controller decides something after the resume
    first = build_token_elision("regate", cfg, reference=cache)
    for s in range(7):  # stops inside a window
        _train_step(first, batch, keys, s, 2.0, seed=s)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["keep_control"]["sums"].abs().sum() > 0  # a window in progress travels with the state
    resumed = build_token_elision("regate", cfg, reference=cache)
    resumed.load_state_dict(state)
    for s in range(7, 16):
        plan = _train_step(resumed, batch, keys, s, 2.0, seed=s)
        assert torch.equal(plan.kept_candidates, kept[s]) and resumed.sparse_keep_ratio() == ratios[s], s
    assert (
        resumed.state_dict()["keep_control"]["sums"].tolist() == straight.state_dict()["keep_control"]["sums"].tolist()
    )


# --- two ranks ------------------------------------------------------------------------------------------------

RANK_SCALES = (0.0, 40.0)  # rank 0's losses are all ln 96, rank 1's ~ 0: alone they move the ratio apart
STEPS = 12


def _run(cache: Path, parts: list[tuple[dict, float]]) -> list[float]:
    """One optimizer step per iteration over `parts` (micro-batches in rank order, each with its logit scale):
    the sparse keep ratio at each step."""
    elision = build_token_elision("regate", ADAPTIVE, reference=cache)
    ratios = []
    for step in range(STEPS):
        elision.set_step(step)
        ratios.append(elision.sparse_keep_ratio())
        for batch, scale in parts:
            keys = batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])
            plan = elision.plan(batch["labels"], batch["attention_mask"], keys)
            elision.loss(plan, _hidden(plan.compact_targets(), scale), lambda h: h)
        elision.sync()
    return ratios


def _rank(rank: int, port: int, cache: Path, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        batch = make_batch(batch=4, seed=(5, 6)[rank], turns=3)
        torch.save(_run(cache, [(batch, RANK_SCALES[rank])]), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_different_data_hold_the_keep_ratios_of_one_process_that_sees_both(batches, tmp_path):
    """Every rank adds every rank's signals (`sync`), so both decide as one process that computes both ranks'
    batches as two micro-batches of each step; the samples differ, so the EMA each batch reads is the same."""
    (first, second), cache = batches
    mp.spawn(_rank, args=(free_port(), cache, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = _run(cache, [(first, RANK_SCALES[0]), (second, RANK_SCALES[1])])
    alone = [_run(cache, [(batch, scale)]) for batch, scale in zip((first, second), RANK_SCALES)]
    assert ranks[0] == ranks[1] == one
    assert alone[0] != alone[1] and one != alone[1]  # a rank deciding from its own data alone would differ
