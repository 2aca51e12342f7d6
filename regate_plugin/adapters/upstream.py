"""Upstream codebases that merge in Python before the HF decoder: haotian-liu/LLaVA (and LLaVA-NeXT), VideoLLaMA2.

Their `*ForCausalLM.forward` calls `self.prepare_inputs_labels_for_multimodal(...)` (docs/ARCHITECTURE.md), then
the parent HF forward, which shifts the labels itself. The adapter replaces that forward on the instance for
training calls with labels: it calls the model's own merge, keys each sample from the pre-merge ids and labels,
plans on the post-merge labels, runs the decoder (`get_model()`) on the compact batch with the original position ids
passed explicitly (VideoLLaMA2's forward would drop them), and computes the loss from `lm_head` on kept
targets only. Works on the transformers each upstream pins (4.37 / 4.40) as well as on 5.x.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.rotary import hook_sliced_rotary
from ..strategies import TokenElision
from .base import Adapter, register_adapter
from .common import (
    PLANNED_BATCH,
    ElidedCausalLMOutput,
    batch_fingerprints,
    elided_output,
    replace_forward,
    sample_keys,
    undo_install,
)


@dataclass
class MergedBatch:
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    labels: torch.Tensor


Merge = Callable[[Any, dict[str, Any]], MergedBatch]


def _embedded(model: Any, embeds: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """The merge returns no embeddings for a batch without images; embed the ids as the HF forward would."""
    return embeds if embeds is not None else model.get_input_embeddings()(kwargs["input_ids"])


def merge_llava(model: Any, kwargs: dict[str, Any]) -> MergedBatch:
    """`prepare_inputs_labels_for_multimodal(input_ids, position_ids, attention_mask, past_key_values, labels,
    images, [modalities,] image_sizes)` -> `(None, position_ids, attention_mask, past, inputs_embeds, labels)`."""
    if "video" in (kwargs.get("modalities") or ()):
        raise NotImplementedError(
            "token elision on LLaVA-NeXT video samples (modalities contains 'video') is not supported: their "
            "pooled frame rows are not what `regate precompute --visual-tokens` describes; train videos with "
            "--token_elision none or keep them out of this run"
        )
    extra = {name: kwargs[name] for name in ("modalities", "image_sizes") if kwargs.get(name) is not None}
    _, position_ids, attention_mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
        kwargs.get("input_ids"),
        kwargs.get("position_ids"),
        kwargs.get("attention_mask"),
        None,
        kwargs["labels"],
        kwargs.get("images"),
        **extra,
    )
    return MergedBatch(_embedded(model, embeds, kwargs), attention_mask, position_ids, labels)


def merge_videollama2(model: Any, kwargs: dict[str, Any]) -> MergedBatch:
    """`prepare_inputs_labels_for_multimodal(input_ids, attention_mask, past_key_values, labels, images)` ->
    `(None, attention_mask, past, inputs_embeds, labels)`; no position ids, so the default arange applies."""
    _, attention_mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
        kwargs.get("input_ids"), kwargs.get("attention_mask"), None, kwargs["labels"], kwargs.get("images")
    )
    return MergedBatch(_embedded(model, embeds, kwargs), attention_mask, None, labels)


def visual_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, merged: MergedBatch, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: its visual placeholders (negative ids) before the merge, the rows the merge put in their place
    (merged length minus text tokens), and whether the merged sample reached the merge's truncation `limit`."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    placeholders = (valid & (input_ids < 0)).sum(1)
    text = (valid & (input_ids >= 0)).sum(1)
    if merged.attention_mask is None:
        merged_length = torch.full_like(text, merged.labels.shape[1])
    else:
        merged_length = merged.attention_mask.bool().sum(1)
    cut = merged_length >= limit if limit else torch.zeros_like(text, dtype=torch.bool)
    return placeholders, merged_length - text, cut


def _elided_forward(merge: Merge, elision: TokenElision, model: Any, kwargs: dict[str, Any]) -> ElidedCausalLMOutput:
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    # Keys from the Trainer's planned batch when it made one; the layout is the merged batch's, copied here (the
    # upstream merge itself reads the batch on the host many times).
    keys = sample_keys(elision, input_ids, kwargs["labels"], attention_mask, kwargs.get(PLANNED_BATCH))
    if kwargs.get("inputs_embeds") is not None:  # merged by the caller
        merged = MergedBatch(kwargs["inputs_embeds"], attention_mask, kwargs.get("position_ids"), kwargs["labels"])
    else:
        merged = merge(model, kwargs)
        check = elision.capabilities.check_visual_rows
        if check is not None and input_ids is not None:  # LLaVA truncates the merged batch to its max length
            limit = getattr(model.config, "tokenizer_model_max_length", None)
            check(keys, *visual_rows(input_ids, attention_mask, merged, limit))
    fingerprints = batch_fingerprints(elision, kwargs.get("images"), merged.labels.shape[0])
    plan = elision.plan(merged.labels, merged.attention_mask, keys, visual_fingerprints=fingerprints)
    outputs = model.get_model()(
        input_ids=None,
        inputs_embeds=plan.compact_embeddings(merged.inputs_embeds),
        attention_mask=plan.compact_attention_mask(merged.attention_mask),
        position_ids=plan.compact_position_ids(merged.position_ids),
        use_cache=False,
        output_attentions=kwargs.get("output_attentions"),
        output_hidden_states=kwargs.get("output_hidden_states"),
        return_dict=True,
    )
    return elided_output(
        elision, plan, outputs, model.get_output_embeddings(), kwargs.get("num_items_in_batch"), labels=merged.labels
    )


def _installer(merge: Merge) -> Callable[[Any, TokenElision], Callable[[], None]]:
    def install(model: Any, elision: TokenElision) -> Callable[[], None]:
        handles = hook_sliced_rotary(model)
        restore_forward = replace_forward(model, functools.partial(_elided_forward, merge, elision))
        return undo_install(handles, restore_forward)

    return install


register_adapter(Adapter(name="llava", class_names=("LlavaMetaForCausalLM",), install=_installer(merge_llava)))
register_adapter(
    Adapter(name="videollama2", class_names=("Videollama2MetaForCausalLM",), install=_installer(merge_videollama2))
)
