"""The selection wiring of `regate`, end to end on a hand-built batch: each row keeps exactly the top-k of
(1 - λ)·EMA + λ·reference computed from its own cache entry at its own answer ordinals, and the student EMA learns
from candidates only.

The expected kept sets are computed here in plain Python / numpy from the hand-written rows (no plugin function
decides them), with λ = 0.2 so that a swapped λ shows, reference losses that are neither symmetric across ordinals
nor shared between rows, and first-answer-token ids that occur nowhere else so that an EMA entry for a
non-candidate target cannot hide behind the per-token fallback.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regate_plugin.core import ReGATEConfig, batch_sample_keys
from regate_plugin.store import ReferenceLossCacheWriter
from regate_plugin.strategies import build_token_elision

from .tiny import difficulty

IGNORE = -100
VOCAB = 128
LAM = 0.2
KEEP_RATIO = 0.5
PROMPT_IDS = range(10, 30)
ANSWER_IDS = range(30, 80)
FIRST_ANSWER_IDS = iter(range(100, 128))  # each used once: the target of a prompt token is never a candidate

# Answer lengths per row (two turns each); row 0 has the most targets.
ROWS = [(7, 6), (5, 6), (6, 4)]
PROMPT_LENGTHS = [(3, 2), (4, 3), (2, 2)]


def _rows(rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each row: prompt (unsupervised) then answer (supervised), twice."""
    rows = []
    for answers, prompts in zip(ROWS, PROMPT_LENGTHS):
        ids, labels = [], []
        for answer_len, prompt_len in zip(answers, prompts):
            prompt = [int(t) for t in rng.choice(PROMPT_IDS, prompt_len)]
            answer = [next(FIRST_ANSWER_IDS)] + [int(t) for t in rng.choice(ANSWER_IDS, answer_len - 1)]
            ids += prompt + answer
            labels += [IGNORE] * prompt_len + answer
        rows.append((ids, labels))
    return rows


def _positions(labels: list[int]) -> tuple[list[int], dict[int, int], dict[int, int]]:
    """Brute force over one unpadded row: (target ids per position, ordinal of each position with a target,
    ordinal of each candidate position). A candidate predicts an answer token from an answer token."""
    targets = [labels[p + 1] if p + 1 < len(labels) else IGNORE for p in range(len(labels))]
    ordinal_of, candidate_ordinal, seen = {}, {}, 0
    for p, target in enumerate(targets):
        if target == IGNORE:
            continue
        ordinal_of[p] = seen
        if labels[p] != IGNORE:
            candidate_ordinal[p] = seen
        seen += 1
    return targets, ordinal_of, candidate_ordinal


def _top_k(scores: dict[int, float]) -> set[int]:
    k = math.ceil(KEEP_RATIO * len(scores))
    return set(sorted(scores, key=lambda p: -scores[p])[:k])


def _expected(ema: dict[int, float], reference: np.ndarray, candidates: dict[int, int], lam: float) -> set[int]:
    return _top_k({p: (1 - lam) * ema[p] + lam * float(reference[o]) for p, o in candidates.items()})


