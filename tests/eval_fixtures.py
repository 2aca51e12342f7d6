"""Benchmark fixtures we generate ourselves: an MVBench-format root (PyAV videos, a GIF, a JPEG frame folder)
and a tiny HF LLaVA saved with its processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from regate_plugin.eval.mvbench import TASKS

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'video' %}<video>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gray(level: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), level, dtype=np.uint8)


def write_video(path: Path, levels: list[int], fps: int = 10) -> Path:
    """An mp4 whose frame k is uniformly gray at `levels[k]`."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for level in levels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(gray(level), format="rgb24")))
        container.mux(stream.encode())
    return path


def write_gif(path: Path, levels: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(gray(level)) for level in levels]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return path


def write_frame_folder(folder: Path, levels: list[int]) -> Path:
    """`00001.jpg`, `00002.jpg`, ... as TVQA's frames_fps3_hq folders are named."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, level in enumerate(levels, start=1):
        Image.fromarray(gray(level)).save(folder / f"{k:05d}.jpg", quality=95)
    return folder


def _question(i: int, video: str, n_options: int, bounded: bool) -> dict:
    candidates = [f"option {chr(97 + j)} {i}" for j in range(n_options)]
    record = {
        "video": video,
        "question": f"What happens in clip {i}?",
        "candidates": candidates,
        "answer": candidates[i % n_options],
    }
    if bounded:
        record.update(start=0.5, end=3.5)
    return record


def write_mvbench(root: Path, per_task: int = 3) -> Path:
    """Three of the 20 tasks in the official layout: plain videos (Object Existence), bounded videos in the
    `data0613` layout (Action Sequence), and frame folders (Episodic Reasoning); the other 17 are absent."""
    levels = list(range(0, 240, 6))  # 40 frames
    chosen = {"Object Existence": 4, "Action Sequence": 3, "Episodic Reasoning": 5}
    for task in TASKS:
        if task.name not in chosen:
            continue
        media = root / "video" / ("data0613/" if task.name == "Action Sequence" else "") / task.prefix
        records = []
        for i in range(per_task):
            if task.data_type == "frame":
                write_frame_folder(media / f"ep{i}", levels)
                records.append(_question(i, f"ep{i}", chosen[task.name], task.bounded))
            else:
                write_video(media / f"clip{i}.mp4", levels)
                records.append(_question(i, f"clip{i}.mp4", chosen[task.name], task.bounded))
        (root / "json").mkdir(parents=True, exist_ok=True)
        (root / "json" / task.json_file).write_text(json.dumps(records))
    return root


def write_tiny_hf_llava(directory: Path, tokenizer_dir: Path) -> Path:
    """A random tiny LlavaForConditionalGeneration and its LlavaProcessor (image model: frames go in as images)."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
