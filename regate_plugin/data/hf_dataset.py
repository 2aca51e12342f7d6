"""HF-native training data: a LLaVA-format file and its image folder as samples whose tokens are the ones
`regate precompute --image-token-id` keys, and the collator that pads them.

A sample is tokenized by the named plugin template, each placeholder expanded into `rows` copies of the model's image
token (as the HF processor does) and cut at `max_length`: the same three steps, in the same order, as precompute's
`prepare_sample`, so a training key is in the cache built from the same file, template, tokenizer and settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..core.compaction import IGNORE_INDEX
from .conversations import Conversation, DataError, iter_conversations
from .templates import VICUNA_V1_SYSTEM, ConversationTemplate, TokenizedSample, expand_placeholders, get_template

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
    rows: int,
    max_length: int | None,
) -> TokenizedSample:
    """The ids and labels an HF-native model trains on: template, placeholder expansion, then the cut."""
    sample = expand_placeholders(template.encode(conversation, tokenizer, max_length), image_token_id, rows)
    if max_length is not None:
        sample = TokenizedSample(sample.input_ids[:max_length], sample.labels[:max_length])
    return sample


class LlavaHFDataset(torch.utils.data.Dataset):
    """LLaVA-format `.json` / `.jsonl` + `image_folder` -> `{"input_ids", "labels"[, "pixel_values"]}` per sample.

    `template` is a plugin template name (`v1`, `qwen_1_5`, `videollama2`, ...), the one precompute was given;
    `image_token_id` and `rows` are precompute's `--image-token-id` and `--visual-tokens` (the model's
    `config.image_token_id` and `config.image_seq_length`). Images are read when a sample is fetched, through
    `processor.image_processor`. Video samples are refused: use precompute and a dataset of your own for them.
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
    ) -> None:
        self.data, self.image_folder = Path(data), Path(image_folder)
        self.processor, self.template = processor, get_template(template)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id, self.rows, self.max_length = image_token_id, rows, max_length
        self.conversations = list(iter_conversations(self.data))
        for conversation in self.conversations:
            self._check_files(conversation)

    def _check_files(self, conversation: Conversation) -> None:
        if conversation.modality == "video":
            raise DataError(
                f"{conversation.where()}: video samples are not supported by LlavaHFDataset (images and text only); "
                "drop them from the file or build their pixel_values_videos yourself"
            )
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

    def _image(self, conversation: Conversation, name: str) -> Image.Image:
        path = self.image_folder / name
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise DataError(f"{conversation.where()}: cannot read image {path}: {err}") from None


class HFVisionCollator:
    """Right-pads `input_ids` with `pad_token_id` and `labels` with IGNORE_INDEX, adds `attention_mask`, and stacks
    the batch's `pixel_values` (images in sample order, as the model pairs them with its image tokens; a text-only
    sample has none, or None as a `datasets.Dataset` column gives it)."""

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
        pixels = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch
