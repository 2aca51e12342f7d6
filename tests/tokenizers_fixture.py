"""Tiny tokenizers we train ourselves, shaped like the upstream ones: a sentencepiece Llama (vicuna), a ChatML
(Qwen2) and a Mistral-chat BPE tokenizer. Pure sentencepiece/tokenizers, so this module imports in both envs."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    "a chat between curious user and an artificial intelligence assistant the gives helpful detailed polite answers "
    "to questions what is in this image video describe colour color red green blue yellow object moves left right up "
    "down how many shapes are there one two three four circle square triangle it appears at start end of clip yes no "
    "answer with option letter best system you are USER ASSISTANT caption photo cat dog sits on mat"
).split()

# The Mistral-Instruct-v0.2 chat format: BOS, then "[INST] user [/INST]answer</s>" per round.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Qwen2-Instruct's ChatML, with its default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    from regate_plugin.data.templates import VICUNA_V1_SYSTEM

    lines = [VICUNA_V1_SYSTEM] * 50
    for n in range(400):
        words = [WORDS[(n * 7 + k * 13) % len(WORDS)] for k in range(12)]
        lines.append(" ".join(words) + ".")
        lines.append(f"USER: {' '.join(words[:5])}? ASSISTANT: {' '.join(words[5:])}.</s>USER: {words[0]}? ASSISTANT:")
    return lines


def write_sentencepiece_llama(directory: Path, legacy: bool = True, model_max_length: int = 2048) -> Path:
    """A Llama tokenizer (tokenizer.model + config) trained with sentencepiece on template-like text."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_corpus()) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=700,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": legacy,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return directory


def write_bpe_chat_tokenizer(directory: Path, style: str) -> Path:
    """A byte-level BPE fast tokenizer with a chat template: `chatml` (Qwen2-like) or `mistral`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if style == "chatml":
        specials, template, extra = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, {}
        extra = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    elif style == "mistral":
        specials, template = ["<unk>", "<s>", "</s>"], MISTRAL_CHAT_TEMPLATE
        extra = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        raise ValueError(style)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
        "model_max_length": 4096,
        **extra,
    }
    if style == "chatml":
        config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
