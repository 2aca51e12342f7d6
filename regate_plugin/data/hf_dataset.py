"""HF-native training data: a LLaVA-format file and its image and video folders as samples whose tokens are the
ones `regate precompute --image-token-id` keys, and the collator that pads them.

A sample is tokenized by the named plugin template, each placeholder expanded into the model's image (or video) token
as many times as the HF processor does and cut at `max_length`: the same three steps, in the same order, as
precompute's `prepare_sample`, so a training key is in the cache built from the same file, template, tokenizer and
settings. A video's rows come from `hf_visual.py`'s per-video rule, the one precompute counts with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..core.compaction import IGNORE_INDEX
from .conversations import Conversation, DataError, iter_conversations
from .hf_visual import HFVideoRows, video_frames, video_rows_of
from .templates import (
    PLACEHOLDER_IDS,
    VICUNA_V1_SYSTEM,
    ConversationTemplate,
    TokenizedSample,
    expand_placeholders,
    get_template,
)
from .visual import DEFAULT_FRAMES

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")  # what the collator joins

V1_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'][0]['text'] %}"
    '{% set messages = messages[1:] %}{% else %}{% set system = "' + VICUNA_V1_SYSTEM + '" %}{% endif %}'
    "{{ system }} {% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""A processor chat template that renders the `v1` template's prompt (Vicuna's system line, `USER: <image>\n...
ASSISTANT:`): set `processor.chat_template` to it so `regate eval --runner hf` asks a `v1`-trained model in the
format it was trained on (content lists of image and text items, as the eval runner sends them)."""


def encode_for_hf(
    conversation: Conversation,
    template: ConversationTemplate,
    tokenizer: Any,
    image_token_id: int,
    rows: int | Sequence[int],
    max_length: int | None,
) -> TokenizedSample:
    """The ids and labels an HF-native model trains on: template, placeholder expansion, then the cut. `rows`: one
    count for every placeholder, or one per placeholder in order (a video's rows depend on its frames)."""
    encoded = template.encode(conversation, tokenizer, max_length)
    placeholders = sum(token in PLACEHOLDER_IDS for token in encoded.input_ids)
    if not isinstance(rows, int) and len(rows) != placeholders:
        raise DataError(
            f"{conversation.where()}: {len(rows)} {conversation.modality} file(s) for {placeholders} placeholder(s) "
            f"as template {template.name!r} tokenizes the text; the model pairs them in order, so the counts must "
            "match (a template that leaves <video> as plain text, such as 'v1', has none: use 'videollama2')"
        )
    sample = expand_placeholders(encoded, image_token_id, rows)
    if max_length is not None:
        sample = TokenizedSample(sample.input_ids[:max_length], sample.labels[:max_length])
    return sample


