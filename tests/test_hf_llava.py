"""The HF-native adapter (LLaVA, LLaVA-NeXT-Video, Qwen2-VL) against each model's own forward, and LLaVA against
a brute-force masked reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import regate_plugin as rg
from regate_plugin.core import IGNORE_INDEX

from .own_forward import assert_keep_one_is_own_forward, assert_same_grads, grads
from .tiny import (
    IMAGE_TOKEN,
    MODELS,
    difficulty,
    make_batch,
    tiny_llava,
    write_cache_for,
)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("mode", ["none", "regate"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_ratio_one_equals_the_models_own_forward(tmp_path, name, padding_side, mode):
    assert_keep_one_is_own_forward(*MODELS[name], padding_side, mode, tmp_path / "cache")


def _merged_embeddings(model, batch) -> torch.Tensor:
    """The merged [B, L, D] decoder input: token embeddings with the image features in the placeholder slots."""
    inner = model.model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    image = torch.cat(inner.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output)
    slots = (batch["input_ids"] == IMAGE_TOKEN).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(slots, image)


def _kept_tokens_alone_loss(model, batch, kept_mask: torch.Tensor) -> torch.Tensor:
    """Brute force: each row's kept tokens alone, one row at a time, through the unwrapped language model at their
    original position ids (the model's own: 0, 1, ... over the padded row), with an explicit all-ones mask; the mean
    cross-entropy of the kept targets."""
    embeds = _merged_embeddings(model, batch)
    targets = torch.full_like(batch["labels"], IGNORE_INDEX)
    targets[:, :-1] = batch["labels"][:, 1:]
    logits, scored = [], []
    for row in range(kept_mask.shape[0]):
        kept = kept_mask[row].nonzero().squeeze(1)
        hidden = model.model.language_model(
            inputs_embeds=embeds[row, kept][None], attention_mask=torch.ones(1, kept.numel()), position_ids=kept[None]
        ).last_hidden_state[0]
        supervised = targets[row, kept] != IGNORE_INDEX
        logits.append(model.lm_head(hidden[supervised]).float())
        scored.append(targets[row, kept][supervised])
    return F.cross_entropy(torch.cat(logits), torch.cat(scored))


LAYOUTS = {  # batch 1 with no attention mask passed, batches of 3 padded on either side
    "batch1_no_mask": {"batch": 1, "padding_side": "right"},
    "right_padded": {"batch": 3, "padding_side": "right"},
    "left_padded": {"batch": 3, "padding_side": "left"},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_keep_ratio_half_equals_the_kept_tokens_alone(tmp_path, attn, layout):
    """Elided training forward (gradient checkpointing on) = the model's own forward on the kept tokens alone.

    The reference runs with eager attention, row by row. flex_attention has no backward on CPU (torch raises), so
    its case compares the loss under no_grad; eager and sdpa also compare every parameter's gradient."""
    batch = make_batch(seed=1, **LAYOUTS[layout])
    cache = write_cache_for(tmp_path / "cache", [batch])
    if layout == "batch1_no_mask":
        del batch["attention_mask"]
    reference_model = tiny_llava(seed=1, attn="eager")
    reference_model.train()
    model = tiny_llava(seed=1, attn=attn)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    cfg = rg.ReGATEConfig(keep_ratio=0.5, warmup_steps=0, dense_steps=0)
    rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=cache))
    differentiable = attn != "flex_attention"
    with torch.set_grad_enabled(differentiable):
        out = model(**batch)
    report = out.token_elision
    kept_mask = report["kept_mask"]
    assert not report["dense"] and 0 < report["kept"] < report["candidates"]
    # The kept set is the one selection promises: every non-candidate, ceil(0.5 n) candidates per row.
    targets = torch.full_like(batch["labels"], IGNORE_INDEX)
    targets[:, :-1] = batch["labels"][:, 1:]
    candidates = (batch["labels"] != IGNORE_INDEX) & (targets != IGNORE_INDEX)
    valid = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(candidates)
    assert torch.equal(kept_mask | candidates, valid)
    per_row = (kept_mask & candidates).sum(1)
    assert torch.equal(per_row, torch.ceil(candidates.sum(1) / 2).long())

    with torch.set_grad_enabled(differentiable):
        expected = _kept_tokens_alone_loss(reference_model, batch, kept_mask)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    if differentiable:
        out.loss.backward()
        expected.backward()
        assert_same_grads(grads(model), grads(reference_model))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_compacted_row_is_never_read_as_packed_sequences(attn):
    """transformers (>= 4.56) reads gapped position ids as packed-sequence boundaries when no attention mask is
    given. The compact batch of a row passed without a mask has gapped position ids, and the decoder gets an
    explicit mask with it; the same inputs without the mask give other hidden states, so the mask is what keeps
    the row one sequence."""
    batch = make_batch(batch=1, seed=2)
    del batch["attention_mask"]
    model = tiny_llava(seed=2, attn=attn)
    model.train()
    cfg = rg.ReGATEConfig(keep_ratio=0.5, warmup_steps=0, dense_steps=0)
    plan = rg.build_token_elision("random", cfg).plan(batch["labels"])
    positions = plan.compact_position_ids(None)
    assert bool((positions.diff(dim=1) > 1).any())  # gaps where candidates were elided
    mask = plan.compact_attention_mask(None)
    assert mask is not None and bool(mask.all())
    decoder = model.model.language_model
    embeds = plan.compact_embeddings(_merged_embeddings(model, batch))
    with torch.no_grad():

        def run(**kwargs) -> torch.Tensor:  # as the adapter calls it: a training forward, no cache
            return decoder(inputs_embeds=embeds, use_cache=False, **kwargs).last_hidden_state

        with_mask = run(attention_mask=mask, position_ids=positions)
        without = run(position_ids=positions)
        renumbered = run(attention_mask=mask, position_ids=torch.arange(embeds.shape[1])[None])
    assert not torch.allclose(with_mask, without, atol=1e-4)  # packed reading: attention cut at every gap
    assert not torch.allclose(with_mask, renumbered, atol=1e-4)  # and the original positions do matter


