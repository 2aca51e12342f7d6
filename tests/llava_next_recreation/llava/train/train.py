"""Upstream llava/train/train.py, reduced to what the plugin meets: the argument dataclasses (with
`TrainingArguments.attn_implementation`), `preprocess_multimodal`, `preprocess_qwen`, the collator's `image_sizes` /
`modalities`, and a `train()` that reads the attention implementation from `TrainingArguments` and builds
`LlavaQwenForCausalLM` (no vision tower: the re-creation trains text samples; the merge is in llava/model)."""

import copy
import json
import re
from dataclasses import dataclass, field

import torch
import transformers
from torch.utils.data import Dataset

from llava import conversation as conversation_lib
from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
from llava.train.llava_trainer import LLaVATrainer


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None)
    version: str | None = field(default="v0")
    mm_patch_merge_type: str | None = field(default="flat")


@dataclass
class DataArguments:
    data_path: str = field(default=None)
    image_folder: str | None = field(default=None)
    is_multimodal: bool = False
    image_aspect_ratio: str = "square"
    image_grid_pinpoints: str | None = field(default=None)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=512)
    attn_implementation: str = field(default="flash_attention_2")


def preprocess_multimodal(sources, data_args):
    """A lone `<image>` is moved to the front of its turn (wrapped in `<Image>...</Image>` under an `mmtag`
    conversation), every `<image>` becomes `<im_start><image><im_end>` under `mm_use_im_start_end` (which train() copies
    onto data_args; read here with a False default), then one dataset's noise marker is deleted; every turn is read by
    its "value"."""
    if not data_args.is_multimodal:
        return sources
    for source in sources:
        for sentence in source:
            if len(re.findall(DEFAULT_IMAGE_TOKEN, sentence["value"])) == 1 and not sentence["value"].startswith(
                DEFAULT_IMAGE_TOKEN
            ):
                rest = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                sentence["value"] = (DEFAULT_IMAGE_TOKEN + "\n" + rest).strip()
                if "mmtag" in conversation_lib.default_conversation.version:
                    sentence["value"] = sentence["value"].replace(
                        DEFAULT_IMAGE_TOKEN, "<Image>" + DEFAULT_IMAGE_TOKEN + "</Image>"
                    )
            if getattr(data_args, "mm_use_im_start_end", False):
                sentence["value"] = sentence["value"].replace(
                    DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
                )
            sentence["value"] = sentence["value"].replace("QA_GT_caption_based_noisy", "")
    return sources


QWEN_TURN_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def preprocess_qwen(sources, tokenizer, has_image=False, max_len=2048, system_message="You are a helpful assistant."):
    """ChatML one turn at a time on a copy of the tokenizer; user/system turns masked, assistant turns supervised,
    <|im_start|>, <|im_end|> and id 198 always supervised, `<image>` replaced by -200. The first turn is read by its
    "from" key; later turns by "role"/"content", else "from"/"value"."""
    roles = {"human": "user", "gpt": "assistant"}
    tokenizer = copy.deepcopy(tokenizer)
    if has_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    # upstream unpacks `tokenizer.additional_special_tokens_ids` (transformers 4.x); these are its two entries
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    unmask = [198, im_start, im_end]
    tokenizer.chat_template = QWEN_TURN_TEMPLATE

    def encode(messages):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))

    input_ids, targets = [], []
    for source in sources:
        if roles[source[0]["from"]] != roles["human"]:
            source = source[1:]
        ids = encode([{"role": "system", "content": system_message}])
        labels = [IGNORE_INDEX] * len(ids)
        for turn in source:
            try:
                role, content = turn["role"], turn["content"]
            except KeyError:
                role, content = turn["from"], turn["value"]
            role = roles.get(role, role)
            piece = encode([{"role": role, "content": content}])
            ids += piece
            labels += [IGNORE_INDEX] * len(piece) if role in ["user", "system"] else piece
        for n, token in enumerate(ids):
            if token in unmask:
                labels[n] = token
            if token == image_token_index:
                ids[n] = IMAGE_TOKEN_INDEX
        input_ids.append(ids)
        targets.append(labels)
    return dict(input_ids=torch.tensor(input_ids, dtype=torch.long), labels=torch.tensor(targets, dtype=torch.long))


