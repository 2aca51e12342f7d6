"""OpenGVLab/Ask-Anything's VideoChat2 (`VideoChat2_it_mistral`, the instruction-tuning model): docs/VIDEOCHAT2.md.

VideoChat2 merges inline in its own `forward(image, text_input, instruction)`: it splits each prompt at the
end token (`</Video>` / `</Image>`), embeds the two halves, lays out `[BOS | before | visual rows | after]`,
right-pads, builds the answer targets itself and calls its LLM once, as a module, with
`inputs_embeds`, `attention_mask` and `labels` (no position ids). That call is the merge point: the adapter
replaces, on the instance, the forward of the module called (`mistral_model`: PEFT's PeftModel under LoRA) for
training calls with labels, and runs the HF model's decoder (LoRA's layers are inside it) on the compact batch
with the original position ids, and the loss on kept targets. Nothing of VideoChat2's own forward is copied.

Sample keys need pre-merge ids, which VideoChat2 never forms: a forward pre-hook on the model records the prompts
and the visual input, a forward hook on the projector (`mistral_proj`) the visual rows, and the pre-merge sample is
taken as `[BOS] + before + [placeholder] + after` (the halves tokenized as VideoChat2 tokenizes them; `<image>`'s
-200 for a one-frame input, `<video>`'s -201 otherwise) with the supervision of the merged labels, visual rows
collapsed to the placeholder and the merge's truncation applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.compaction import IGNORE_INDEX
from ..core.rotary import hook_sliced_rotary
from ..data.templates import IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from ..strategies import TokenElision
from .base import Adapter, register_adapter
from .common import (
    ElidedCausalLMOutput,
    batch_fingerprints,
    elided_output,
    replace_forward,
    sample_keys,
    undo_install,
)
from .registry import _unwrap


@dataclass(frozen=True)
class Parts:
    """The attribute names of one VideoChat2 variant's LLM, its tokenizer and its projector."""

    llm: str
    tokenizer: str
    projector: str


MISTRAL = Parts(llm="mistral_model", tokenizer="mistral_tokenizer", projector="mistral_proj")


@dataclass
class _Call:
    """What the outer forward received, and how many visual rows its projector gave, for one LLM call."""

    prompts: list[str] | None = None
    image: torch.Tensor | None = None
    visual_rows: int | None = None


