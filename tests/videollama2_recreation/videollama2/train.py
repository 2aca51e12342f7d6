# A minimal re-creation of VideoLLaMA2's videollama2/train.py for tests; see ../README.md.
import copy
import json
import os
import pathlib
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import transformers
from torch.utils.data import Dataset

sys.path.append("./")
from videollama2.constants import IGNORE_INDEX, MODAL_INDEX_MAP, NUM_FRAMES  # noqa: E402
from videollama2.mm_utils import process_image, process_video, tokenizer_multimodal_token  # noqa: E402
from videollama2.model import VLLMConfigs, VLLMs  # noqa: E402
from videollama2.videollama2_trainer import VideoLLaMA2Trainer, safe_save_model_for_hf_trainer  # noqa: E402


def set_seed(seed=42):  # upstream seeds torch only (and CUDA); the Trainer seeds random / numpy later
    torch.manual_seed(seed)


@dataclass
class ModelArguments:
    model_type: str | None = field(default="videollama2")
    model_path: str | None = field(default="lmsys/vicuna-7b-v1.5")
    version: str | None = field(default="v1")
    freeze_backbone: bool = field(default=False)
    mm_projector_type: str | None = field(default="linear")
    tune_mm_mlp_adapter: bool = field(default=False)
    pretrain_mm_mlp_adapter: str | None = field(default=None)
    vision_tower: str | None = field(default=None)
    mm_vision_select_layer: int | None = field(default=-1)
    mm_vision_select_feature: str | None = field(default="patch")


@dataclass
class DataArguments:
    data_path: list[str] = field(default=None)
    data_folder: str | None = field(default=None)
    is_multimodal: bool = False
    lazy_preprocess: bool = False
    num_frames: int | None = field(default=None)
    image_aspect_ratio: str = "square"


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    optim: str = field(default="adamw_torch")
    mm_projector_lr: float | None = None
    freeze_mm_mlp_adapter: bool = field(default=False)
    remove_unused_columns: bool = field(default=False)
    group_by_modality_length: bool = field(default=False)
    model_max_length: int = field(default=512)
    double_quant: bool = field(default=True)
    quant_type: str = field(default="nf4")
    bits: int = field(default=16)
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = ""
    lora_bias: str = "none"


ROLES = {"human": "user", "gpt": "assistant"}


def preprocess_plain(sources, tokenizer, modal_token=None):
    input_ids, targets = [], []
    for source in sources:
        assert len(source) == 2  # upstream: one caption turn after the modal prompt, nothing else
        assert modal_token in source[0]["value"]
        conversation = " ".join(sentence["value"] for sentence in source)
        ids = tokenizer_multimodal_token(conversation, tokenizer, modal_token, return_tensors="pt")
        target = copy.deepcopy(ids)
        target[ids == MODAL_INDEX_MAP[modal_token]] = IGNORE_INDEX
        input_ids.append(ids)
        targets.append(target)
    return dict(input_ids=input_ids, labels=targets)


def preprocess(sources, tokenizer, modal_token=None):
    input_ids, targets = [], []
    for source in sources:
        if ROLES[source[0]["from"]] != "user":
            source = source[1:]
        message = [{"role": ROLES[s["from"]], "content": s["value"]} for s in source]
        conversation = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=False)
        input_ids.append(tokenizer_multimodal_token(conversation, tokenizer, modal_token, return_tensors="pt"))
        targets.append(copy.deepcopy(input_ids[-1]))
        assert len(source) % 2 == 0, f"Invalid conversation length {len(source)}."
        cur, history = 0, []
        for idx in range(1, len(source), 2):  # mask each turn's instruction, measured on the cumulative chat
            turn = [
                {"role": ROLES[source[idx - 1]["from"]], "content": source[idx - 1]["value"]},
                {"role": ROLES[source[idx]["from"]], "content": source[idx]["value"]},
            ]
            instruction = tokenizer.apply_chat_template(history + turn[:1], tokenize=False, add_generation_prompt=True)
            so_far = tokenizer.apply_chat_template(history + turn, tokenize=False, add_generation_prompt=False)
            instruction_len = len(tokenizer_multimodal_token(instruction, tokenizer, modal_token, return_tensors="pt"))
            targets[-1][cur:instruction_len] = IGNORE_INDEX
            cur = len(tokenizer_multimodal_token(so_far, tokenizer, modal_token, return_tensors="pt"))
            history += turn
    return dict(input_ids=input_ids, labels=targets)


def preprocess_multimodal(sources, data_args, modal_token=None):
    if not data_args.is_multimodal:
        return sources
    assert modal_token in MODAL_INDEX_MAP, f"Unsupported modal token {modal_token}."
    for source in sources:
        for sentence in source:
            if modal_token in sentence["value"]:
                sentence["value"] = (modal_token + "\n" + sentence["value"].replace(modal_token, "").strip()).strip()
    return sources


