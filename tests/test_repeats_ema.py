"""`repeats='ema'` end to end on a hand-built batch: a candidate whose target token the row's answer already stated
ranks by the student's EMA alone (its reference loss left out), every other one by (1 - λ)·EMA + λ·reference; each
row keeps exactly the top-k of those scores. The expected kept sets are computed here in plain Python from the
hand-written rows (restatements found by a loop over earlier targets, no plugin function), and the case is checked
to tell 'ema' apart from the default 'score' and from 'last'."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regate_plugin.core import ReGATEConfig, batch_sample_keys
from regate_plugin.store import ReferenceLossCacheWriter
from regate_plugin.strategies import build_token_elision

from .test_selection_wiring import IGNORE, _positions, right_padded

LAM = 0.5
KEEP_RATIO = 0.4
PROMPT_IDS = range(10, 20)
ANSWER_IDS = range(30, 36)  # few answer tokens, so that answers restate some of them
ANSWER_LENGTHS = (14, 11, 16, 9)


def _restated(targets: list[int]) -> set[int]:
    """Positions whose target token is the target of an earlier supervised position of the row."""
    return {
        p
        for p, target in enumerate(targets)
        if target != IGNORE and any(targets[q] == target for q in range(p) if targets[q] != IGNORE)
    }


def _expected(ema: dict[int, float], reference: np.ndarray, candidates: dict[int, int], restated: set[int], rule: str):
    """The kept candidates under `rule`, ranked by score (ties to the earlier position)."""
    score = {p: (1 - LAM) * ema[p] + LAM * float(reference[o]) for p, o in candidates.items()}
    if rule == "ema":
        score.update({p: ema[p] for p in candidates if p in restated})
    tier = {p: int(rule == "last" and p in restated) for p in candidates}
    k = math.ceil(KEEP_RATIO * len(candidates))
    return set(sorted(candidates, key=lambda p: (tier[p], -score[p], p))[:k])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    rng = np.random.default_rng(3)
    rows = []
    for answer_len in ANSWER_LENGTHS:
        prompt = [int(t) for t in rng.choice(PROMPT_IDS, 3)]
        answer = [int(t) for t in rng.choice(ANSWER_IDS, answer_len)]
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    input_ids, labels, mask = right_padded(rows)
    keys = batch_sample_keys(input_ids, labels, mask)
    structure = [_positions(lab) for _, lab in rows]
    # the reference spread wider than the EMA one: a restatement can be kept for its reference loss alone
    references = [rng.uniform(0.0, 8.0, len(ordinal_of)).round(3) for _, ordinal_of, _ in structure]
    emas = [{p: float(rng.uniform(0.0, 2.0)) for p in candidates} for _, _, candidates in structure]
    cache = tmp_path_factory.mktemp("repeats-ema") / "cache"
    with ReferenceLossCacheWriter(
        cache, reference="hand-built", tokenizer_fingerprint="none", reference_mode="gap", dtype="float32"
    ) as writer:
        for key, reference in zip(keys, references):
            writer.add(key, torch.tensor(reference, dtype=torch.float32))
    return {"labels": labels, "mask": mask, "keys": keys, "structure": structure, "references": references,
            "emas": emas, "cache": cache}  # fmt: skip


def _kept(case, rule: str, strategy: str = "regate") -> list[set[int]]:
    """What `strategy` keeps on a sparse step under `repeats=rule`, its EMA holding the hand-picked values."""
    cfg = ReGATEConfig(keep_ratio=KEEP_RATIO, lam=LAM, warmup_steps=0, dense_steps=0, repeats=rule)
    elision = build_token_elision(strategy, cfg, reference=case["cache"])
    elision.ema.ensure_vocab(64)
    for key, (targets, _, candidates), ema in zip(case["keys"], case["structure"], case["emas"]):
        (start,), _ = elision.reference.spans(elision.reference.locate([key]))
        positions = sorted(candidates)
        elision.ema.update(
            torch.tensor([start + candidates[p] for p in positions]),
            torch.tensor([targets[p] for p in positions]),
            torch.tensor([ema[p] for p in positions], dtype=torch.float32),
        )
    plan = elision.plan(case["labels"], case["mask"], case["keys"])
    assert not plan.dense
    kept = plan.kept_mask
    return [{p for p in candidates if bool(kept[row, p])} for row, (_, _, candidates) in enumerate(case["structure"])]


def _expected_sets(case, rule: str) -> list[set[int]]:
    return [
        _expected(ema, reference, candidates, _restated(targets), rule)
        for (targets, _, candidates), reference, ema in zip(case["structure"], case["references"], case["emas"])
    ]


def test_the_case_has_restatements_and_tells_the_rules_apart(case):
    for targets, _, candidates in case["structure"]:
        restated = _restated(targets) & set(candidates)
        assert 0 < len(restated) < len(candidates)
    ema = _expected_sets(case, "ema")
    assert ema != _expected_sets(case, "score") and ema != _expected_sets(case, "last")


@pytest.mark.parametrize("rule", ["ema", "score", "last"])
def test_each_row_keeps_the_top_k_under_its_rule(case, rule):
    assert _kept(case, rule) == _expected_sets(case, rule)


def test_a_restatement_is_kept_while_the_student_gets_it_wrong(case):
    """A restated candidate that the default keeps for its reference loss alone (its EMA zero): 'ema' elides it,
    and keeps it once its EMA is above every score of its row."""

    def with_ema(row: int, p: int, value: float) -> list[dict[int, float]]:
        return [{**ema, p: value} if b == row else ema for b, ema in enumerate(case["emas"])]

    found = [
        (row, p)
        for row, ((targets, _, candidates), reference) in enumerate(zip(case["structure"], case["references"]))
        for p in sorted(_restated(targets) & set(candidates))
        if p in _expected(with_ema(row, p, 0.0)[row], reference, candidates, _restated(targets), "score")
    ]
    assert found
    row, p = found[0]
    assert p in _kept({**case, "emas": with_ema(row, p, 0.0)}, "score")[row]
    assert p not in _kept({**case, "emas": with_ema(row, p, 0.0)}, "ema")[row]
    assert p in _kept({**case, "emas": with_ema(row, p, 100.0)}, "ema")[row]


def test_under_rho_a_restatement_s_score_is_unknown_and_ranks_after_the_known_ones(case):
    """rho's excess loss EMA - reference needs both: with the reference left out, restated candidates rank after
    every other candidate (by position among themselves), unlike rho's default ranking."""
    expected, default = [], []
    for (targets, _, candidates), reference, ema in zip(case["structure"], case["references"], case["emas"]):
        restated = _restated(targets)
        excess = {p: ema[p] - float(reference[o]) for p, o in candidates.items()}
        k = math.ceil(KEEP_RATIO * len(candidates))
        expected.append(
            set(sorted(candidates, key=lambda p: (p in restated, 0 if p in restated else -excess[p], p))[:k])
        )
        default.append(set(sorted(candidates, key=lambda p: (-excess[p], p))[:k]))
    assert expected != default
    assert _kept(case, "ema", "rho") == expected