def test_eval_mode_and_no_labels_are_bit_identical(tmp_path):
    batch = make_batch(batch=2, seed=2)
    plain = tiny_llava(seed=2)
    wrapped = copy.deepcopy(plain)
    cfg = rg.ReGATEConfig(keep_ratio=0.5, warmup_steps=0, dense_steps=0)
    rg.enable_token_elision(wrapped, rg.build_token_elision("random", cfg))
    plain.eval()
    wrapped.eval()
    with torch.no_grad():
        a, b = plain(**batch), wrapped(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    plain.train()
    wrapped.train()
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(plain(**no_labels).logits, wrapped(**no_labels).logits)


def test_generate_is_unchanged(tmp_path):
    batch = make_batch(batch=2, seed=3, padding_side="left")
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    plain = tiny_llava(seed=3)
    wrapped = copy.deepcopy(plain)
    rg.enable_token_elision(
        wrapped, rg.build_token_elision("regate", rg.ReGATEConfig(), reference=write_cache_for(tmp_path / "c", [batch]))
    )
    plain.eval()
    wrapped.eval()
    expected = plain.generate(**prompt, max_new_tokens=6, do_sample=False)
    actual = wrapped.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(actual, expected)


def test_disable_restores_the_class_forward():
    model = tiny_llava()
    rg.enable_token_elision(model, rg.build_token_elision("none"))
    assert rg.get_token_elision(model) is not None
    rg.disable_token_elision(model)
    assert "forward" not in model.__dict__ and rg.get_token_elision(model) is None


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    batch = make_batch(batch=3, seed=4)
    cache = write_cache_for(tmp_path / "cache", [batch])
    cfg = rg.ReGATEConfig(keep_ratio=0.5, warmup_steps=0, dense_steps=0)
    results = []
    for checkpointing in (False, True):
        model = tiny_llava(seed=4)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=cache))
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), grads(model), out.token_elision["kept_mask"]))
    assert torch.equal(results[0][2], results[1][2])
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    assert_same_grads(results[1][1], results[0][1], atol=1e-6)