class LazySupervisedDataset(Dataset):
    def __init__(self, data_path, tokenizer, data_args):
        super().__init__()
        self.list_data_dict = [sample for path in data_path for sample in json.load(open(path))]
        self.tokenizer = tokenizer
        self.data_args = data_args

    def __len__(self):
        return len(self.list_data_dict)

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        sample = self.list_data_dict[i]
        num_frames = NUM_FRAMES if self.data_args.num_frames is None else self.data_args.num_frames
        conversations = [copy.deepcopy(sample["conversations"])]
        media, modal_token = {}, None
        try:
            if "image" in sample:
                path = os.path.join(self.data_args.data_folder, sample["image"])
                media["image"] = process_image(path, self.data_args.image_processor, self.data_args.image_aspect_ratio)
                modal_token = "<image>"
            elif "video" in sample:
                path = os.path.join(self.data_args.data_folder, sample["video"])
                media["video"] = process_video(
                    path, self.data_args.video_processor, self.data_args.image_aspect_ratio, num_frames=num_frames
                )
                modal_token = "<video>"
        except Exception:  # upstream: read error -> a random other sample, recursively
            return self.__getitem__(random.randint(0, len(self.list_data_dict) - 1))
        if modal_token is not None:
            conversations = preprocess_multimodal(conversations, self.data_args, modal_token)
        fn = preprocess_plain if self.data_args.is_pretraining else preprocess
        data = fn(conversations, self.tokenizer, modal_token=modal_token)
        data_dict = dict(input_ids=data["input_ids"][0], labels=data["labels"][0], **media)
        if not media and self.data_args.is_multimodal:
            data_dict["image"] = torch.zeros(3, self.data_args.image_size, self.data_args.image_size)
        return data_dict


@dataclass
class DataCollatorForSupervisedDataset:
    tokenizer: transformers.PreTrainedTokenizer

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [x["input_ids"] for x in instances], batch_first=True, padding_value=pad
        )
        labels = torch.nn.utils.rnn.pad_sequence(
            [x["labels"] for x in instances], batch_first=True, padding_value=IGNORE_INDEX
        )
        input_ids = input_ids[:, : self.tokenizer.model_max_length]
        labels = labels[:, : self.tokenizer.model_max_length]
        batch = dict(input_ids=input_ids, labels=labels, attention_mask=input_ids.ne(pad), images=[])
        for instance in instances:
            for modal_token in MODAL_INDEX_MAP:
                name = re.findall("[<](.*)[>]", modal_token.lower())[0]
                if name in instance:
                    batch["images"].append((instance[name], name))
        return batch


def make_supervised_data_module(tokenizer, data_args) -> dict:
    dataset = LazySupervisedDataset(data_args.data_path, tokenizer, data_args)
    return dict(train_dataset=dataset, eval_dataset=None, data_collator=DataCollatorForSupervisedDataset(tokenizer))


def train(attn_implementation=None):
    set_seed(42)
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    config = VLLMConfigs[model_args.model_type].from_pretrained(model_args.model_path)
    config._attn_implementation = attn_implementation
    model = VLLMs[model_args.model_type].from_pretrained(
        model_args.model_path, config=config, torch_dtype=(torch.bfloat16 if training_args.bf16 else None)
    )
    model.config.use_cache = False
    if model_args.freeze_backbone:
        model.model.requires_grad_(False)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_path, model_max_length=training_args.model_max_length, padding_side="right", use_fast=True
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=training_args.fsdp)
    vision_tower = model.get_vision_tower()
    vision_tower.to(dtype=torch.bfloat16 if training_args.bf16 else torch.float16, device=training_args.device)
    data_args.image_size = vision_tower.image_size
    data_args.image_processor = data_args.video_processor = vision_tower.image_processor
    data_args.is_multimodal = True
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    model.config.tokenizer_padding_side = tokenizer.padding_side
    model.config.tokenizer_model_max_length = tokenizer.model_max_length
    model.config.tune_mm_mlp_adapter = training_args.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    if model_args.tune_mm_mlp_adapter:  # projector pretraining: only the projector trains
        model.requires_grad_(False)
        for p in model.get_model().mm_projector.parameters():
            p.requires_grad = True
    data_args.is_pretraining = model_args.tune_mm_mlp_adapter
    model.config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    if training_args.freeze_mm_mlp_adapter:
        for p in model.get_model().mm_projector.parameters():
            p.requires_grad = False
    model.config.mm_projector_lr = training_args.mm_projector_lr
    model.config.num_frames = NUM_FRAMES if data_args.num_frames is None else data_args.num_frames
    model.get_model().vision_tower.requires_grad_(False)

    data_module = make_supervised_data_module(tokenizer=tokenizer, data_args=data_args)
    trainer = VideoLLaMA2Trainer(model=model, tokenizer=tokenizer, args=training_args, **data_module)
    if list(pathlib.Path(training_args.output_dir).glob("checkpoint-*")):
        trainer.train(resume_from_checkpoint=True)
    else:
        trainer.train()
    trainer.save_state()
    model.config.use_cache = True
    safe_save_model_for_hf_trainer(trainer=trainer, output_dir=training_args.output_dir)


if __name__ == "__main__":
    train("flash_attention_2")
