"""HF-native vision-language models (transformers 5.x): `LlavaForConditionalGeneration`.

These models merge the projected visual features into `inputs_embeds` inside `self.model` and then call the
text decoder `self.model.language_model(inputs_embeds=..., attention_mask=..., position_ids=...)` as a module, so
the merge point is that call: a forward pre-hook on the decoder swaps in the compact batch. The outer forward is
replaced (on the instance) by one that plans the elision from `input_ids`/`labels` (their placeholders are
already expanded, so pre- and post-merge positions agree), runs `self.model`, and computes the loss from the
compact hidden states with `lm_head`. In eval mode or without labels the original forward runs untouched.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
from transformers.utils import ModelOutput

from ..core.elision import ElisionPlan, TokenElision
from ..core.keys import batch_sample_keys
from .registry import Adapter, register_adapter

# Outer-forward arguments that the inner `self.model` does not take.
_OUTER_ONLY = ("labels", "logits_to_keep", "num_items_in_batch", "use_cache", "past_key_values")


@dataclass
class ElidedCausalLMOutput(ModelOutput):
    """Training output under token elision; `logits` is None (they exist only for kept targets)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    token_elision: dict[str, Any] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class _PendingPlan:
    """Hands one plan from the outer forward to the decoder pre-hook, for exactly one decoder call."""

    def __init__(self) -> None:
        self.plan: ElisionPlan | None = None


def _compact_decoder_inputs(pending: _PendingPlan, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    plan, pending.plan = pending.plan, None
    if plan is None:
        return None
    embeds = kwargs.get("inputs_embeds")
    if embeds is None or args:
        raise RuntimeError(f"{type(module).__name__} was called without keyword inputs_embeds; token elision cannot compact it")
    if embeds.shape[:2] != plan.kept_mask.shape:
        raise RuntimeError(
            f"merged inputs_embeds {tuple(embeds.shape[:2])} do not match labels {tuple(plan.kept_mask.shape)}: "
            "the labels must cover the expanded image placeholders"
        )
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim != 2:
        raise RuntimeError(f"token elision needs a 2-D attention_mask, got shape {tuple(mask.shape)}")
    kwargs["inputs_embeds"] = plan.compact_embeddings(embeds)
    kwargs["attention_mask"] = plan.compact_attention_mask(mask)
    kwargs["position_ids"] = plan.compact_position_ids(kwargs.get("position_ids"))
    return args, kwargs


def _elided_forward(model: Any, elision: TokenElision, pending: _PendingPlan, kwargs: dict[str, Any]) -> ElidedCausalLMOutput:
    labels = kwargs["labels"]
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if elision.needs_sample_keys and input_ids is None:
        raise ValueError(f"token elision '{elision.name}' needs input_ids (not only inputs_embeds) to key each sample")
    keys = batch_sample_keys(input_ids, labels, attention_mask) if elision.needs_sample_keys else None
    plan = elision.plan(labels, attention_mask, keys)
    inner_kwargs = {k: v for k, v in kwargs.items() if k not in _OUTER_ONLY}
    pending.plan = plan
    try:
        outputs = model.model(**inner_kwargs, use_cache=False)
    finally:
        pending.plan = None
    result = elision.loss(plan, outputs.last_hidden_state, model.get_output_embeddings(), kwargs.get("num_items_in_batch"))
    return ElidedCausalLMOutput(
        loss=result.loss,
        token_elision=plan.report(),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        image_hidden_states=getattr(outputs, "image_hidden_states", None),
    )


def install_hf(model: Any, elision: TokenElision) -> Callable[[], None]:
    decoder = model.model.language_model
    pending = _PendingPlan()
    handle = decoder.register_forward_pre_hook(functools.partial(_compact_decoder_inputs, pending), with_kwargs=True)
    original = model.forward  # the class's forward, bound
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:  # normalise positional calls so `labels` and `input_ids` are found by name
            bound = dict(signature.bind_partial(*args, **kwargs).arguments)
            extra = bound.pop(var_keyword, {}) if var_keyword else {}
            kwargs = {**bound, **extra}
        if not self.training or kwargs.get("labels") is None:
            return original(**kwargs)
        return _elided_forward(self, elision, pending, kwargs)

    model.forward = MethodType(forward, model)

    def remove() -> None:
        handle.remove()
        model.__dict__.pop("forward", None)

    return remove


register_adapter(Adapter(name="hf-llava", class_names=("LlavaForConditionalGeneration",), install=install_hf))