def test_ema_learns_from_the_students_losses(tmp_path):
    batch = make_batch(batch=2, seed=5)
    cfg = rg.ReGATEConfig(keep_ratio=0.5, warmup_steps=1, dense_steps=0)
    elision = rg.build_token_elision("regate", cfg, reference=write_cache_for(tmp_path / "cache", [batch]))
    model = tiny_llava(seed=5)
    model.train()
    rg.enable_token_elision(model, elision)
    out = model(**batch)  # step 0: dense, every candidate's loss is observed
    assert out.token_elision["dense"] and elision.ema.observed() == out.token_elision["candidates"]
    # The first observation is the student's own per-token cross-entropy, from the unwrapped forward.
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train()
    targets = torch.full_like(batch["labels"], IGNORE_INDEX)
    targets[:, :-1] = batch["labels"][:, 1:]
    candidates = (batch["labels"] != IGNORE_INDEX) & (targets != IGNORE_INDEX)
    for row, key in enumerate(_keys(batch)):
        positions = candidates[row].nonzero().squeeze(1)
        ordinals = ((targets[row] != IGNORE_INDEX).cumsum(0) - 1)[positions]
        expected = F.cross_entropy(logits[row, positions].float(), targets[row, positions], reduction="none")
        got = difficulty(elision, key, ordinals, targets[row, positions])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    state = elision.state_dict()
    restored = rg.build_token_elision("regate", cfg, reference=tmp_path / "cache")
    restored.load_state_dict(state)
    elision.set_step(1)
    restored.set_step(1)
    assert torch.equal(
        elision.plan(batch["labels"], batch["attention_mask"], _keys(batch)).kept_mask,
        restored.plan(batch["labels"], batch["attention_mask"], _keys(batch)).kept_mask,
    )


def _keys(batch):
    from regate_plugin.core import batch_sample_keys

    return batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])


UNITS = ("target", "pair", "with_input", "loss_only")


@pytest.mark.parametrize("mode", ["regate", "random"])
@pytest.mark.parametrize("unit", UNITS)
def test_keep_ratio_one_equals_the_models_own_forward_for_each_unit(tmp_path, unit, mode):
    """A sparse step that keeps every candidate is the dense forward, whatever the elision unit."""
    batch = make_batch(batch=3, seed=2, padding_side="right")
    reference_model = tiny_llava(seed=2)
    reference_model.train()
    expected = reference_model(**batch)
    expected.loss.backward()
    model = copy.deepcopy(reference_model)
    model.zero_grad(set_to_none=True)
    cfg = rg.ReGATEConfig(keep_ratio=1.0, warmup_steps=0, dense_steps=0, elision_unit=unit)
    kwargs = {"reference": write_cache_for(tmp_path / "cache", [batch])} if mode == "regate" else {}
    rg.enable_token_elision(model, rg.build_token_elision(mode, cfg, **kwargs))
    out = model(**batch)
    out.loss.backward()
    assert not out.token_elision["dense"] and out.token_elision["kept"] == out.token_elision["candidates"] > 0
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
    assert_same_grads(grads(model), grads(reference_model))