class LlavaHFDataset(torch.utils.data.Dataset):
    """LLaVA-format `.json` / `.jsonl` + `image_folder` -> `{"input_ids", "labels"[, "pixel_values"]}` per sample.

    `template` is a plugin template name (`v1`, `qwen_1_5`, `videollama2`, ...), the one precompute was given;
    `image_token_id` and `rows` are precompute's `--image-token-id` and `--visual-tokens` (the model's
    `config.image_token_id` and `config.image_seq_length`). Images are read when a sample is fetched, through
    `processor.image_processor`.

    A video sample (`"video"` instead of `"image"`, a template that splices `<video>`, such as `videollama2`) is read
    from `video_folder` (default: `image_folder`) with PyAV, `num_frames` frames sampled by VideoLLaMA2's uniform rule
    (`eval/frames.py`), and given to `processor.video_processor`: the item has its `pixel_values_videos` (and
    `video_grid_thw` where the processor makes one), and each `<video>` becomes `video_token_id` (default: the
    processor's) times the rows the processor makes of that video (`hf_visual.video_rows_of`, the rule precompute
    counts with: `PrecomputeConfig(video_rows=..., video_token_id=...)`). LLaVA-NeXT-Video processors are supported.
    """

    def __init__(
        self,
        data: str | os.PathLike[str],
        image_folder: str | os.PathLike[str],
        processor: Any,
        template: str,
        image_token_id: int,
        rows: int,
        max_length: int | None = None,
        video_folder: str | os.PathLike[str] | None = None,
        num_frames: int = DEFAULT_FRAMES,
        video_token_id: int | None = None,
    ) -> None:
        self.data, self.image_folder = Path(data), Path(image_folder)
        self.video_folder = self.image_folder if video_folder is None else Path(video_folder)
        self.processor, self.template = processor, get_template(template)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id, self.rows, self.max_length = image_token_id, rows, max_length
        self.conversations = list(iter_conversations(self.data))
        self.video_rows: HFVideoRows | None = None
        self.video_token_id = getattr(processor, "video_token_id", None) if video_token_id is None else video_token_id
        if any(conversation.modality == "video" for conversation in self.conversations):
            self._check_video_settings(num_frames)
        for conversation in self.conversations:
            self._check_files(conversation)

    def _check_video_settings(self, num_frames: int) -> None:
        if num_frames < 1:
            raise DataError(f"{self.data}: num_frames must be >= 1 for its video samples, got {num_frames}")
        try:
            self.video_rows = video_rows_of(self.processor, num_frames)
        except DataError as err:
            raise DataError(f"{self.data} has video samples: {err}") from None
        if self.video_token_id is None:
            raise DataError(
                f"{self.data} has video samples and the processor names no video token: pass video_token_id "
                "(the model's config.video_token_id)"
            )

    def _check_files(self, conversation: Conversation) -> None:
        if conversation.modality == "video":
            for name in conversation.visual_files:
                path = self.video_folder / name
                if not path.is_file():
                    raise DataError(
                        f"{conversation.where()}: video {name!r} is not in the video folder {self.video_folder} "
                        "(pass the folder the data file's video paths are relative to)"
                    )
                if path.stat().st_size == 0:
                    raise DataError(f"{conversation.where()}: video {path} is empty (0 bytes); copy or extract it anew")
            return
        for name in conversation.visual_files:
            if not (self.image_folder / name).is_file():
                raise DataError(
                    f"{conversation.where()}: image {name!r} is not in the image folder {self.image_folder} "
                    "(pass the folder the data file's image paths are relative to)"
                )

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        conversation = self.conversations[index]
        if conversation.modality == "video":
            return self._video_item(conversation)
        sample = encode_for_hf(
            conversation, self.template, self.tokenizer, self.image_token_id, self.rows, self.max_length
        )
        item = {"input_ids": torch.tensor(sample.input_ids), "labels": torch.tensor(sample.labels)}
        placeholders = sum(token == self.image_token_id for token in sample.input_ids) // max(self.rows, 1)
        if conversation.visual_files and placeholders:
            images = [self._image(conversation, name) for name in conversation.visual_files]
            if len(images) != placeholders:
                raise DataError(
                    f"{conversation.where()}: {len(images)} image(s) for {placeholders} <image> placeholder(s) left "
                    f"after the cut at {self.max_length} tokens; the model pairs them in order, so the counts must "
                    "match (raise max_length, or shorten the sample)"
                )
            pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            item["pixel_values"] = pixels
        return item

    def _video_item(self, conversation: Conversation) -> dict[str, torch.Tensor]:
        assert self.video_rows is not None and self.video_token_id is not None  # set when the data has videos
        videos = [self._frames(conversation, name) for name in conversation.visual_files]
        rows = [self.video_rows.rows(frames[0].size) for frames in videos]
        sample = encode_for_hf(conversation, self.template, self.tokenizer, self.video_token_id, rows, self.max_length)
        if (kept := sum(token == self.video_token_id for token in sample.input_ids)) != sum(rows):
            raise DataError(
                f"{conversation.where()}: the cut at {self.max_length} tokens leaves {kept} of its videos' {sum(rows)} "
                "rows; the model needs every row of a video (raise max_length, lower num_frames, or shorten the sample)"
            )
        item = {"input_ids": torch.tensor(sample.input_ids), "labels": torch.tensor(sample.labels)}
        processed = self.processor.video_processor(videos, return_tensors="pt")
        item.update({key: processed[key] for key in VISUAL_KEYS if key in processed})
        return item

    def _frames(self, conversation: Conversation, name: str) -> list[Image.Image]:
        assert self.video_rows is not None
        try:
            return video_frames(self.video_folder / name, self.video_rows.num_frames)
        except DataError as err:
            raise DataError(f"{conversation.where()}: {err}") from None

    def _image(self, conversation: Conversation, name: str) -> Image.Image:
        path = self.image_folder / name
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise DataError(f"{conversation.where()}: cannot read image {path}: {err}") from None


class HFVisionCollator:
    """Right-pads `input_ids` with `pad_token_id` and `labels` with IGNORE_INDEX, adds `attention_mask`, and joins
    the batch's `pixel_values`, `pixel_values_videos` and their `image_grid_thw` / `video_grid_thw` along the first
    dimension (in sample order, as the model pairs them with its image and video tokens; a sample without one has
    none, or None as a `datasets.Dataset` column gives it)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(item["input_ids"].numel() for item in items)
        batch = {
            "input_ids": torch.full((len(items), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros(len(items), length, dtype=torch.long),
        }
        for row, item in enumerate(items):
            n = item["input_ids"].numel()
            batch["input_ids"][row, :n], batch["labels"][row, :n] = item["input_ids"], item["labels"]
            batch["attention_mask"][row, :n] = 1
        for key in VISUAL_KEYS:
            if parts := [item[key] for item in items if item.get(key) is not None]:
                batch[key] = torch.cat(parts)
        return batch
