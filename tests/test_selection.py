import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regate_plugin.core import (
    ReGATEConfig,
    fused_score,
    keep_counts,
    select_kept_positions,
)
from regate_plugin.core.compaction import IGNORE_INDEX, elidable_positions, shift_targets
from regate_plugin.strategies import BatchLayout, TokenElision, build_token_elision


def _brute_force_keep(scores: list[float], candidates: list[bool], ratio: float) -> list[bool]:
    """Sort candidates by (-score, position) and take the first ceil(ratio * n), at least one."""
    pool = [i for i, c in enumerate(candidates) if c]
    k = 0 if not pool else max(1, math.ceil(round(ratio * len(pool), 9)))
    key = lambda i: (-(scores[i] if not math.isnan(scores[i]) else -math.inf), i)  # noqa: E731
    chosen = set(sorted(pool, key=key)[:k])
    return [i in chosen for i in range(len(scores))]


rows = st.integers(1, 4).flatmap(
    lambda b: st.integers(1, 30).flatmap(
        lambda n: st.tuples(
            st.lists(
                st.lists(st.sampled_from([0.0, 1.0, 2.5, -1.0, float("nan"), 7.0]), min_size=n, max_size=n),
                min_size=b,
                max_size=b,
            ),
            st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b),
        )
    )
)


@given(rows, st.floats(0.01, 1.0))
def test_top_k_matches_brute_force(data, ratio):
    scores, candidates = data
    kept = select_kept_positions(torch.tensor(scores), torch.tensor(candidates), ratio)
    for b in range(len(scores)):
        assert kept[b].tolist() == _brute_force_keep(scores[b], candidates[b], ratio)
        n = sum(candidates[b])
        assert int(kept[b].sum()) == (0 if n == 0 else max(1, math.ceil(round(ratio * n, 9))))
        assert not (kept[b] & ~torch.tensor(candidates[b])).any()


def test_keep_counts_edges():
    assert keep_counts(torch.tensor([0, 1, 2, 20, 7]), 0.35).tolist() == [0, 1, 1, 7, 3]
    assert keep_counts(torch.tensor([5]), 1.0).tolist() == [5]


def test_ties_go_to_the_earlier_position():
    kept = select_kept_positions(torch.zeros(1, 6), torch.ones(1, 6, dtype=torch.bool), 0.5)
    assert kept.tolist() == [[True, True, True, False, False, False]]


def test_fused_score_formula_and_fallbacks():
    nan = float("nan")
    m = torch.tensor([1.0, nan, 2.0, nan])
    ref = torch.tensor([3.0, 4.0, nan, nan])
    assert fused_score(m, ref, 0.25).tolist() == [0.75 * 1 + 0.25 * 3, 4.0, 2.0, 0.0]
    z = fused_score(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0]), 0.5, zscore=True)
    assert torch.allclose(z, torch.tensor([-1.0, 0.5, 0.5]))


def _labelled_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(3, 50, (3, 20), generator=gen)
    labels[torch.rand(3, 20, generator=gen) < 0.4] = IGNORE_INDEX
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:] = 0
    labels[1, 15:] = IGNORE_INDEX
    return labels, mask


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 0.9))
def test_random_mode_keeps_only_candidates_and_is_seeded(seed, ratio):
    labels, mask = _labelled_batch(torch.Generator().manual_seed(seed))
    cfg = ReGATEConfig(keep_ratio=ratio, warmup_steps=0, dense_steps=0, seed=seed)
    plans = []
    for _ in range(2):
        elision = build_token_elision("random", cfg)
        elision.set_step(3)
        plans.append(elision.plan(labels, mask))
    assert torch.equal(plans[0].kept_mask, plans[1].kept_mask)
    candidates = elidable_positions(labels, shift_targets(labels, mask), mask)
    kept_candidates = plans[0].kept_mask & candidates
    assert torch.equal(plans[0].kept_mask | candidates, mask.bool())
    assert torch.equal(kept_candidates.sum(1), keep_counts(candidates.sum(1), ratio))
    # Different steps draw differently: over 8 steps the choice cannot stay fixed when some row has a choice.
    masks = set()
    for step in range(8):
        other = build_token_elision("random", cfg)
        other.set_step(step)
        masks.add(tuple(other.plan(labels, mask).kept_mask.flatten().tolist()))
    has_choice = (keep_counts(candidates.sum(1), ratio) < candidates.sum(1)).any()
    assert (len(masks) > 1) == bool(has_choice)


def test_dense_step_keeps_everything():
    labels, mask = _labelled_batch(torch.Generator().manual_seed(0))
    elision = build_token_elision("random", ReGATEConfig(warmup_steps=5))
    elision.set_step(4)
    plan = elision.plan(labels, mask)
    assert plan.dense and torch.equal(plan.kept_mask, mask.bool())


def test_kept_target_counts_match_the_plan():
    """What the Trainer uses as num_items_in_batch, from labels alone, against the plan that runs."""
    from .tiny import make_batch

    for keep_ratio, padding_side, dense_steps in [
        (0.3, "right", 0),
        (0.5, "left", 0),
        (1.0, "right", 0),
        (0.5, "right", 1),
    ]:
        batch = make_batch(batch=4, seed=3, padding_side=padding_side, turns=3)
        cfg = ReGATEConfig(keep_ratio=keep_ratio, warmup_steps=0, dense_steps=dense_steps)
        elision = build_token_elision("random", cfg)
        plan = elision.plan(batch["labels"], batch["attention_mask"])
        targets = shift_targets(batch["labels"], batch["attention_mask"]) != IGNORE_INDEX
        expected = (targets & plan.kept_mask).sum(dim=1)
        layout = BatchLayout.of(batch["labels"], batch["attention_mask"])
        assert torch.equal(elision.kept_target_counts(layout), expected)


class _FirstCandidateOnly(TokenElision):
    """A third-party strategy: keeps each row's first candidate on sparse steps, whatever keep_ratio says."""

    name = "first-only"

    def select(self, targets, candidates, ordinals, rows, keep):
        return candidates & (candidates.long().cumsum(dim=1) == 1)


class _FirstCandidateOnlyCounted(_FirstCandidateOnly):
    def sparse_keep_counts(self, layout, sample_keys=None):
        return np.minimum(layout.candidates, 1)


def _sparse_loss(elision, batch):
    from .tiny import VOCAB

    plan = elision.plan(batch["labels"], batch["attention_mask"])
    compact = plan.compact_targets()
    hidden = torch.randn(*compact.shape, 8, generator=torch.Generator().manual_seed(0))
    return plan, elision.loss(plan, hidden, torch.nn.Linear(8, VOCAB))


def test_a_strategy_that_keeps_another_count_fails_loudly_or_is_counted_right():
    from .tiny import make_batch

    batch = make_batch(batch=3, seed=5, turns=3)
    cfg = ReGATEConfig(keep_ratio=0.5, warmup_steps=0, dense_steps=0)
    with pytest.raises(RuntimeError, match=r"first-only.*keep_counts\(\) says in 3 row.*sparse_keep_counts"):
        _sparse_loss(_FirstCandidateOnly(cfg), batch)
    counted = _FirstCandidateOnlyCounted(cfg)
    plan, _ = _sparse_loss(counted, batch)
    targets = shift_targets(batch["labels"], batch["attention_mask"]) != IGNORE_INDEX
    assert plan.counts["kept"] == 3
    layout = BatchLayout.of(batch["labels"], batch["attention_mask"])
    assert torch.equal(counted.kept_target_counts(layout), (targets & plan.kept_mask).sum(dim=1))
