"""Tiny Qwen2.5-VL, Qwen3-VL and InternVL models and batches built from configs, for tests (fp32, CPU, no hub).

Every batch is `tiny.make_batch`'s (one image of `IMAGE_ROWS` rows per sample) with the inputs each model's
processor would add: flattened patches and their grid for the Qwen models, 56x56 tiles for InternVL.
"""

from __future__ import annotations

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from .tiny import BOS, EOS, IMAGE_TOKEN, QWEN_GRID, VIDEO_TOKEN, VOCAB, _tiny_text, make_batch

MROPE = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}


def tiny_qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: window attention in the vision tower's first block, full attention in its second."""
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=_tiny_text(rope_parameters=MROPE, bos_token_id=BOS, eos_token_id=EOS),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VOCAB - 3,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen3_vl(seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL with deepstack: the vision tower's blocks 0 and 1 feed decoder layers 0 and 1 at the visual rows."""
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    text = _tiny_text(
        head_dim=8, rope_parameters={**MROPE, "mrope_interleaved": True}, bos_token_id=BOS, eos_token_id=EOS
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VOCAB - 3,
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config)


INTERNVL_TILE = 56  # 4x4 patches of 14, pixel-shuffled by 0.5 -> 4 rows per tile


def tiny_internvl(seed: int = 0) -> InternVLForConditionalGeneration:
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[INTERNVL_TILE, INTERNVL_TILE],
        patch_size=[14, 14],
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **_tiny_text()},
        image_token_id=IMAGE_TOKEN,
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config)


def make_qwen_vl_batch(
    batch: int = 3, seed: int = 0, padding_side: str = "right", patch: int = 14
) -> dict[str, torch.Tensor]:
    """A Qwen2-VL-style batch (flattened patches of `patch` pixels, `QWEN_GRID` per image)."""
    out = make_batch(batch, seed, padding_side)
    gen = torch.Generator().manual_seed(seed + 1)
    t, h, w = QWEN_GRID
    out["pixel_values"] = torch.randn(batch * t * h * w, 3 * 2 * patch * patch, generator=gen)
    out["image_grid_thw"] = torch.tensor([QWEN_GRID] * batch)
    out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).int()
    return out


def make_qwen3_vl_batch(batch: int = 3, seed: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    return make_qwen_vl_batch(batch, seed, padding_side, patch=16)


def make_internvl_batch(batch: int = 3, seed: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    out = make_batch(batch, seed, padding_side)
    gen = torch.Generator().manual_seed(seed + 1)
    out["pixel_values"] = torch.randn(batch, 3, INTERNVL_TILE, INTERNVL_TILE, generator=gen)
    return out
