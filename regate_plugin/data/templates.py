"""Conversation templates: turn a `Conversation` into `input_ids` and `labels` exactly as upstream training does.

Each template reproduces, token for token, the preprocessing of one upstream codebase (docs/PRECOMPUTE.md,
"Templates"), quirks included, because the sample key is a hash of exactly those ids and that label mask:

- `v1`: LLaVA `preprocess_v1` (vicuna_v1), including its "tokenization mismatch" rule that masks a whole sample.
- `plain`: LLaVA `preprocess_plain` (projector pretraining).
- `videollama2`: VideoLLaMA2 `preprocess`, built on the tokenizer's own chat template (Mistral / Llama-2 chat for
  VideoLLaMA2, Qwen2 ChatML for VideoLLaMA2.1).
- `videollama2_plain`: VideoLLaMA2 `preprocess_plain`.
- `qwen_1_5`: LLaVA-NeXT `preprocess_qwen` (LLaVA-OneVision), ChatML with id 198 and the im tokens unmasked.

Placeholders become negative ids (`<image>` -200, `<video>` -201) that the model later expands into visual rows.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..core.compaction import IGNORE_INDEX
from .conversations import Conversation, DataError

IMAGE_TOKEN_INDEX = -200
VIDEO_TOKEN_INDEX = -201
MODAL_TOKENS = {"image": ("<image>", IMAGE_TOKEN_INDEX), "video": ("<video>", VIDEO_TOKEN_INDEX)}
PLACEHOLDER_IDS = (IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX)

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QWEN_SYSTEM = "You are a helpful assistant."
# LLaVA-NeXT resets the Qwen chat template so the system message is not repeated per turn.
QWEN_TURN_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_NEWLINE_ID = 198  # "\n" in the Qwen2 vocabulary; LLaVA-NeXT unmasks this literal id


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def expand_placeholders(
    sample: TokenizedSample, token_id: int, rows: int | Sequence[int], wrap: tuple[int, int] | None = None
) -> TokenizedSample:
    """What an HF-native processor feeds its model: each placeholder becomes `rows` copies of the model's image
    token (one count for all, or one per placeholder in order), between the `wrap` pair where the processor adds one
    (InternVL's `<img>` ... `</img>`), all unsupervised; keys and positions are those of the expanded sequence the HF
    adapter sees."""
    counts = iter([rows] * sum(t in PLACEHOLDER_IDS for t in sample.input_ids) if isinstance(rows, int) else rows)
    ids: list[int] = []
    labels: list[int] = []
    for token, label in zip(sample.input_ids, sample.labels):
        if token in PLACEHOLDER_IDS:
            run = [token_id] * next(counts)
            run = [wrap[0], *run, wrap[1]] if wrap is not None else run
            ids += run
            labels += [IGNORE_INDEX] * len(run)
        else:
            ids.append(token)
            labels.append(label)
    return TokenizedSample(ids, labels)


def tokenizer_image_token(prompt: str, tokenizer: Any, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """LLaVA's `tokenizer_image_token`: tokenize around each `<image>` (with BOS handling) and splice the index in."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separator = [image_token_index] * (offset + 1)
    pieces = [piece for chunk in chunks for piece in (chunk, separator)][:-1]
    for piece in pieces:
        ids.extend(piece[offset:])
    return ids


def tokenizer_multimodal_token(prompt: str, tokenizer: Any, modal_token: str | None) -> list[int]:
    """VideoLLaMA2's `tokenizer_multimodal_token`: no special tokens added, each modal tag becomes its index."""
    if modal_token is None:
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)
    index = dict(MODAL_TOKENS.values())[modal_token]
    ids: list[int] = []
    for n, chunk in enumerate(prompt.split(modal_token)):
        if n:
            ids.append(index)
        ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return ids


def move_placeholder_first(
    turns: list[tuple[str, str]], token: str, only_single: bool = False
) -> list[tuple[str, str]]:
    """Upstream `preprocess_multimodal`: a turn holding the placeholder gets it moved to its front, then a newline."""
    moved = []
    for role, text in turns:
        count = text.count(token)
        if count and not (only_single and (count != 1 or text.startswith(token))):
            text = (token + "\n" + text.replace(token, "").strip()).strip()
        moved.append((role, text))
    return moved


def drop_leading_non_human(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return turns[1:] if turns and turns[0][0] != "human" else turns


def check_alternating(sample: Conversation, turns: list[tuple[str, str]]) -> None:
    for n, (role, _) in enumerate(turns):
        expected = "human" if n % 2 == 0 else "gpt"
        if role != expected:
            raise DataError(
                f"{sample.where()}: turn {n} is from {role!r}, the template expects {expected!r} "
                "(turns alternate human, gpt)"
            )


NO_LIMIT = 10**8
"""A tokenizer `model_max_length` at or above this is the "no limit" sentinel (int(1e30) in llava-hf tokenizers)."""


def tokenizer_limit(tokenizer: Any) -> int | None:
    """The tokenizer's own length limit (upstream truncates at it), None where it states none."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < NO_LIMIT else None


class ConversationTemplate(ABC):
    """How one upstream codebase tokenizes and masks a conversation."""

    name: ClassVar[str]
    codebase: ClassVar[str]
    # Whether the model also truncates the merged (post-expansion) sequence to the max length, as LLaVA does.
    truncates_merged: ClassVar[bool] = True
    # How the upstream train.py loads its tokenizer (`AutoTokenizer(..., use_fast=...)`; transformers 5 ignores it).
    use_fast: ClassVar[bool] = False

    @abstractmethod
    def encode(self, sample: Conversation, tokenizer: Any, max_length: int | None = None) -> TokenizedSample:
        """Token ids and labels before the collator's truncation, as the upstream dataset returns them."""


class LlavaV1Template(ConversationTemplate):
    name = "v1"
    codebase = "llava"

    def encode(self, sample: Conversation, tokenizer: Any, max_length: int | None = None) -> TokenizedSample:
        has_image = sample.modality == "image"
        turns = sample.turns
        if has_image:
            turns = move_placeholder_first(turns, "<image>")
        turns = drop_leading_non_human(turns)
        check_alternating(sample, turns)
        prompt = VICUNA_V1_SYSTEM + " "
        seps = (" ", "</s>")
        for n, (role, text) in enumerate(turns):
            speaker = "USER" if role == "human" else "ASSISTANT"
            prompt += f"{speaker}: {text}{seps[n % 2]}" if text else f"{speaker}:"
        if has_image:
            ids = tokenizer_image_token(prompt, tokenizer)
            measure = lambda text: len(tokenizer_image_token(text, tokenizer))  # noqa: E731
        else:
            limit = max_length or tokenizer_limit(tokenizer)
            ids = list(tokenizer(prompt, max_length=limit, truncation=limit is not None).input_ids)
            measure = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
        labels = list(ids)
        pad_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
        total = sum(1 for token in ids if token != pad_id)
        sep = " ASSISTANT: "
        cur = 1
        labels[:cur] = [IGNORE_INDEX] * cur
        non_legacy = not getattr(tokenizer, "legacy", True)
        for n, round_text in enumerate(prompt.split("</s>")):
            if round_text == "":
                break
            parts = round_text.split(sep)
            if len(parts) != 2:
                break
            round_len = measure(round_text)
            instruction_len = measure(parts[0] + sep) - 2
            if n != 0 and non_legacy:
                round_len -= 1
                instruction_len -= 1
            labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
            cur += round_len
        labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
        limit = max_length or tokenizer_limit(tokenizer)
        if (limit is None or cur < limit) and cur != total:
            # Upstream prints "WARNING: tokenization mismatch" and masks the whole sample.
            labels = [IGNORE_INDEX] * len(ids)
        return TokenizedSample(ids, labels)


class LlavaPlainTemplate(ConversationTemplate):
    name = "plain"
    codebase = "llava"

    def encode(self, sample: Conversation, tokenizer: Any, max_length: int | None = None) -> TokenizedSample:
        if len(sample.turns) != 2 or "<image>" not in sample.turns[0][1]:
            raise DataError(f"{sample.where()}: template 'plain' needs exactly two turns with <image> in the first")
        ids = tokenizer_image_token("<image>" + sample.turns[1][1] + "\n", tokenizer)
        prefix = len(tokenizer_image_token("<image>", tokenizer))
        labels = [IGNORE_INDEX] * min(prefix, len(ids)) + ids[prefix:]
        return TokenizedSample(ids, labels)


def _modal_token(sample: Conversation) -> str | None:
    return MODAL_TOKENS[sample.modality][0] if sample.modality else None


class VideoLlama2Template(ConversationTemplate):
    name = "videollama2"
    codebase = "videollama2"
    truncates_merged = False  # VideoLLaMA2's merge does not truncate; only the collator does
    use_fast = True

    def encode(self, sample: Conversation, tokenizer: Any, max_length: int | None = None) -> TokenizedSample:
        token = _modal_token(sample)
        turns = move_placeholder_first(sample.turns, token) if token else sample.turns
        turns = drop_leading_non_human(turns)
        check_alternating(sample, turns)
        if len(turns) % 2:
            raise DataError(f"{sample.where()}: {len(turns)} turns after the first human one; VideoLLaMA2 needs pairs")
        roles = {"human": "user", "gpt": "assistant"}
        messages = [{"role": roles[role], "content": text} for role, text in turns]
        render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
        ids = tokenizer_multimodal_token(render(messages, False), tokenizer, token)
        labels = list(ids)
        cur = 0
        for end in range(2, len(messages) + 1, 2):
            instruction_len = len(tokenizer_multimodal_token(render(messages[: end - 1], True), tokenizer, token))
            labels[cur:instruction_len] = [IGNORE_INDEX] * len(labels[cur:instruction_len])
            cur = len(tokenizer_multimodal_token(render(messages[:end], False), tokenizer, token))
        return TokenizedSample(ids, labels)


class VideoLlama2PlainTemplate(ConversationTemplate):
    name = "videollama2_plain"
    codebase = "videollama2"
    truncates_merged = False
    use_fast = True

    def encode(self, sample: Conversation, tokenizer: Any, max_length: int | None = None) -> TokenizedSample:
        token = _modal_token(sample)
        if token is None or len(sample.turns) != 2 or token not in sample.turns[0][1]:
            raise DataError(
                f"{sample.where()}: template 'videollama2_plain' needs two turns with the modal tag in the first"
            )
        turns = move_placeholder_first(sample.turns, token)
        ids = tokenizer_multimodal_token(" ".join(text for _, text in turns), tokenizer, token)
        index = dict(MODAL_TOKENS.values())[token]
        return TokenizedSample(ids, [IGNORE_INDEX if t == index else t for t in ids])


QWEN_NOISE_MARKER = "QA_GT_caption_based_noisy"


class LlavaQwenTemplate(ConversationTemplate):
    name = "qwen_1_5"
    codebase = "llava-next"

    def __init__(self) -> None:
        self._prepared: dict[tuple[int, bool], tuple[Any, Any]] = {}

    def _tokenizer(self, tokenizer: Any, has_image: bool) -> Any:
        """Upstream works on a copy with the per-turn chat template, and `<image>` added when the sample has one."""
        key = (id(tokenizer), has_image)
        if key not in self._prepared:
            prepared = copy.deepcopy(tokenizer)
            if has_image:
                prepared.add_tokens(["<image>"], special_tokens=True)
            prepared.chat_template = QWEN_TURN_TEMPLATE
            self._prepared[key] = (tokenizer, prepared)  # holding the original keeps its id unique
        return self._prepared[key][1]

    def encode(self, sample: Conversation, tokenizer: Any, max_length: int | None = None) -> TokenizedSample:
        has_image = sample.modality is not None
        turns = sample.turns
        if has_image:  # upstream preprocess_multimodal, which also deletes one dataset's noise marker
            turns = move_placeholder_first(turns, "<image>", only_single=True)
            turns = [(role, text.replace(QWEN_NOISE_MARKER, "")) for role, text in turns]
        turns = drop_leading_non_human(turns)
        tok = self._tokenizer(tokenizer, has_image)
        encode = lambda role, text: list(  # noqa: E731
            tok.apply_chat_template([{"role": role, "content": text}], tokenize=True, return_dict=False)
        )
        ids = encode("system", QWEN_SYSTEM)
        labels = [IGNORE_INDEX] * len(ids)
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        for role, text in turns:
            piece = encode(roles[role], text)
            ids += piece
            labels += [IGNORE_INDEX] * len(piece) if roles[role] in ("user", "system") else piece
        unmasked = {QWEN_NEWLINE_ID, tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")}
        image_id = tok.convert_tokens_to_ids("<image>") if has_image else None
        for n, token in enumerate(ids):
            if token in unmasked:
                labels[n] = token
            if token == image_id:
                ids[n] = IMAGE_TOKEN_INDEX
        return TokenizedSample(ids, labels)


TEMPLATES: dict[str, Callable[[], ConversationTemplate]] = {
    cls.name: cls
    for cls in (LlavaV1Template, LlavaPlainTemplate, VideoLlama2Template, VideoLlama2PlainTemplate, LlavaQwenTemplate)
}
ALIASES = {"vicuna_v1": "v1", "llava_v1": "v1", "llava_plain": "plain", "qwen": "qwen_1_5"}


def get_template(name: str) -> ConversationTemplate:
    """The template called `name` (see `TEMPLATES`); an unknown name lists the known ones."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise DataError(f"unknown template {name!r}; known: {sorted(TEMPLATES)} (aliases {sorted(ALIASES)})")
    return TEMPLATES[key]()