class LazySupervisedDataset(Dataset):
    """Text samples of a JSON list, tokenised with `preprocess_qwen` (images are not loaded by the re-creation)."""

    def __init__(self, data_path, tokenizer, data_args):
        with open(data_path) as handle:
            self.samples = json.load(handle)
        self.tokenizer, self.data_args = tokenizer, data_args

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        encoded = preprocess([copy.deepcopy(self.samples[i]["conversations"])], self.tokenizer)
        return dict(input_ids=encoded["input_ids"][0], labels=encoded["labels"][0])


@dataclass
class DataCollatorForSupervisedDataset:
    """Padding on the tokenizer's side (left by flipping, as upstream's `pad_sequence`), truncation to
    model_max_length, pad id 0 when the tokenizer has none; with images, `image_sizes` and `modalities` per image."""

    tokenizer: transformers.PreTrainedTokenizer

    def pad_sequence(self, sequences, padding_value):
        left = self.tokenizer.padding_side == "left"
        if left:
            sequences = [torch.flip(x, [0]) for x in sequences]
        padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=padding_value)
        return torch.flip(padded, [1]) if left else padded

    def __call__(self, instances):
        limit = self.tokenizer.model_max_length
        ids = [x["input_ids"][:limit] for x in instances]
        labels = [x["labels"][:limit] for x in instances]
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = 0
        ids = self.pad_sequence(ids, self.tokenizer.pad_token_id)
        labels = self.pad_sequence(labels, IGNORE_INDEX)
        labels = labels.long() if labels.dtype == torch.int32 else labels
        batch = dict(input_ids=ids, labels=labels, attention_mask=ids.ne(self.tokenizer.pad_token_id))
        if "image" in instances[0]:
            images = [im for x in instances for im in x["image"]]  # (tensor, (width, height), "image"|"video")
            batch["image_sizes"] = [im[1] for im in images]
            batch["modalities"] = [im[2] for im in images]
            batch["images"] = [im[0] for im in images]
        return batch


def preprocess(sources, tokenizer, has_image=False):
    """Upstream `preprocess` dispatches on `default_conversation`; only its `qwen` branch is re-created."""
    if conversation_lib.default_conversation.version == "qwen":
        return preprocess_qwen(sources, tokenizer, has_image=has_image)
    raise NotImplementedError(
        f"the re-creation has no preprocess for conversation version {conversation_lib.default_conversation.version!r}"
    )


def train(attn_implementation=None):
    """The `attn_implementation` argument is ignored, as upstream: the model is built with the dataclass field."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    assert training_args.attn_implementation
    # upstream: torch_dtype=(torch.bfloat16 if bf16 else None); transformers 5 names it `dtype` (default: the
    # checkpoint's, which for the fp32 test checkpoints is 4.40's default too)
    dtype = {"dtype": torch.bfloat16} if training_args.bf16 else {}
    model = LlavaQwenForCausalLM.from_pretrained(
        model_args.model_name_or_path, attn_implementation=training_args.attn_implementation, **dtype
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, model_max_length=training_args.model_max_length, padding_side="right"
    )
    if model_args.version == "v0.5":  # upstream lines 1553-1568 (v0 keeps the default, vicuna_v0)
        tokenizer.pad_token = tokenizer.unk_token
    elif model_args.version != "v0":
        if tokenizer.unk_token is not None:  # Qwen2's has none on transformers 4.40
            tokenizer.pad_token = tokenizer.unk_token
        conversation_lib.default_conversation = conversation_lib.conv_templates.get(
            model_args.version, conversation_lib.conv_templates["vicuna_v1"]
        )
    dataset = LazySupervisedDataset(data_args.data_path, tokenizer, data_args)
    trainer = LLaVATrainer(
        model=model,
        processing_class=tokenizer,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer),
    )
    trainer.train()
    trainer.save_state()


if __name__ == "__main__":
    train()
