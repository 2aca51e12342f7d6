"""docs/STRATEGIES.md's worked example, run as it stands: the strategy it defines registers, builds from the
training flags, and keeps on sparse steps exactly the last ceil(keep_ratio * n) candidates of each row, as a
brute-force count over the labels says; and the page's excerpt of `rho` is what strategies/rho.py holds."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import regate_plugin as rg
from regate_plugin.core import IGNORE_INDEX
from regate_plugin.strategies import TOKEN_ELISIONS

from .tiny import make_batch, tiny_llava

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "STRATEGIES.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE, flags=re.S)


@pytest.fixture
def keep_last():
    namespace: dict = {}
    exec(compile(BLOCKS[0], "docs/STRATEGIES.md", "exec"), namespace)
    try:
        yield namespace["KeepLast"]
    finally:
        TOKEN_ELISIONS._entries.pop("keep-last")


def _last_candidates(labels: torch.Tensor, mask: torch.Tensor, ratio: float) -> list[set[int]]:
    expected = []
    for row, valid in zip(labels.tolist(), mask.bool().tolist()):
        positions = [p for p, v in enumerate(valid) if v]
        candidates = [
            p for i, p in enumerate(positions[:-1]) if row[p] != IGNORE_INDEX and row[positions[i + 1]] != IGNORE_INDEX
        ]
        k = max(1, math.ceil(round(ratio * len(candidates), 9))) if candidates else 0
        expected.append(set(candidates[len(candidates) - k :]))
    return expected


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_worked_example_keeps_the_last_candidates_of_each_row(keep_last, padding_side):
    batch = make_batch(batch=4, seed=4, padding_side=padding_side, turns=3)
    cfg = rg.ScheduleConfig(keep_ratio=0.3, warmup_steps=0, dense_steps=0)
    elision = rg.build_token_elision("keep-last", cfg)
    assert isinstance(elision, keep_last) and "keep-last" in rg.available_token_elisions()
    plan = elision.plan(batch["labels"], batch["attention_mask"])
    kept = [set(row.nonzero().squeeze(1).tolist()) for row in plan.kept_candidates]
    assert not plan.dense and kept == _last_candidates(batch["labels"], batch["attention_mask"], 0.3)

    model = tiny_llava()
    model.train()
    rg.enable_token_elision(model, elision)
    out = model(**batch)
    out.loss.backward()
    assert out.token_elision["kept"] == sum(len(k) for k in kept) and torch.isfinite(out.loss)


def test_the_worked_example_builds_from_the_training_flags(keep_last, tmp_path):
    from regate_plugin.training import TokenElisionArguments

    elision = TokenElisionArguments(token_elision="keep-last", regate_keep_ratio=0.3, regate_lambda=0.9).build()
    assert type(elision) is keep_last and elision.cfg == rg.ScheduleConfig(keep_ratio=0.3)
    with pytest.warns(UserWarning, match="is unused: --token_elision keep-last reads no reference cache"):
        TokenElisionArguments(token_elision="keep-last", regate_ref_cache=str(tmp_path)).build()


def test_the_pages_excerpt_of_rho_is_its_module():
    source = (ROOT / "regate_plugin" / "strategies" / "rho.py").read_text()
    for line in BLOCKS[1].splitlines():
        code = line.split("  #")[0].rstrip()
        assert code.strip() in source, code
