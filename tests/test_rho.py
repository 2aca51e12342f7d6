"""`rho`, Rho-1's excess-loss selection: exact at keep 1.0 (loss and gradients are the model's own unelided
forward), and on a sparse step each row keeps the top-k of its student EMA minus its reference loss, as a
brute-force numpy ranking of the hand-seeded values says; built from the training flags like any strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regate_plugin.core import IGNORE_INDEX, ReferenceScoredConfig, batch_sample_keys
from regate_plugin.store import ReferenceLossCacheWriter
from regate_plugin.strategies import RhoElision, build_token_elision

from .own_forward import assert_keep_one_is_own_forward
from .tiny import MODELS, make_batch, write_cache_for


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_ratio_one_equals_the_models_own_forward(tmp_path, name, padding_side):
    config = ReferenceScoredConfig(keep_ratio=1.0, warmup_steps=0, dense_steps=0)
    report = assert_keep_one_is_own_forward(*MODELS[name], padding_side, "rho", tmp_path / "cache", config)
    assert not report["dense"]


def _brute_force_kept(labels: np.ndarray, valid: np.ndarray, ema: dict[int, float], reference: np.ndarray, ratio):
    """One row, from scratch: the candidates (an answer token predicting an answer token), each one's excess
    ema - reference at its answer ordinal (unknown where the EMA has no value), and the top ceil(ratio * n) by
    excess, ties to the earlier position, unknown ones last."""
    row = labels[valid]
    offset = int(np.flatnonzero(valid)[0])
    targets = np.append(row[1:], IGNORE_INDEX)
    ordinals = np.cumsum(targets != IGNORE_INDEX) - 1
    candidates = [p for p in range(row.size) if row[p] != IGNORE_INDEX and targets[p] != IGNORE_INDEX]
    excess = {p: ema[p] - reference[ordinals[p]] if p in ema else -math.inf for p in candidates}
    k = max(1, math.ceil(round(ratio * len(candidates), 9))) if candidates else 0
    ranked = sorted(candidates, key=lambda p: (-excess[p], p))
    return {offset + p for p in ranked[:k]}, candidates, ordinals


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_each_row_keeps_the_top_k_of_its_excess_loss(tmp_path, padding_side, ratio):
    rng = np.random.default_rng(int(ratio * 10))
    batch = make_batch(batch=4, seed=11, padding_side=padding_side, turns=3)
    labels, mask = batch["labels"], batch["attention_mask"]
    keys = batch_sample_keys(batch["input_ids"], labels, mask)
    rows = zip(labels.numpy(), mask.numpy().astype(bool))
    n_targets = [int((np.append(row[valid][1:], IGNORE_INDEX) != IGNORE_INDEX).sum()) for row, valid in rows]
    references = [rng.uniform(0.0, 6.0, n).astype(np.float32) for n in n_targets]
    with ReferenceLossCacheWriter(
        tmp_path / "cache", reference="hand-built", tokenizer_fingerprint="none", reference_mode="gap", dtype="float32"
    ) as writer:
        for key, reference in zip(keys, references):
            writer.add(key, torch.from_numpy(reference))
    cfg = ReferenceScoredConfig(keep_ratio=ratio, warmup_steps=0, dense_steps=0)
    elision = build_token_elision("rho", cfg, reference=tmp_path / "cache")
    assert isinstance(elision, RhoElision)

    expected, slots, values, unknown = [], [], [], 0
    for b in range(labels.shape[0]):
        valid = mask[b].numpy().astype(bool)
        _, candidates, ordinals = _brute_force_kept(labels[b].numpy(), valid, {}, references[b], ratio)
        # Seed the EMA of most candidates (the rest stay unknown) through the public update, per sample slot only.
        seeded = {p: float(np.float32(rng.uniform(0.0, 6.0))) for p in candidates if rng.uniform() < 0.8}
        (start,), _ = elision.reference.spans(elision.reference.locate([keys[b]]))
        slots += [start + int(ordinals[p]) for p in seeded]
        values += list(seeded.values())
        unknown += len(candidates) - len(seeded)
        expected.append(_brute_force_kept(labels[b].numpy(), valid, seeded, references[b], ratio)[0])
    elision.ema.update(torch.tensor(slots), torch.full((len(slots),), -1), torch.tensor(values, dtype=torch.float32))

    assert unknown > 0  # the rule for candidates without an EMA value is exercised too
    plan = elision.plan(labels, mask, keys)
    assert not plan.dense
    for b in range(labels.shape[0]):
        kept = set(plan.kept_candidates[b].nonzero().squeeze(1).tolist())
        assert kept == expected[b], f"row {b}"


def test_rho_is_built_from_the_training_flags(tmp_path):
    from regate_plugin.core import ConfigError
    from regate_plugin.training import TokenElisionArguments

    cache = write_cache_for(tmp_path / "cache", [make_batch()])
    args = TokenElisionArguments(token_elision="rho", regate_ref_cache=str(cache), regate_lambda=0.9)
    elision = args.build()
    assert elision.name == "rho" and type(elision.cfg) is ReferenceScoredConfig  # λ is not rho's
    assert elision.capabilities.reference is not None and elision.capabilities.learns
    with pytest.raises(ConfigError, match="--token_elision rho needs --regate_ref_cache"):
        TokenElisionArguments(token_elision="rho").build()
