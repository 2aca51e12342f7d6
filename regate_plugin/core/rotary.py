"""RoPE tables that some transformers models slice to the sequence length, and how to hand out the whole table.

Llama before 4.38 and Mistral / Qwen2 up to 4.40 (the versions LLaVA and VideoLLaMA2 pin) call their rotary
embedding as `rotary_emb(x, seq_len=L)` and get back `cos[:L]`, then index it with `position_ids`. Position ids
with gaps (a compacted training batch, a `gap` reference) reach past `L` and index out of range. The behaviour is
recognised on the module itself (a `seq_len` argument, no `position_ids` argument, a precomputed table), never by
a version number; newer rotary modules compute from `position_ids` and need nothing.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .errors import UserError


class SlicedRotaryError(UserError, RuntimeError):
    """A rotary embedding slices its table to the sequence length in a way that cannot be widened."""


def _whole_table(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs["seq_len"] = max(kwargs.get("seq_len") or 0, module.max_seq_len_cached)
    return args, kwargs


def slices_to_sequence_length(module: torch.nn.Module) -> bool:
    """A rotary embedding whose forward takes `seq_len` but not `position_ids`: it returns `table[:seq_len]`."""
    if not type(module).__name__.endswith("RotaryEmbedding"):
        return False
    parameters = inspect.signature(module.forward).parameters
    return "seq_len" in parameters and "position_ids" not in parameters


def hook_sliced_rotary(model: torch.nn.Module) -> list[Any]:
    """Make every table-slicing rotary embedding of `model` return its whole precomputed table, so that
    `cos[position_ids]` is unchanged for every id within it (forward, eval and a recomputed backward alike).
    Returns the hook handles; raises `SlicedRotaryError` when such a module has no precomputed table to hand out."""
    handles = []
    for name, module in model.named_modules():
        if not slices_to_sequence_length(module):
            continue
        if not isinstance(getattr(module, "max_seq_len_cached", None), int):
            for handle in handles:
                handle.remove()
            raise SlicedRotaryError(
                f"{name} ({type(module).__name__}) slices its RoPE table to the sequence length and keeps no "
                "precomputed table (max_seq_len_cached), so position ids with gaps cannot be applied"
            )
        handles.append(module.register_forward_pre_hook(_whole_table, with_kwargs=True))
    return handles