@pytest.mark.parametrize("normalization", ["kept", "all"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("mode", ["regate", "random"])
def test_loss_only_equals_the_models_own_forward_with_the_elided_targets_unsupervised(
    tmp_path, mode, padding_side, normalization
):
    """`loss_only` at keep 0.5: every token runs through the decoder, and the loss and gradients are the model's own
    forward with the label of each elided candidate's target set to IGNORE_INDEX (its mean over the kept targets),
    times kept / all targets under `loss_normalization='all'`."""
    batch = make_batch(batch=3, seed=3, padding_side=padding_side)
    cfg = rg.ReGATEConfig(
        keep_ratio=0.5, warmup_steps=0, dense_steps=0, elision_unit="loss_only", loss_normalization=normalization
    )
    kwargs = {"reference": write_cache_for(tmp_path / "cache", [batch])} if mode == "regate" else {}
    model = tiny_llava(seed=3)
    model.train()
    reference_model = copy.deepcopy(model)
    rg.enable_token_elision(model, rg.build_token_elision(mode, cfg, **kwargs))
    out = model(**batch)
    out.loss.backward()
    report = out.token_elision
    targets = torch.full_like(batch["labels"], IGNORE_INDEX)
    targets[:, :-1] = batch["labels"][:, 1:]
    candidates = (batch["labels"] != IGNORE_INDEX) & (targets != IGNORE_INDEX)
    kept = report["kept_candidates"]
    assert not report["dense"] and 0 < report["kept"] < report["candidates"]
    assert torch.equal(kept & ~candidates, torch.zeros_like(kept))
    assert torch.equal(kept.sum(1), torch.ceil(candidates.sum(1) / 2).long())
    assert torch.equal(report["kept_mask"], batch["attention_mask"].bool())  # nothing leaves the forward
    assert report["tokens"] == int(batch["attention_mask"].sum())
    labels = batch["labels"].clone()
    elided = (candidates & ~kept).nonzero()
    labels[elided[:, 0], elided[:, 1] + 1] = IGNORE_INDEX
    expected = reference_model(**{**batch, "labels": labels}).loss
    kept_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if normalization == "all":
        expected = expected * kept_targets / int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    expected.backward()
    assert report["targets"] == kept_targets
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    assert_same_grads(grads(model), grads(reference_model))


def test_pair_keeps_each_kept_target_token_as_an_input_too(tmp_path):
    """`pair` at keep 0.5: the kept set is the top-k of the pair scores (an independent loop over the fused score),
    and the forward is the kept tokens alone, as for `target`."""
    batch = make_batch(batch=3, seed=4)
    cache = write_cache_for(tmp_path / "cache", [batch])
    cfg = rg.ReGATEConfig(keep_ratio=0.5, warmup_steps=0, dense_steps=0, lam=1.0, elision_unit="pair")
    model = tiny_llava(seed=4)
    model.train()
    reference_model = copy.deepcopy(model)
    rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=cache))
    out = model(**batch)
    report = out.token_elision
    targets = torch.full_like(batch["labels"], IGNORE_INDEX)
    targets[:, :-1] = batch["labels"][:, 1:]
    candidates = (batch["labels"] != IGNORE_INDEX) & (targets != IGNORE_INDEX)
    reference = rg.ReferenceLossCache(cache)
    for row, key in enumerate(_keys(batch)):
        losses = reference[key].float().tolist()  # by answer ordinal; lam = 1: the score is the reference loss
        ordinal = ((targets[row] != IGNORE_INDEX).cumsum(0) - 1).tolist()
        positions = candidates[row].nonzero().squeeze(1).tolist()
        score = {p: losses[ordinal[p]] for p in positions}
        paired = {p: max(score[p], score.get(p - 1, -float("inf"))) for p in positions}
        k = -(-len(positions) // 2)
        expected = sorted(positions, key=lambda p: (-paired[p], p))[:k]
        assert report["kept_candidates"][row].nonzero().squeeze(1).tolist() == sorted(expected)
    expected_loss = _kept_tokens_alone_loss(reference_model, batch, report["kept_mask"])
    torch.testing.assert_close(out.loss, expected_loss, atol=1e-5, rtol=0)


def test_ema_observing_dense_steps_only_skips_sparse_steps(tmp_path):
    batch = make_batch(batch=2, seed=5)
    cache = write_cache_for(tmp_path / "cache", [batch])
    model = tiny_llava(seed=5)
    model.train()
    observed = {}
    for observe in ("all", "dense"):
        cfg = rg.ReGATEConfig(keep_ratio=0.5, warmup_steps=1, dense_steps=0, ema_observe=observe)
        elision = rg.build_token_elision("regate", cfg, reference=cache)
        rg.enable_token_elision(model, elision)
        model(**batch)  # step 0: dense
        first = elision.ema.values.clone()
        elision.set_step(1)  # sparse
        assert not model(**batch).token_elision["dense"]
        observed[observe] = not torch.equal(elision.ema.values.nan_to_num(-1), first.nan_to_num(-1))
        rg.disable_token_elision(model)
    assert observed == {"all": True, "dense": False}
