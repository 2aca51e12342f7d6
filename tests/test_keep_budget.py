"""`keep_budget='reference'`: a sparse step keeps, per row, every candidate whose reference loss is above the
threshold (with the candidate after it under `pair` and `with_input`), and at least the keep ratio's count. The rule
is checked against a plain loop over ordinals; the plan that runs against sets computed here from the hand-written
rows and the losses written to the cache (`test_selection_wiring._positions`, no plugin function)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regate_plugin.core import ReGATEConfig, batch_sample_keys
from regate_plugin.core.config import ConfigError
from regate_plugin.core.selection import reference_budget
from regate_plugin.store import ReferenceLossCacheWriter
from regate_plugin.strategies import BatchLayout, build_token_elision

from .test_selection_wiring import IGNORE, _positions, right_padded

THRESHOLD = 0.35
PROMPT_IDS = range(10, 20)
ANSWER_IDS = range(30, 60)
# loss values on both sides of the threshold, and the threshold itself (not above it)
LOSSES = (0.0, 0.01, THRESHOLD, 0.36, 0.7, 2.3)


def _budget_loop(reference: np.ndarray, targets: np.ndarray, threshold: float, with_inputs: bool) -> list[int]:
    counts = []
    for row, n in zip(reference, targets):
        high = {o for o in range(1, int(n)) if not math.isnan(row[o]) and row[o] > threshold}
        if with_inputs:
            high |= {o + 1 for o in high if o + 1 < n}
        counts.append(len(high))
    return counts


@pytest.mark.parametrize("with_inputs", [False, True])
def test_the_rule_matches_a_loop_over_ordinals(with_inputs):
    rng = np.random.default_rng(0)
    for _ in range(200):
        batch, width = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        reference = rng.choice([*LOSSES, float("nan")], size=(batch, width)).astype(np.float32)
        targets = rng.integers(0, width + 1, size=batch)
        threshold = float(rng.choice([0.0, THRESHOLD, 1.0]))
        got = reference_budget(reference, targets, threshold, with_inputs)
        assert got.tolist() == _budget_loop(reference.astype(np.float64), targets, np.float32(threshold), with_inputs)


def _rows(rng: np.random.Generator, lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = []
    for answer_len in lengths:
        prompt = [int(t) for t in rng.choice(PROMPT_IDS, 3)]
        answer = [int(t) for t in rng.choice(ANSWER_IDS, answer_len)]
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return right_padded(rows)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Two batches of the same shape in one cache, each row's reference losses drawn from LOSSES."""
    rng = np.random.default_rng(5)
    batches = []
    for lengths in ((14, 11, 16, 9), (16, 12, 13, 10)):
        input_ids, labels, mask = _rows(rng, lengths)
        structure = [_positions(row.tolist()) for row in labels]
        references = [rng.choice(LOSSES, len(ordinal_of)).astype(np.float32) for _, ordinal_of, _ in structure]
        batches.append(
            {
                "labels": labels,
                "mask": mask,
                "keys": batch_sample_keys(input_ids, labels, mask),
                "structure": structure,
                "references": references,
            }
        )
    cache = tmp_path_factory.mktemp("keep-budget") / "cache"
    with ReferenceLossCacheWriter(
        cache, reference="hand-built", tokenizer_fingerprint="none", reference_mode="gap", dtype="float32"
    ) as writer:
        for batch in batches:
            for key, reference in zip(batch["keys"], batch["references"]):
                writer.add(key, torch.tensor(reference))
    return {"cache": cache, "batches": batches}


def _elision(case, unit: str, keep_ratio: float):
    cfg = ReGATEConfig(
        keep_ratio=keep_ratio,
        warmup_steps=0,
        dense_steps=0,
        elision_unit=unit,
        keep_budget="reference",
        keep_budget_threshold=THRESHOLD,
    )
    elision = build_token_elision("regate", cfg, reference=case["cache"])
    elision.ema.ensure_vocab(64)  # an empty EMA: every candidate ranks by its reference loss
    return elision


