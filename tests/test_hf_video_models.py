"""Qwen2-VL's 3-row M-RoPE ids through the HF adapter (keep-ratio-1 equality for every HF model: test_hf_llava)."""

from __future__ import annotations

import torch

import regate_plugin as rg

from .tiny import make_qwen_vl_batch, tiny_qwen2_vl, write_cache_for


def test_qwen2_vl_decoder_gets_the_models_own_mrope_ids_at_kept_positions(tmp_path):
    batch = make_qwen_vl_batch(batch=3)
    model = tiny_qwen2_vl()
    model.train()
    # Independent reference: the 3-row ids the model itself computes for the full merged batch.
    full_ids, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], None, batch["attention_mask"]
    )
    assert not torch.equal(full_ids[0], full_ids[1])  # the image rows really have 2-D positions

    cfg = rg.ReGATEConfig(keep_ratio=0.3, warmup_steps=0, dense_steps=0)
    rg.enable_token_elision(
        model, rg.build_token_elision("regate", cfg, reference=write_cache_for(tmp_path / "c", [batch]))
    )
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
