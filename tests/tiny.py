"""Tiny models and batches built from configs, for tests (fp32, CPU, seconds, no hub): LLaVA, LLaVA-NeXT-Video and
the Qwen2-VL, Qwen2.5-VL, Qwen3-VL and InternVL students.

Every batch is `make_batch`'s (one image of `IMAGE_ROWS` rows per sample, or a video of `VIDEO_ROWS`) with the inputs
each model's processor would add: flattened patches and their grid for the Qwen models, 56x56 tiles for InternVL.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from regate_plugin.core import IGNORE_INDEX, batch_sample_keys, shift_targets
from regate_plugin.store import Provenance, ReferenceLossCacheWriter

M = TypeVar("M", bound=PreTrainedModel)

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1
VIDEO_TOKEN = VOCAB - 2
PAD = 0
BOS = 1
EOS = 2
IMAGE_ROWS = 4  # (28 / 14) ** 2 patches, CLS dropped by the "default" feature strategy


def _seeded(model_class: type[M], config: PretrainedConfig, seed: int) -> M:
    """`model_class(config)` with its weights drawn after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return model_class(config)


def _tiny_text(**overrides: object) -> dict:
    """The decoder every tiny model shares: 2 Llama-style layers of width 32 over this module's vocabulary."""
    return {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": PAD,
        **overrides,
    }


def _tiny_clip() -> CLIPVisionConfig:
    """A 1-layer CLIP tower on 28x28 images: 2x2 patches of 14."""
    return CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )


def tiny_llava(
    seed: int = 0,
    attn: str = "sdpa",
    vocab_size: int = VOCAB,
    image_token_id: int = IMAGE_TOKEN,
    pad_token_id: int = PAD,
) -> LlavaForConditionalGeneration:
    """A 2-layer LLaVA with a 1-layer CLIP tower on 28x28 images; the token ids default to this module's."""
    text = _tiny_text(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=BOS, eos_token_id=EOS)
    config = LlavaConfig(
        vision_config=_tiny_clip(),
        text_config=LlamaConfig(**text),
        image_token_id=image_token_id,
        image_seq_length=IMAGE_ROWS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    model = _seeded(LlavaForConditionalGeneration, config, seed)
    model.generation_config.pad_token_id = pad_token_id
    return model


def _sample(
    gen: torch.Generator, turns: int, image_at: int, placeholder: int, rows: int
) -> tuple[list[int], list[int]]:
    """[BOS] instr (image) instr answer EOS (instr answer EOS)...; labels on answers and their EOS only."""
    ids, labels = [BOS], [IGNORE_INDEX]

    def words(n: int) -> list[int]:
        return torch.randint(3, VIDEO_TOKEN, (n,), generator=gen).tolist()

    for turn in range(turns):
        instr = words(int(torch.randint(2, 5, (1,), generator=gen)))
        if turn == 0:
            instr = instr[:image_at] + [placeholder] * rows + instr[image_at:]
        answer = words(int(torch.randint(3, 9, (1,), generator=gen))) + [EOS]
        ids += instr + answer
        labels += [IGNORE_INDEX] * len(instr) + answer
    return ids, labels


def make_batch(
    batch: int = 3,
    seed: int = 0,
    padding_side: str = "right",
    turns: int = 2,
    placeholder: int = IMAGE_TOKEN,
    visual_rows: int = IMAGE_ROWS,
) -> dict[str, torch.Tensor]:
    """A padded multi-turn batch with one image per sample and rows of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = [_sample(gen, turns, i % 2, placeholder, visual_rows) for i in range(batch)]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch, length), PAD)
    labels = torch.full((batch, length), IGNORE_INDEX)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
        input_ids[b, span] = torch.tensor(ids)
        labels[b, span] = torch.tensor(lab)
        mask[b, span] = 1
    pixel_values = torch.randn(batch, 3, 28, 28, generator=gen)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}


def write_cache_for(
    directory: Path,
    batches: list[dict[str, torch.Tensor]],
    seed: int = 0,
    fingerprint: str = "test",
    visual_tokens: int | None = None,
    provenance: Provenance | None = None,
) -> Path:
    """A reference cache with arbitrary (seeded) losses for every sample of `batches`; `visual_tokens` and
    `provenance` are what its manifest records (as `regate precompute` records its settings)."""
    gen = torch.Generator().manual_seed(seed)
    with ReferenceLossCacheWriter(
        directory,
        reference="test",
        tokenizer_fingerprint=fingerprint,
        reference_mode="gap",
        dtype="float32",
        visual_tokens=visual_tokens,
        provenance=provenance,
    ) as writer:
        for batch in batches:
            keys = batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])
            n_targets = (shift_targets(batch["labels"], batch["attention_mask"]) != IGNORE_INDEX).sum(1)
            for key, n in zip(keys, n_targets.tolist()):
                writer.add(key, torch.rand(n, generator=gen) * 5)
    return directory


VIDEO_FRAMES = 2
VIDEO_ROWS = VIDEO_FRAMES * IMAGE_ROWS  # 2x2 patches per frame, no pooling


def tiny_llava_next_video(seed: int = 0) -> LlavaNextVideoForConditionalGeneration:
    config = LlavaNextVideoConfig(
        vision_config=_tiny_clip(),
        text_config=LlamaConfig(**_tiny_text()),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        spatial_pool_stride=1,
        image_grid_pinpoints=[[28, 28]],
    )
    return _seeded(LlavaNextVideoForConditionalGeneration, config, seed)


def make_video_batch(batch: int = 3, seed: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    out = make_batch(batch, seed, padding_side, placeholder=VIDEO_TOKEN, visual_rows=VIDEO_ROWS)
    gen = torch.Generator().manual_seed(seed + 1)
    out.pop("pixel_values")
    out["pixel_values_videos"] = torch.randn(batch, VIDEO_FRAMES, 3, 28, 28, generator=gen)
    return out


QWEN_GRID = (1, 4, 4)  # t, h, w patches; merged 2x2 -> 4 rows per image
QWEN_TOKENS = {"image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN, "vision_start_token_id": VOCAB - 3}
MROPE = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
QWEN_VISION = {  # the vision tower Qwen2.5-VL and Qwen3-VL share: 2 blocks, 2x2 merge
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 32,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def tiny_qwen2_vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    vision = {
        "depth": 1,
        "embed_dim": 16,
        "hidden_size": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    config = Qwen2VLConfig(text_config=_tiny_text(rope_parameters=MROPE), vision_config=vision, **QWEN_TOKENS)
    return _seeded(Qwen2VLForConditionalGeneration, config, seed)


def tiny_qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: window attention in the vision tower's first block, full attention in its second."""
    vision = {**QWEN_VISION, "patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1]}
    text = _tiny_text(rope_parameters=MROPE, bos_token_id=BOS, eos_token_id=EOS)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **QWEN_TOKENS)
    return _seeded(Qwen2_5_VLForConditionalGeneration, config, seed)


def tiny_qwen3_vl(seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL with deepstack: the vision tower's blocks 0 and 1 feed decoder layers 0 and 1 at the visual rows."""
    vision = {**QWEN_VISION, "patch_size": 16, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}
    rope = {**MROPE, "mrope_interleaved": True}
    text = _tiny_text(head_dim=8, rope_parameters=rope, bos_token_id=BOS, eos_token_id=EOS)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **QWEN_TOKENS)
    return _seeded(Qwen3VLForConditionalGeneration, config, seed)


def make_qwen_vl_batch(
    batch: int = 3, seed: int = 0, padding_side: str = "right", patch: int = 14
) -> dict[str, torch.Tensor]:
    """A Qwen-VL batch (flattened patches of `patch` pixels, `QWEN_GRID` per image): Qwen2-VL's and Qwen2.5-VL's."""
    out = make_batch(batch, seed, padding_side)
    gen = torch.Generator().manual_seed(seed + 1)
    t, h, w = QWEN_GRID
    out["pixel_values"] = torch.randn(batch * t * h * w, 3 * 2 * patch * patch, generator=gen)
    out["image_grid_thw"] = torch.tensor([QWEN_GRID] * batch)
    out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).int()
    return out


