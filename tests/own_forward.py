"""The unelided model as the reference: gradient snapshots, their comparison, and the keep-1.0 harness every
elided model's tests share (at keep ratio 1 an elided training forward is the model's own: loss and gradients)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import regate_plugin as rg
from regate_plugin.core import ScheduleConfig

from .tiny import write_cache_for

Batch = dict[str, torch.Tensor]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def assert_same_grads(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    checked = 0
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None or actual[name].abs().max() == 0, name
            continue
        assert actual[name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(actual[name], grad, atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        checked += 1
    assert checked > 10


def assert_keep_one_is_own_forward(
    build: Callable[[], torch.nn.Module],
    make: Callable[..., Batch],
    padding_side: str,
    mode: str,
    cache_dir: Path,
    config: ScheduleConfig | None = None,
) -> dict[str, Any]:
    """Elision `mode` at keep ratio 1 (`config`, default ReGATE's with no dense steps), a reference cache of the batch
    under `cache_dir` for every mode but `none`: the loss and every gradient are the unelided model's own, and every
    candidate is kept. Returns the elided forward's `token_elision` report."""
    batch = make(batch=3, padding_side=padding_side)
    reference_model = build()
    reference_model.train()
    expected = reference_model(**batch)
    expected.loss.backward()

    model = copy.deepcopy(reference_model)
    model.zero_grad(set_to_none=True)
    config = config or rg.ReGATEConfig(keep_ratio=1.0, warmup_steps=0, dense_steps=0)
    reference = {} if mode == "none" else {"reference": write_cache_for(cache_dir, [batch])}
    rg.enable_token_elision(model, rg.build_token_elision(mode, config, **reference))
    out = model(**batch)
    out.loss.backward()

    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
    assert_same_grads(grads(model), grads(reference_model))
    assert out.token_elision["kept"] == out.token_elision["candidates"] > 0
    return out.token_elision
