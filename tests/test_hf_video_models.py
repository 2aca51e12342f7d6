"""LLaVA-NeXT-Video and Qwen2-VL (3-row M-RoPE) through the HF adapter, against each model's own forward."""

from __future__ import annotations

import copy

import pytest
import torch

import regate_plugin as rg

from .test_hf_llava import _assert_same_grads, _grads
from .tiny import make_qwen2_vl_batch, make_video_batch, tiny_llava_next_video, tiny_qwen2_vl, write_cache_for

MODELS = {
    "llava_next_video": (tiny_llava_next_video, make_video_batch),
    "qwen2_vl": (tiny_qwen2_vl, make_qwen2_vl_batch),
}


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_ratio_one_equals_the_models_own_forward(tmp_path, name, padding_side):
    build, make = MODELS[name]
    batch = make(batch=3, padding_side=padding_side)
    reference_model = build()
    reference_model.train()
    expected = reference_model(**batch)
    expected.loss.backward()

    model = copy.deepcopy(reference_model)
    model.zero_grad(set_to_none=True)
    cfg = rg.ReGATEConfig(keep_ratio=1.0, warmup_steps=0, dense_steps=0)
    rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=write_cache_for(tmp_path / "c", [batch])))
    out = model(**batch)
    out.loss.backward()

    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
    _assert_same_grads(_grads(model), _grads(reference_model))
    assert out.token_elision["kept"] == out.token_elision["candidates"] > 0


def test_qwen2_vl_decoder_gets_the_models_own_mrope_ids_at_kept_positions(tmp_path):
    batch = make_qwen2_vl_batch(batch=3)
    model = tiny_qwen2_vl()
    model.train()
    # Independent reference: the 3-row ids the model itself computes for the full merged batch.
    full_ids, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], None, batch["attention_mask"]
    )
    assert not torch.equal(full_ids[0], full_ids[1])  # the image rows really have 2-D positions

    cfg = rg.ReGATEConfig(keep_ratio=0.3, warmup_steps=0, dense_steps=0)
    rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=write_cache_for(tmp_path / "c", [batch])))
    seen: dict[str, torch.Tensor] = {}

    def record(module, args, kwargs):
        seen["position_ids"], seen["attention_mask"] = kwargs["position_ids"], kwargs["attention_mask"]

    model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)  # runs after the adapter's hook
    out = model(**batch)
    kept = out.token_elision["kept_mask"]
    assert out.token_elision["kept"] < out.token_elision["candidates"]
    position_ids, mask = seen["position_ids"], seen["attention_mask"].bool()
    assert position_ids.shape[-1] == mask.shape[1] < kept.shape[1]
    for row in range(kept.shape[0]):
        got = position_ids[..., row, :][..., mask[row]]
        want = full_ids[..., row, :][..., kept[row]]
        torch.testing.assert_close(got[-3:], want[-3:], rtol=0, atol=0)