def make_qwen3_vl_batch(batch: int = 3, seed: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    return make_qwen_vl_batch(batch, seed, padding_side, patch=16)


INTERNVL_TILE = 56  # 4x4 patches of 14, pixel-shuffled by 0.5 -> 4 rows per tile


def tiny_internvl(seed: int = 0) -> InternVLForConditionalGeneration:
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": [INTERNVL_TILE, INTERNVL_TILE],
        "patch_size": [14, 14],
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **_tiny_text()},
        image_token_id=IMAGE_TOKEN,
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    return _seeded(InternVLForConditionalGeneration, config, seed)


def make_internvl_batch(batch: int = 3, seed: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    out = make_batch(batch, seed, padding_side)
    gen = torch.Generator().manual_seed(seed + 1)
    out["pixel_values"] = torch.randn(batch, 3, INTERNVL_TILE, INTERNVL_TILE, generator=gen)
    return out


# Builder and batch maker of each tiny model: the LLaVA-style merges and Qwen2-VL, and the newer students.
MODELS = {
    "llava": (tiny_llava, make_batch),
    "llava_next_video": (tiny_llava_next_video, make_video_batch),
    "qwen2_vl": (tiny_qwen2_vl, make_qwen_vl_batch),
}
STUDENTS = {
    "qwen2_5_vl": (tiny_qwen2_5_vl, make_qwen_vl_batch),
    "internvl": (tiny_internvl, make_internvl_batch),
    "qwen3_vl": (tiny_qwen3_vl, make_qwen3_vl_batch),
}


def difficulty(elision, key: bytes, ordinals: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """What a reference-scored strategy's student EMA holds for one sample's answer tokens (by answer ordinal and
    target id), float32; NaN where it knows nothing (visual slot group 0)."""
    elision.sync()
    (start,), _ = elision.reference.spans(elision.reference.locate([key]))
    device = elision.ema.device
    ordinals = ordinals.to(device).reshape(-1)
    slots = start + ordinals if start >= 0 else torch.full_like(ordinals, -1)
    return elision.ema.lookup(slots, token_ids.to(device).reshape(-1))
