"""The demo's training samples (`TrainSample`), encoded from a split (`encode_split`) and batched (`collate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core import IGNORE_INDEX
from ..data import expand_placeholders, get_template, iter_conversations
from ..eval.frames import VisualSource, sample_official
from .config import TEMPLATE
from .tasks import DemoTask


@dataclass
class TrainSample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # [frames, 3, H, W]
    visual: list[bool] = field(default_factory=list)  # per supervised label: it needs the video (test split only)


def collate(rows: list[TrainSample], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of samples, right-padded with `pad_id` (labels with IGNORE_INDEX), their frames concatenated."""
    length = max(len(row.input_ids) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), pad_id),
        "labels": torch.full((len(rows), length), IGNORE_INDEX),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
    }
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        batch["input_ids"][b, :n] = torch.tensor(row.input_ids)
        batch["labels"][b, :n] = torch.tensor(row.labels)
        batch["attention_mask"][b, :n] = 1
    batch["pixel_values"] = torch.cat([row.pixel_values for row in rows])
    return batch


def visual_targets(labels: list[int], tokenizer: Any, answer: str, spans: list[list[int]], where: str) -> list[bool]:
    """Per supervised label: whether its text overlaps one of the answer's `spans` (characters that need the video)."""
    ids = [label for label in labels if label != IGNORE_INDEX]
    ends = [len(tokenizer.decode(ids[: j + 1])) for j in range(len(ids))]
    if not tokenizer.decode(ids).startswith(answer):
        raise ValueError(f"{where}: the supervised tokens do not decode to the answer {answer!r}")
    starts = [0, *ends[:-1]]
    return [any(a < end and start < b for a, b in spans) for start, end in zip(starts, ends)]


def encode_split(
    split_json: Path,
    root: Path,
    tokenizer: Any,
    processor: Any,
    image_token_id: int,
    task: DemoTask,
    num_frames: int,
    progress: bool,
) -> list[TrainSample]:
    """A split's samples as the student trains on them: VideoLLaMA2's template on the chat template, `<video>` or
    `<image>` expanded into the image token once per visual row (as the processor does), a clip's frames sampled by
    the official MVBench rule; with `visual_spans` in a record (the test split), which answer tokens need the
    visual input."""
    template = get_template(TEMPLATE)
    samples = []
    records = json.loads(split_json.read_text())
    conversations = list(iter_conversations(split_json))
    for record, conversation in tqdm(
        list(zip(records, conversations, strict=True)), desc=f"encode {split_json.name}", disable=not progress
    ):
        encoded = expand_placeholders(
            template.encode(conversation, tokenizer), image_token_id, task.visual_rows(num_frames)
        )
        if task.video:
            frames = sample_official(VisualSource(root / record["video"]), num_frames, None)
        else:
            frames = [Image.open(root / record["image"]).convert("RGB")]
        pixels = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
        visual = []
        if "visual_spans" in record:
            where = f"{split_json} record {record['id']}"
            answer = record["conversations"][-1]["value"]
            visual = visual_targets(encoded.labels, tokenizer, answer, record["visual_spans"], where)
        samples.append(TrainSample(encoded.input_ids, encoded.labels, pixels, visual))
    return samples
