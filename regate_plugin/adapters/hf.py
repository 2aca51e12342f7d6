"""HF-native VLMs (transformers 5.x): LLaVA, LLaVA-NeXT-Video, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL.

These models merge the projected visual features into `inputs_embeds` inside `self.model` and then call the
text decoder `self.model.language_model(inputs_embeds=..., attention_mask=..., position_ids=...)` as a module, so
the merge point is that call: a forward pre-hook on the decoder swaps in the compact batch. Placeholders are
expanded in `input_ids` already, so pre- and post-merge positions agree and the plan is made from `input_ids` /
`labels` before `self.model` runs. The Qwen models' multi-row M-RoPE position ids are computed by `self.model`
and reach the hook, which gathers them along the sequence (never recomputes them). Qwen3-VL's decoder also takes
deepstack features, added to its first layers' hidden states at `visual_pos_masks`: the hook compacts that mask
and keeps the features of the kept visual rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..strategies import ElisionPlan, TokenElision
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

# Outer-forward arguments that the inner `self.model` does not take.
_OUTER_ONLY = ("labels", "logits_to_keep", "num_items_in_batch", "use_cache", "past_key_values", PLANNED_BATCH)


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
        raise RuntimeError(
            f"{type(module).__name__} was called without keyword inputs_embeds; token elision cannot compact it"
        )
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
    visual = kwargs.get("visual_pos_masks")
    if visual is not None and not plan.compaction.identity:
        # Qwen3-VL's deepstack: one [visual rows, D] feature per early decoder layer, added to the hidden states at
        # `visual_pos_masks` in row-major order; keep the mask's kept positions and those positions' features.
        kept = plan.kept_mask[visual]
        kwargs["visual_pos_masks"] = plan.compact_embeddings(visual)
        kwargs["deepstack_visual_embeds"] = [features[kept] for features in kwargs["deepstack_visual_embeds"]]
    return args, kwargs


def _elided_forward(
    elision: TokenElision, pending: _PendingPlan, model: Any, kwargs: dict[str, Any]
) -> ElidedCausalLMOutput:
    labels, attention_mask = kwargs["labels"], kwargs.get("attention_mask")
    planned = kwargs.get(PLANNED_BATCH)  # placeholders are expanded already: the pre-merge layout is the merged one
    keys = sample_keys(elision, kwargs.get("input_ids"), labels, attention_mask, planned)
    visual = kwargs.get("pixel_values_videos")
    visual = kwargs.get("pixel_values") if visual is None else visual
    plan = elision.plan(
        labels,
        attention_mask,
        keys,
        layout=planned.layout if planned is not None else None,
        visual_fingerprints=batch_fingerprints(elision, visual, labels.shape[0]),
    )
    pending.plan = plan
    try:
        outputs = model.model(**{k: v for k, v in kwargs.items() if k not in _OUTER_ONLY}, use_cache=False)
    finally:
        pending.plan = None
    return elided_output(
        elision,
        plan,
        outputs,
        model.get_output_embeddings(),
        kwargs.get("num_items_in_batch"),
        image_hidden_states=getattr(outputs, "image_hidden_states", None),
    )


def _require_transformers_5(model: Any) -> None:
    """The HF-native models merge inside `self.model` and call `self.model.language_model` only from transformers 5."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError(
            f"token elision on {type(model).__name__} (the HF-native adapter) needs transformers 5 or newer; this "
            f"environment has transformers {transformers.__version__} (pip install 'regate-plugin[hf]')"
        )


def install_hf(model: Any, elision: TokenElision) -> Callable[[], None]:
    _require_transformers_5(model)
    pending = _PendingPlan()
    hook = functools.partial(_compact_decoder_inputs, pending)
    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    restore_forward = replace_forward(model, functools.partial(_elided_forward, elision, pending))
    return undo_install([handle], restore_forward)


register_adapter(
    Adapter(
        name="hf",
        class_names=(
            "LlavaForConditionalGeneration",
            "LlavaNextVideoForConditionalGeneration",
            "Qwen2VLForConditionalGeneration",
            "Qwen2_5_VLForConditionalGeneration",
            "InternVLForConditionalGeneration",
            "Qwen3VLForConditionalGeneration",
        ),
        install=install_hf,
    )
)
