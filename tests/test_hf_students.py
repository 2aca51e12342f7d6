"""The HF adapter on the newer students (Qwen2.5-VL, InternVL, Qwen3-VL) against each model's own forward.

References, all from the unelided model: its loss and gradients (keep ratio 1); the position ids its own forward
hands the decoder, at the kept positions; and, at keep ratio < 1, its decoder run row by row on the kept tokens
alone (their merged embeddings, original position ids and, for Qwen3-VL, deepstack features), which is the full
forward's loss over the kept targets when no elided token is context for a kept one.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import regate_plugin as rg
from regate_plugin.core import IGNORE_INDEX

from .own_forward import assert_keep_one_is_own_forward, assert_same_grads, grads
from .tiny import (
    IMAGE_TOKEN,
    STUDENTS,
    write_cache_for,
)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("mode", ["none", "regate"])
@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_keep_ratio_one_equals_the_models_own_forward(tmp_path, name, mode, padding_side):
    assert_keep_one_is_own_forward(*STUDENTS[name], padding_side, mode, tmp_path / "cache")


def _decoder_inputs(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword inputs the model's decoder gets in one training forward (recorded by a forward pre-hook)."""
    seen: dict[str, Any] = {}

    def record(module, args, kwargs):
        seen.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        loss = model(**batch).loss
    finally:
        handle.remove()
    return {**seen, "loss": loss}


def _full_position_ids(full: dict[str, Any], length: int) -> torch.Tensor:
    """[R, B, L] position ids of the full forward (the decoder's default 0, 1, ... where it got none)."""
    ids = full["position_ids"]
    if ids is None:
        ids = torch.arange(length).expand(1, full["inputs_embeds"].shape[0], -1)
    return ids if ids.ndim == 3 else ids.unsqueeze(0)


def _elided(tmp_path, name: str, keep_ratio: float, seed: int = 1, visual_labelled: bool = False):
    """A batch, the student, and a copy of it with regate at `keep_ratio`; `visual_labelled` supervises the image
    rows too, so that they become candidates and some are elided."""
    build, make = STUDENTS[name]
    batch = make(batch=3, seed=seed)
    if visual_labelled:
        image = batch["input_ids"] == IMAGE_TOKEN
        batch["labels"] = torch.where(image, batch["input_ids"], batch["labels"])
    reference_model = build(seed=seed)
    reference_model.train()
    model = copy.deepcopy(reference_model)
    cfg = rg.ReGATEConfig(keep_ratio=keep_ratio, warmup_steps=0, dense_steps=0)
    cache = write_cache_for(tmp_path / "cache", [batch])
    rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=cache))
    return batch, reference_model, model


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_kept_tokens_get_the_full_forwards_position_ids(tmp_path, name):
    batch, reference_model, model = _elided(tmp_path, name, keep_ratio=0.3)
    with torch.no_grad():
        full = _decoder_inputs(reference_model, batch)
        seen = _decoder_inputs(model, batch)
        kept = model(**batch).token_elision["kept_mask"]
    length = kept.shape[1]
    full_ids = _full_position_ids(full, length)
    assert 0 < int(kept.sum()) < kept.numel() - int((batch["attention_mask"] == 0).sum())
    if full_ids.shape[0] > 1:  # M-RoPE: the image rows really have 2-D positions
        assert not torch.equal(full_ids[-2], full_ids[-1])
    got, mask = seen["position_ids"], seen["attention_mask"].bool()
    got = got if got.ndim == 3 else got.unsqueeze(0)
    assert got.shape[-1] == mask.shape[1] < length
    for row in range(kept.shape[0]):
        torch.testing.assert_close(got[:, row][:, mask[row]], full_ids[:, row][:, kept[row]], rtol=0, atol=0)


def _kept_tokens_alone_loss(model: Any, batch: dict[str, torch.Tensor], kept_mask: torch.Tensor) -> torch.Tensor:
    """Brute force: each row's kept tokens alone through the model's own decoder, with the merged embeddings,
    position ids (and deepstack features) its full forward computed for them; the mean cross-entropy of the kept
    targets."""
    full = _decoder_inputs(model, batch)
    embeds = full["inputs_embeds"]
    position_ids = _full_position_ids(full, embeds.shape[1])
    visual = full.get("visual_pos_masks")
    deepstack = []
    if visual is not None:  # each layer's [visual rows, D] features, spread back onto their [B, L] positions
        for features in full["deepstack_visual_embeds"]:
            dense = features.new_zeros(*visual.shape, features.shape[-1])
            deepstack.append(dense.masked_scatter(visual.unsqueeze(-1), features))
    targets = torch.full_like(batch["labels"], IGNORE_INDEX)
    targets[:, :-1] = batch["labels"][:, 1:]
    logits, scored = [], []
    for row in range(kept_mask.shape[0]):
        kept = kept_mask[row].nonzero().squeeze(1)
        extra = {}
        if visual is not None:
            rows = visual[row, kept]
            extra = {
                "visual_pos_masks": rows[None],
                "deepstack_visual_embeds": [d[row, kept][rows] for d in deepstack],
            }
        ids = position_ids[:, row, kept][:, None]
        hidden = model.model.language_model(
            inputs_embeds=embeds[row, kept][None],
            attention_mask=torch.ones(1, kept.numel(), dtype=torch.long),
            position_ids=ids if ids.shape[0] > 1 else ids[0],
            **extra,
        ).last_hidden_state[0]
        supervised = targets[row, kept] != IGNORE_INDEX
        logits.append(model.get_output_embeddings()(hidden[supervised]).float())
        scored.append(targets[row, kept][supervised])
    return F.cross_entropy(torch.cat(logits), torch.cat(scored))


@pytest.mark.parametrize("visual_labelled", [False, True])
@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_keep_ratio_half_equals_the_kept_tokens_alone(tmp_path, name, visual_labelled):
    batch, reference_model, model = _elided(tmp_path, name, keep_ratio=0.5, visual_labelled=visual_labelled)
    out = model(**batch)
    assert not out.token_elision["dense"] and 0 < out.token_elision["kept"] < out.token_elision["candidates"]
    image = batch["input_ids"] == IMAGE_TOKEN
    assert bool((image & ~out.token_elision["kept_mask"]).any()) == visual_labelled
    expected = _kept_tokens_alone_loss(reference_model, batch, out.token_elision["kept_mask"])
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    out.loss.backward()
    expected.backward()
    assert_same_grads(grads(model), grads(reference_model))