def _record_call(call: _Call, module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the VideoChat2 model: `forward(image, text_input, instruction)`."""
    image = args[0] if args else kwargs.get("image")
    prompts = args[1] if len(args) > 1 else kwargs.get("text_input")
    call.prompts, call.image, call.visual_rows = list(prompts) if prompts is not None else None, image, None


def _record_rows(call: _Call, module: Any, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on the projector: its output is [B, visual rows, hidden]."""
    call.visual_rows = int(output.shape[1])


Tensors3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _premerge(
    model: Any, parts: Parts, call: _Call, labels: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[Tensors3, Tensors3]:
    """Padded pre-merge `(input_ids, labels, attention_mask)` of the batch (see the module docstring), plus per
    sample the visual rows the merged sample holds and whether the merge truncated it."""
    if call.prompts is None or call.image is None or call.visual_rows is None:
        raise RuntimeError(
            f"{type(model).__name__}'s LLM was called with labels outside {type(model).__name__}.forward (or its "
            f"{parts.projector} did not run): token elision keys each sample from the prompts that forward receives"
        )
    tokenizer = getattr(model, parts.tokenizer)
    use_image = call.image.shape[1] == 1  # VideoChat2's encode_img: one frame is an image
    end_token = model.img_end_token if use_image else model.end_token
    placeholder = IMAGE_TOKEN_INDEX if use_image else VIDEO_TOKEN_INDEX
    supervised = (labels != IGNORE_INDEX).cpu()
    valid = (torch.full(labels.shape, True) if attention_mask is None else attention_mask.bool().cpu()).sum(1).tolist()
    rows = call.visual_rows
    samples, placeholders, merged_rows, cut = [], [], [], []
    for b, prompt in enumerate(call.prompts):
        before, after = prompt.split(end_token)
        before_ids = tokenizer(before, add_special_tokens=False).input_ids
        after_ids = tokenizer(end_token + after, add_special_tokens=False).input_ids
        ids = [tokenizer.bos_token_id, *before_ids, placeholder, *after_ids]
        start = 1 + len(before_ids)  # first visual row in the merged sample
        present = min(rows, max(valid[b] - start, 0))  # visual rows the truncated sample still holds
        mask = supervised[b, : valid[b]].tolist()
        if present:
            mask = mask[:start] + [False] + mask[start + present :]
        samples.append((ids[: len(mask)], mask))
        placeholders.append(1 if present else 0)
        merged_rows.append(present)
        cut.append(1 + len(before_ids) + rows + len(after_ids) > valid[b])
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    pre_labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    pre_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for b, (ids, mask) in enumerate(samples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        pre_labels[b, : len(ids)] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
        pre_mask[b, : len(ids)] = 1
    visual = (torch.tensor(placeholders), torch.tensor(merged_rows), torch.tensor(cut))
    return (input_ids, pre_labels, pre_mask), visual


def _elided_forward(
    elision: TokenElision, parts: Parts, call: _Call, model: Any, llm: Any, called: Any, kwargs: dict[str, Any]
) -> ElidedCausalLMOutput:
    """The training call of `called` (the module VideoChat2 calls: PEFT's PeftModel, or the HF model itself),
    run as `llm`'s decoder (LoRA lives in its layers) on the compact batch, and the loss on kept targets."""
    embeds, labels, attention_mask = kwargs.get("inputs_embeds"), kwargs["labels"], kwargs.get("attention_mask")
    if embeds is None:
        raise RuntimeError(
            f"{type(llm).__name__} was called with labels but without inputs_embeds: VideoChat2 calls its LLM on "
            "merged embeddings, and token elision only compacts those"
        )
    keys = None
    if elision.capabilities.sample_keys:
        pre, visual = _premerge(model, parts, call, labels, attention_mask)
        keys = sample_keys(elision, *pre)
        check = elision.capabilities.check_visual_rows
        if check is not None:
            check(keys, *visual)
    fingerprints = batch_fingerprints(elision, call.image, labels.shape[0])
    plan = elision.plan(labels, attention_mask, keys, visual_fingerprints=fingerprints)
    outputs = llm.model(
        inputs_embeds=plan.compact_embeddings(embeds),
        attention_mask=plan.compact_attention_mask(attention_mask),
        position_ids=plan.compact_position_ids(None),
        use_cache=False,
        output_attentions=kwargs.get("output_attentions"),
        output_hidden_states=kwargs.get("output_hidden_states"),
        return_dict=True,
    )
    return elided_output(elision, plan, outputs, llm.get_output_embeddings(), kwargs.get("num_items_in_batch"))


def _installer(parts: Parts) -> Callable[[Any, TokenElision], Callable[[], None]]:
    def install(model: Any, elision: TokenElision) -> Callable[[], None]:
        called = getattr(model, parts.llm)  # what VideoChat2 calls: PEFT's PeftModel under LoRA, else the HF model
        llm = _unwrap(called)  # the HF causal LM; PEFT's LoRA layers sit inside it
        call = _Call()
        handles = [
            model.register_forward_pre_hook(functools.partial(_record_call, call), with_kwargs=True),
            getattr(model, parts.projector).register_forward_hook(functools.partial(_record_rows, call)),
            *hook_sliced_rotary(llm),
        ]
        # The call VideoChat2 makes goes through `called.__call__`, so its forward is replaced there: peft 0.4.0's
        # LoraModel keeps the HF model's forward as it was when LoRA was applied, so a forward put on the HF model
        # afterwards would not be reached.
        restore_forward = replace_forward(called, functools.partial(_elided_forward, elision, parts, call, model, llm))
        return undo_install(handles, restore_forward)

    return install


register_adapter(Adapter(name="videochat2", class_names=("VideoChat2_it_mistral",), install=_installer(MISTRAL)))