def right_padded(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask) [B, L] of unpadded (ids, labels) rows, padded on the right."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros((len(rows), length), dtype=torch.int64)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for b, (ids, lab) in enumerate(rows):
        input_ids[b, : len(ids)], labels[b, : len(ids)], mask[b, : len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
    return input_ids, labels, mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(7)
    rows = _rows(rng)
    input_ids, labels, mask = right_padded(rows)
    keys = batch_sample_keys(input_ids, labels, mask)

    structure = [_positions(lab) for _, lab in rows]
    # The reference spread is wider than the EMA one, so that at weight λ = 0.2 it still reorders candidates.
    references = [rng.uniform(0.0, 20.0, len(ordinal_of)).round(3) for _, ordinal_of, _ in structure]
    emas = [{p: float(rng.uniform(0.0, 3.0)) for p in candidates} for _, _, candidates in structure]

    cache = tmp_path_factory.mktemp("wiring") / "cache"
    with ReferenceLossCacheWriter(
        cache, reference="hand-built", tokenizer_fingerprint="none", reference_mode="gap", dtype="float32"
    ) as writer:
        for key, reference in zip(keys, references):
            writer.add(key, torch.tensor(reference, dtype=torch.float32))
    return {
        "batch": (input_ids, labels, mask),
        "keys": keys,
        "structure": structure,
        "references": references,
        "emas": emas,
        "cache": cache,
    }


def _seeded_elision(setup):
    """`regate` on a sparse step, its EMA holding the hand-picked difficulty of every candidate ordinal."""
    cfg = ReGATEConfig(keep_ratio=KEEP_RATIO, lam=LAM, warmup_steps=0, dense_steps=0, ema_beta=0.9)
    elision = build_token_elision("regate", cfg, reference=setup["cache"])
    for key, (targets, _, candidates), ema in zip(setup["keys"], setup["structure"], setup["emas"]):
        positions = sorted(candidates)
        (start,), _ = elision.reference.spans(elision.reference.locate([key]))  # the sample's first EMA slot
        elision.ema.ensure_vocab(VOCAB)
        elision.ema.update(
            torch.tensor([start + candidates[p] for p in positions]),
            torch.tensor([targets[p] for p in positions]),
            torch.tensor([ema[p] for p in positions], dtype=torch.float32),
        )
    return elision


def test_the_hand_built_case_tells_the_wirings_apart(setup):
    """The case is sensitive: each wrong wiring would keep another set in at least one row."""
    expected, swapped, reversed_, row0 = [], [], [], []
    reference0 = setup["references"][0]
    for (_, _, candidates), reference, ema in zip(setup["structure"], setup["references"], setup["emas"]):
        expected.append(_expected(ema, reference, candidates, LAM))
        swapped.append(_expected(ema, reference, candidates, 1 - LAM))
        reversed_.append(_expected(ema, reference[::-1], candidates, LAM))
        row0.append(_expected(ema, reference0, candidates, LAM))
    assert swapped != expected and reversed_ != expected and row0 != expected
    assert all(len(set(ema.values())) == len(ema) for ema in setup["emas"])  # no ties to break


def test_each_row_keeps_the_top_k_of_its_own_fused_score(setup):
    input_ids, labels, mask = setup["batch"]
    elision = _seeded_elision(setup)
    plan = elision.plan(labels, mask, setup["keys"])
    assert not plan.dense
    for row, ((_, _, candidates), reference, ema) in enumerate(
        zip(setup["structure"], setup["references"], setup["emas"])
    ):
        kept = {p for p in candidates if bool(plan.kept_mask[row, p])}
        assert kept == _expected(ema, reference, candidates, LAM), f"row {row}"
        # Every target that is not a candidate, and every real token, stays.
        assert all(bool(plan.kept_mask[row, p]) for p in range(int(mask[row].sum())) if p not in candidates)


def test_the_ema_learns_from_candidates_only(setup):
    input_ids, labels, mask = setup["batch"]
    elision = _seeded_elision(setup)
    plan = elision.plan(labels, mask, setup["keys"])
    compact = plan.compact_targets()
    hidden = torch.randn(*compact.shape, 16, generator=torch.Generator().manual_seed(0))
    head = torch.nn.Linear(16, VOCAB)
    elision.loss(plan, hidden, head)
    for row, (key, (targets, ordinal_of, candidates)) in enumerate(zip(setup["keys"], setup["structure"])):
        others = sorted(set(ordinal_of) - set(candidates))  # targets of prompt tokens: first answer tokens
        assert others, "each row has non-candidate targets"
        learned = difficulty(
            elision, key, torch.tensor([ordinal_of[p] for p in others]), torch.tensor([targets[p] for p in others])
        )
        assert torch.isnan(learned).all(), f"row {row}: the EMA learned non-candidate targets {learned.tolist()}"
        kept = sorted(p for p in candidates if bool(plan.kept_mask[row, p]))
        values = difficulty(
            elision, key, torch.tensor([candidates[p] for p in kept]), torch.tensor([targets[p] for p in kept])
        )
        seeded = torch.tensor([setup["emas"][row][p] for p in kept])
        assert not torch.isnan(values).any() and not torch.allclose(values, seeded), f"row {row}: kept not observed"
