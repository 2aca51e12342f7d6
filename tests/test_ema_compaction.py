import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regate_plugin.core import DifficultyEMA, plan_compaction, shift_targets, target_ordinals
from regate_plugin.core.compaction import IGNORE_INDEX

SLOTS, VOCAB = 12, 8


def _brute_force_ema(events, beta):
    """Replay (slot, token, loss) events one by one into plain dicts (slot -1: no per-sample entry)."""
    per_sample, per_token = {}, {}
    for slot, token, loss in events:
        for table, k in ((per_sample, slot), (per_token, token)):
            if k >= 0:
                table[k] = loss if k not in table else beta * table[k] + (1 - beta) * loss
    return per_sample, per_token


# Batches of observations; token ids repeat within a batch (folded in closed form), slots may repeat too.
updates = st.lists(
    st.lists(
        st.tuples(st.integers(-1, SLOTS - 1), st.integers(-1, VOCAB - 1), st.floats(0, 10, width=32)),
        min_size=1,
        max_size=12,
    ),
    min_size=1,
    max_size=6,
)


@settings(deadline=None)
@given(updates, st.sampled_from(["float32", "float16"]))
def test_ema_matches_event_replay_and_falls_back_per_token(batches, dtype):
    ema = DifficultyEMA(beta=0.9, slots=SLOTS, vocab_size=VOCAB, dtype=dtype)
    events = []
    for entries in batches:
        slots, tokens, losses = (torch.tensor(x) for x in zip(*entries))
        ema.update(slots, tokens, losses.float())
        events += entries
    per_sample, per_token = _brute_force_ema(events, 0.9)
    tolerance = 1e-4 if dtype == "float32" else 1e-2
    for slot in range(SLOTS):
        for token in range(VOCAB):
            got = float(ema.lookup(torch.tensor([slot]), torch.tensor([token]))[0])
            want = per_sample.get(slot, per_token.get(token, math.nan))
            assert (math.isnan(want) and math.isnan(got)) or abs(got - want) <= tolerance * max(1.0, abs(want))
    unknown = ema.lookup(torch.tensor([-1, -1]), torch.tensor([-1, VOCAB + 5]))
    assert torch.isnan(unknown).all()


def test_state_dict_round_trip_and_rank_order_equals_one_process():
    """Two ranks folding [rank 0's batch, rank 1's batch] hold what one process holds after the concatenation."""
    rank0 = (torch.tensor([0, 1, -1]), torch.tensor([5, 6, 5]), torch.tensor([1.0, 2.0, 3.0]))
    rank1 = (torch.tensor([3, 0]), torch.tensor([5, 6]), torch.tensor([4.0, 0.5]))
    single = DifficultyEMA(0.9, slots=4, vocab_size=8)
    single.update(*(torch.cat(parts) for parts in zip(rank0, rank1)))
    per_sample, per_token = _brute_force_ema(
        list(zip(*(torch.cat(parts).tolist() for parts in zip(rank0, rank1)))), 0.9
    )
    assert single.values[:4].nan_to_num(-1).tolist() == pytest.approx([per_sample.get(i, -1) for i in range(4)])
    assert single.per_token[[5, 6]].tolist() == pytest.approx([per_token[5], per_token[6]])
    restored = DifficultyEMA(0.5, slots=4, vocab_size=2)
    restored.load_state_dict(single.state_dict())
    assert restored.beta == 0.9
    assert torch.equal(restored.values.nan_to_num(-1), single.values.nan_to_num(-1))
    assert torch.equal(restored.per_token.nan_to_num(-1), single.per_token.nan_to_num(-1))
    with pytest.raises(ValueError, match="slots"):
        DifficultyEMA(0.9, slots=5).load_state_dict(single.state_dict())


def test_targets_and_ordinals():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 9, 2, IGNORE_INDEX]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    targets = shift_targets(labels, mask)
    assert targets.tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX, 9, 2, IGNORE_INDEX, IGNORE_INDEX]]
    assert target_ordinals(targets).tolist() == [[-1, 0, 1, -1, 2, 3, -1, -1]]


def _brute_force_compact(values, kept, side):
    rows = [[v for v, k in zip(vr, kr) if k] for vr, kr in zip(values.tolist(), kept.tolist())]
    width = max(max(len(r) for r in rows), 1)
    return [(r + [None] * (width - len(r))) if side == "right" else ([None] * (width - len(r)) + r) for r in rows]


@given(st.integers(1, 4), st.integers(1, 12), st.sampled_from(["left", "right"]), st.integers(0, 10_000))
def test_compaction_gathers_kept_rows_in_order(batch, length, side, seed):
    gen = torch.Generator().manual_seed(seed)
    kept = torch.rand(batch, length, generator=gen) < 0.6
    plan = plan_compaction(kept, side)
    embeds = torch.randn(batch, length, 3, generator=gen)
    positions = torch.arange(length).expand(batch, length) * 2 + 5
    expected_pos = _brute_force_compact(positions, kept, side)
    got_pos = plan.gather_position_ids(positions)
    got_emb = plan.gather(embeds)
    mask = plan.gather_attention_mask(torch.ones(batch, length, dtype=torch.long))
    for b in range(batch):
        valid = [p is not None for p in expected_pos[b]]
        assert mask[b].bool().tolist() == valid
        assert [p for p, v in zip(got_pos[b].tolist(), valid) if v] == [p for p in expected_pos[b] if p is not None]
        assert torch.equal(got_emb[b][torch.tensor(valid)], embeds[b][kept[b]])
        real = got_pos[b][torch.tensor(valid)]
        assert (real[1:] > real[:-1]).all()


def test_m_rope_position_rows_are_gathered_together():
    kept = torch.tensor([[True, False, True, True], [True, True, False, False]])
    rope = torch.stack([torch.tensor([[0, 1, 1, 4], [0, 1, 2, 3]]) + 10 * r for r in range(3)])  # [3, B, L]
    plan = plan_compaction(kept, "right")
    got = plan.gather_position_ids(rope)
    assert got.shape == (3, 2, 3)
    for r in range(3):
        assert got[r, 0].tolist() == [0 + 10 * r, 1 + 10 * r, 4 + 10 * r]
        assert got[r, 1, :2].tolist() == [0 + 10 * r, 1 + 10 * r]
    assert plan.gather_attention_mask(None).tolist() == [[1, 1, 1], [1, 1, 0]]


def test_nothing_elided_is_the_identity():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    plan = plan_compaction(mask.bool(), "right", mask)
    embeds = torch.randn(2, 4, 3)
    assert plan.identity and plan.gather(embeds) is embeds and plan.gather_position_ids(None) is None
