import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regate_plugin.core import DifficultyEMA, plan_compaction, sample_key, shift_targets, target_ordinals
from regate_plugin.core.compaction import IGNORE_INDEX

KEY_A = sample_key([1, 2, 3], [False, True, True])
KEY_B = sample_key([1, 2, 4], [False, True, True])


def _brute_force_ema(events, beta):
    """Replay (key, ordinal, token, loss) events one by one into plain dicts."""
    per_sample, per_token = {}, {}
    for key, ordinal, token, loss in events:
        for table, k in ((per_sample, (key, ordinal)), (per_token, token)):
            table[k] = loss if k not in table else beta * table[k] + (1 - beta) * loss
    return per_sample, per_token


updates = st.lists(
    st.tuples(
        st.sampled_from([KEY_A, KEY_B]),
        st.lists(
            st.tuples(st.integers(0, 5), st.integers(0, 7), st.floats(0, 10)),
            min_size=1,
            max_size=6,
            unique_by=lambda t: t[0],
        ),
    ),
    min_size=1,
    max_size=8,
)


@settings(deadline=None)
@given(updates)
def test_ema_matches_event_replay_and_falls_back_per_token(batches):
    ema = DifficultyEMA(beta=0.9)
    events = []
    for key, entries in batches:
        ordinals, tokens, losses = (torch.tensor(x) for x in zip(*entries))
        ema.update(key, ordinals, tokens, losses.float())
        events += [(key, o, t, float(torch.tensor(loss, dtype=torch.float32))) for o, t, loss in entries]
    per_sample, per_token = _brute_force_ema(events, 0.9)
    for key in (KEY_A, KEY_B):
        got = ema.lookup(key, torch.arange(6), torch.arange(6))
        for ordinal in range(6):
            want = per_sample.get((key, ordinal), per_token.get(ordinal, math.nan))
            assert (math.isnan(want) and math.isnan(got[ordinal])) or abs(got[ordinal] - want) < 1e-4
    unseen = sample_key([9], [True])
    got = ema.lookup(unseen, torch.tensor([0, 1]), torch.tensor([3, 100]))
    assert math.isnan(got[1]) and (
        (3 not in per_token and math.isnan(got[0])) or abs(got[0] - per_token.get(3, 0)) < 1e-4
    )


def test_state_dict_round_trip_and_merge_from_another_rank():
    rank0, rank1 = DifficultyEMA(0.9), DifficultyEMA(0.9)
    rank0.update(KEY_A, torch.tensor([0, 1]), torch.tensor([5, 6]), torch.tensor([1.0, 2.0]))
    rank1.update(KEY_B, torch.tensor([0]), torch.tensor([5]), torch.tensor([4.0]))
    sent0, sent1 = rank0.drain_pending(), rank1.drain_pending()
    rank0.merge(sent1)
    rank1.merge(sent0)
    single = DifficultyEMA(0.9)
    single.merge(sent0 + sent1)
    for ema in (rank1, single):
        for key in (KEY_A, KEY_B):
            assert torch.equal(
                ema.lookup(key, torch.arange(2), torch.tensor([5, 6])).nan_to_num(-1),
                single.lookup(key, torch.arange(2), torch.tensor([5, 6])).nan_to_num(-1),
            )
    assert rank0.drain_pending() == []  # merged updates are not sent on again
    restored = DifficultyEMA(0.5)
    restored.load_state_dict(rank0.state_dict())
    assert restored.beta == 0.9 and len(restored) == 2
    assert torch.equal(
        restored.lookup(KEY_A, torch.arange(3), torch.tensor([5, 6, 7])).nan_to_num(-1),
        rank0.lookup(KEY_A, torch.arange(3), torch.tensor([5, 6, 7])).nan_to_num(-1),
    )


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
