"""What every adapter shares: the training-forward switch, sample keys, and the elided output.

An adapter supplies one function, `elided(model, kwargs) -> ElidedCausalLMOutput`, for a training call with
labels; `replace_forward` installs it on the instance and leaves every other call (eval, generate, no labels) to
the model's own forward.

A training call with `fused_lm_head=True` (TRL's trainers, which patch in a fused LM head and read its per-token
outputs) gets the elided output with TRL's fields added, over the kept targets (`FUSED_LM_HEAD`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
from transformers.utils import ModelOutput

from ..core.keys import SampleKey, batch_sample_keys, visual_fingerprints
from ..core.loss import Head
from ..strategies import BatchLayout, ElisionPlan, TokenElision

ElidedForward = Callable[[Any, dict[str, Any]], "ElidedCausalLMOutput"]


@dataclass
class ElidedCausalLMOutput(ModelOutput):
    """Training output under token elision; `logits` is None (they exist only for kept targets)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    token_elision: dict[str, Any] | None = None
    labels: torch.LongTensor | None = None  # post-merge labels, where the upstream forward returns them
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    # TRL's fused-LM-head fields, only for a call with `fused_lm_head=True`: one entry per kept target (flat, in the
    # loss's order), so the sums and counts TRL takes of them are over the kept targets.
    log_probs: torch.FloatTensor | None = None
    entropy: torch.FloatTensor | None = None
    is_top1: torch.BoolTensor | None = None
    label_mask: torch.BoolTensor | None = None


FUSED_LM_HEAD = "fused_lm_head"
"""The keyword with which TRL asks a model patched by `trl.trainer.utils.add_fused_lm_head` for per-token fields."""
_FUSED_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("regate_fused_lm_head", default=False)

PLANNED_BATCH = "regate_batch"
"""Input key under which the Trainer integration hands the forward a `PlannedBatch` (popped before the model)."""


class PlannedBatch:
    """Host facts of one training batch derived before its forward, so the forward needs no device-to-host copy:
    the sample keys (pre-merge) and the `BatchLayout` of its labels (valid where the model merges nothing)."""

    __slots__ = ("keys", "layout")

    def __init__(self, keys: list[SampleKey] | None, layout: BatchLayout) -> None:
        self.keys, self.layout = keys, layout


def plan_ahead(elision: TokenElision, batch: dict[str, Any]) -> PlannedBatch:
    """The `PlannedBatch` of a collated batch (one host copy of its ids, labels and mask, outside the step)."""
    labels, mask = batch["labels"], batch.get("attention_mask")
    keys = sample_keys(elision, batch.get("input_ids"), labels, mask) if batch.get("input_ids") is not None else None
    return PlannedBatch(keys, BatchLayout.of(labels, mask))


def sample_keys(
    elision: TokenElision,
    input_ids: torch.Tensor | None,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    planned: PlannedBatch | None = None,
) -> list[SampleKey] | None:
    """The batch's sample keys (pre-merge ids and labels), or None for strategies that do not need them."""
    if not elision.capabilities.sample_keys:
        return None
    if planned is not None and planned.keys is not None:
        return planned.keys
    if input_ids is None:
        raise ValueError(f"token elision '{elision.name}' needs input_ids (not only inputs_embeds) to key each sample")
    return batch_sample_keys(input_ids, labels, attention_mask)


def batch_fingerprints(elision: TokenElision, visual: Any, batch_size: int) -> torch.Tensor | None:
    """The batch's visual fingerprints (`keys.visual_fingerprints`) when the strategy uses them (e.g. to keep EMA
    slot groups per visual input); None otherwise, at no cost."""
    if not elision.capabilities.visual_fingerprints:
        return None
    return visual_fingerprints(visual, batch_size)


def elided_output(
    elision: TokenElision,
    plan: ElisionPlan,
    decoder_outputs: Any,
    head: Head,
    num_items_in_batch: int | torch.Tensor | None,
    **extra: Any,
) -> ElidedCausalLMOutput:
    """The loss over the kept targets of the decoder's compact hidden states, and the plan's report."""
    hidden = decoder_outputs[0] if isinstance(decoder_outputs, tuple) else decoder_outputs.last_hidden_state
    fused = _FUSED_CALL.get()
    result = elision.loss(plan, hidden, head, num_items_in_batch, statistics=fused)
    if fused:
        extra |= {"log_probs": result.log_probs, "entropy": result.entropy, "is_top1": result.is_top1}
        extra["label_mask"] = torch.ones_like(result.per_token, dtype=torch.bool)
    return ElidedCausalLMOutput(
        loss=result.loss,
        token_elision=plan.report(),
        hidden_states=getattr(decoder_outputs, "hidden_states", None),
        attentions=getattr(decoder_outputs, "attentions", None),
        **extra,
    )


def undo_install(handles: list[Any], restore_forward: Callable[[], None]) -> Callable[[], None]:
    """The remover an adapter's `install` returns: removes its hooks, then puts the model's own forward back."""

    def remove() -> None:
        for handle in handles:
            handle.remove()
        restore_forward()

    return remove


def replace_forward(model: Any, elided: ElidedForward) -> Callable[[], None]:
    """Route training calls with labels on this instance to `elided`; returns the function that undoes it."""
    original = model.forward  # the class's forward, bound
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        planned = kwargs.pop(PLANNED_BATCH, None)
        if args:  # normalise positional calls so `labels` and `input_ids` are found by name
            bound = dict(signature.bind_partial(*args, **kwargs).arguments)
            extra = bound.pop(var_keyword, {}) if var_keyword else {}
            kwargs = {**bound, **extra}
        if not self.training or kwargs.get("labels") is None:
            if var_keyword is None:  # the Trainer passes it once elision is on; the model's own forward may not take it
                kwargs.pop("num_items_in_batch", None)
            return original(**kwargs)
        token = _FUSED_CALL.set(bool(kwargs.pop(FUSED_LM_HEAD, False)))
        try:
            return elided(self, {**kwargs, PLANNED_BATCH: planned})
        finally:
            _FUSED_CALL.reset(token)

    previous = model.__dict__.get("forward")  # an instance forward already there (TRL's fused head) stays under ours
    model.forward = MethodType(forward, model)
    if previous is None:
        return lambda: model.__dict__.pop("forward", None)
    return lambda: setattr(model, "forward", previous)
