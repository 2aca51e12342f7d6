"""Tiny models and batches built from configs, for tests (fp32, CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from regate_plugin.core import IGNORE_INDEX, ReferenceLossCacheWriter, batch_sample_keys, shift_targets

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1
PAD = 0
BOS = 1
EOS = 2
IMAGE_ROWS = 4  # (28 / 14) ** 2 patches, CLS dropped by the "default" feature strategy


def tiny_llava(seed: int = 0, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=IMAGE_ROWS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD
    return model


def _sample(gen: torch.Generator, turns: int, image_at: int) -> tuple[list[int], list[int]]:
    """[BOS] instr (image) instr answer EOS (instr answer EOS)...; labels on answers and their EOS only."""
    ids, labels = [BOS], [IGNORE_INDEX]

    def words(n: int) -> list[int]:
        return torch.randint(3, IMAGE_TOKEN, (n,), generator=gen).tolist()

    for turn in range(turns):
        instr = words(int(torch.randint(2, 5, (1,), generator=gen)))
        if turn == 0:
            instr = instr[:image_at] + [IMAGE_TOKEN] * IMAGE_ROWS + instr[image_at:]
        answer = words(int(torch.randint(3, 9, (1,), generator=gen))) + [EOS]
        ids += instr + answer
        labels += [IGNORE_INDEX] * len(instr) + answer
    return ids, labels


def make_batch(batch: int = 3, seed: int = 0, padding_side: str = "right", turns: int = 2) -> dict[str, torch.Tensor]:
    """A padded multi-turn batch with one image per sample and rows of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = [_sample(gen, turns, image_at=i % 2) for i in range(batch)]
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


def write_cache_for(directory: Path, batches: list[dict[str, torch.Tensor]], seed: int = 0, fingerprint: str = "test") -> Path:
    """A reference cache with arbitrary (seeded) losses for every sample of `batches`."""
    gen = torch.Generator().manual_seed(seed)
    with ReferenceLossCacheWriter(
        directory, teacher="test", tokenizer_fingerprint=fingerprint, reference_mode="gap", dtype="float32"
    ) as writer:
        for batch in batches:
            keys = batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])
            n_targets = (shift_targets(batch["labels"], batch["attention_mask"]) != IGNORE_INDEX).sum(1)
            for key, n in zip(keys, n_targets.tolist()):
                writer.add(key, torch.rand(n, generator=gen) * 5)
    return directory
