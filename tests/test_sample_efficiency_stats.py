"""The evidence script's statistics against independent references: numpy's interpolation, Student's t quantiles
from published tables, exact binomial tails."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_efficiency.py"
_SPEC = importlib.util.spec_from_file_location("sample_efficiency", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
se = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(se)


def _curve(tokens: list[int], accuracy: list[float]) -> list[dict[str, float]]:
    return [{"answer_tokens": t, "accuracy": a} for t, a in zip(tokens, accuracy)]


@pytest.mark.parametrize("at", [0, 1, 999, 1000, 1500, 2999, 3000, 3500])
def test_accuracy_at_interpolates_like_numpy(at: int) -> None:
    tokens, accuracy = [0, 1000, 3000], [25.0, 40.0, 70.0]
    assert se.accuracy_at(_curve(tokens, accuracy), at) == pytest.approx(np.interp(at, tokens, accuracy))


@pytest.mark.parametrize(("dof", "t_975"), [(1, 12.706), (4, 2.776), (9, 2.262)])
def test_paired_t_test_two_sided_p_at_table_quantiles(dof: int, t_975: float) -> None:
    # Differences whose t statistic is the tabulated 97.5% quantile: two-sided p = 0.05.
    n = dof + 1
    base = np.array([(-1.0) ** i for i in range(n)])
    base -= base.mean()
    sd = base.std(ddof=1)
    differences = list(base + t_975 * sd / math.sqrt(n))
    t, p = se.paired_t_test(differences)
    assert t == pytest.approx(t_975)
    assert p == pytest.approx(0.05, abs=2e-4)


def test_sign_test_is_the_exact_binomial_tail() -> None:
    assert se.sign_test([1.0] * 5) == pytest.approx(2 * 0.5**5)
    assert se.sign_test([1.0, 1.0, 1.0, 1.0, -1.0, 0.0]) == pytest.approx(2 * (1 + 5) / 32)