def _asked(batch, inputs: bool) -> list[set[int]]:
    """Per row, the candidate positions the reference asks for: loss above the threshold, with the next candidate."""
    out = []
    for (_, _, candidates), reference in zip(batch["structure"], batch["references"]):
        high = {p for p, o in candidates.items() if reference[o] > THRESHOLD}
        out.append(high | {p + 1 for p in high if p + 1 in candidates} if inputs else high)
    return out


def _kept(plan) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in plan.kept_candidates]


@pytest.mark.parametrize("unit", ["target", "pair", "with_input"])
def test_a_sparse_step_keeps_exactly_what_the_reference_asks_for(case, unit):
    elision = _elision(case, unit, keep_ratio=0.01)
    for batch in case["batches"]:
        plan = elision.plan(batch["labels"], batch["mask"], batch["keys"])
        expected = [
            asked or {min(candidates)}  # the floor: ceil(0.01 n) = 1
            for asked, (_, _, candidates) in zip(_asked(batch, unit != "target"), batch["structure"])
        ]
        assert not plan.dense and _kept(plan) == expected
        layout = BatchLayout.of(batch["labels"], batch["mask"])
        supervised = [len(ordinal_of) for _, ordinal_of, _ in batch["structure"]]
        assert elision.kept_target_counts(layout, batch["keys"]).tolist() == [
            n - len(candidates) + len(kept)
            for n, (_, _, candidates), kept in zip(supervised, batch["structure"], expected)
        ]


def test_the_keep_ratio_is_a_floor(case):
    elision = _elision(case, "with_input", keep_ratio=0.9)
    batch = case["batches"][0]
    kept = _kept(elision.plan(batch["labels"], batch["mask"], batch["keys"]))
    asked = _asked(batch, inputs=True)
    counts = [max(len(a), math.ceil(0.9 * len(c))) for a, (_, _, c) in zip(asked, batch["structure"])]
    assert [len(k) for k in kept] == counts
    assert all(a <= k for a, k in zip(asked, kept))
    assert any(len(a) < count for a, count in zip(asked, counts))  # the case exercises the floor


def test_a_count_read_for_one_batch_is_not_reused_for_the_next(case):
    """The Trainer sizes a batch (`kept_target_counts`) before its plan; the next batch, of the same shape, must
    be read afresh."""
    elision = _elision(case, "with_input", keep_ratio=0.01)
    first, second = case["batches"]
    assert _asked(first, True) != _asked(second, True)
    elision.kept_target_counts(BatchLayout.of(first["labels"], first["mask"]), first["keys"])
    plan = elision.plan(second["labels"], second["mask"], second["keys"])
    assert [len(k) for k in _kept(plan)] == [max(len(a), 1) for a in _asked(second, True)]


def test_a_dense_step_keeps_every_candidate(case):
    cfg = ReGATEConfig(keep_ratio=0.01, warmup_steps=1, keep_budget="reference")
    elision = build_token_elision("regate", cfg, reference=case["cache"])
    batch = case["batches"][0]
    plan = elision.plan(batch["labels"], batch["mask"], batch["keys"])
    assert plan.dense and _kept(plan) == [set(c) for _, _, c in batch["structure"]]


def test_the_budget_needs_the_sample_keys(case):
    elision = _elision(case, "with_input", keep_ratio=0.5)
    batch = case["batches"][0]
    with pytest.raises(ValueError, match="keep_budget='reference' needs the batch's sample keys"):
        elision.sparse_keep_counts(BatchLayout.of(batch["labels"], batch["mask"]))


@pytest.mark.parametrize(
    ("field", "value"),
    [("keep_budget", "tokens"), ("keep_budget_threshold", -0.1), ("keep_budget_threshold", math.inf)],
)
def test_bad_settings_name_their_field(field, value):
    with pytest.raises(ConfigError, match=field) as raised:
        ReGATEConfig(**{field: value})
    assert raised.value.field == field


def test_the_summary_states_the_rule(case):
    elision = _elision(case, "pair", keep_ratio=0.2)
    said = elision.describe_keep()
    assert f"above {THRESHOLD} nats with its input" in said and "at least 0.2" in said
    assert "nats" not in build_token_elision("regate", ReGATEConfig(), reference=case["cache"]).describe_keep()
