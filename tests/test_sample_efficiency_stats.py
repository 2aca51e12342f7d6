"""The evidence script's statistics against independent references: numpy's interpolation, Student's t quantiles
from published tables, exact binomial tails."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from regate_plugin.demo import CurvePoint, DemoResult
from regate_plugin.demo.report import takeaways

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


def _result(mode: str, points: list[tuple[int, int, float, float]]) -> DemoResult:
    """A run whose curve has (step, answer tokens, seconds, accuracy) points."""
    curve = [CurvePoint(step, tokens, seconds, accuracy, 0.0, 0.0) for step, tokens, seconds, accuracy in points]
    return DemoResult(mode, "", 1.0, curve[-1].answer_tokens, 1.0, curve[-1].train_seconds, 0, 0, 0, curve)


def test_takeaways_say_when_and_at_what_share_regate_reached_nones_best() -> None:
    none = _result("none", [(0, 0, 0.0, 25.0), (100, 1000, 10.0, 50.0), (200, 2000, 20.0, 60.0), (300, 3000, 30, 55.0)])
    reaches = _result("regate", [(0, 0, 0.0, 25.0), (100, 500, 9.0, 40.0), (200, 900, 16.0, 61.0), (300, 1400, 24, 58)])
    lines = takeaways([none, reaches])
    # none's best is its first 60.0 (step 200, 2000 tokens, 20 s); regate first reaches it at step 200.
    assert "at step 200, with 45% of the answer tokens and 80% of the training seconds" in lines[0]
    # none's curve at 1400 tokens: 50 + 0.4 * (60 - 50).
    assert "none stood at 54.0 MVBench; ReGATE ended at 58.0" in lines[1]
    short = _result("regate", [(0, 0, 0.0, 25.0), (300, 1400, 24, 59.9)])
    assert takeaways([none, short])[0].startswith("ReGATE did not reach none's best MVBench (60.0, step 200)")


def _scored(tokens: list[int], accuracy: list[float], exact: list[float]) -> list[dict[str, float]]:
    return [{"answer_tokens": t, "accuracy": a, "exact_match": e} for t, a, e in zip(tokens, accuracy, exact)]


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_window_means_are_numpys_trailing_means(window: int) -> None:
    rng = np.random.default_rng(window)
    accuracy, exact = rng.uniform(0, 100, 9), rng.uniform(0, 100, 9)
    curve = _scored(list(range(9)), list(accuracy), list(exact))
    for i, means in enumerate(se.window_means(curve, window)):
        start = max(0, i - window + 1)
        assert means["accuracy"] == pytest.approx(accuracy[start : i + 1].mean())
        assert means["exact_match"] == pytest.approx(exact[start : i + 1].mean())


def test_plateau_targets_judge_both_runs_by_the_same_window_rule() -> None:
    # none: window-2 means 10, 30, 60, 85, 90, 90 (accuracy = exact match); its plateau 90, first within 1 at
    # index 4 (400 tokens). The run's means 10, 45, 89.5 (index 2, 120 tokens): 0.3 of none's tokens.
    none = _scored([0, 100, 200, 300, 400, 500], *[[10.0, 50.0, 70.0, 100.0, 80.0, 100.0]] * 2)
    run = _scored([0, 60, 120], *[[10.0, 80.0, 99.0]] * 2)
    slow = _scored([0, 60, 120], *[[10.0, 80.0, 97.0]] * 2)  # window mean 88.5: more than a point under
    targets = se.plateau_targets(
        {0: {"curve": run}, 1: {"curve": slow}},
        {0: {"curve": none}, 1: {"curve": none}},
        {0: {"curve": slow}, 1: {"curve": run}},
        window=2,
    )
    first, second = targets["per_seed"][0], targets["per_seed"][1]
    assert first["none_plateau"] == {"accuracy": 90.0, "exact_match": 90.0}
    assert first["none_tokens"] == 400 and first["share"] == pytest.approx(120 / 400)
    assert second["share"] is None
    assert first["exact_match_vs_none"] == pytest.approx(-0.5) and second["exact_match_vs_none"] == pytest.approx(-1.5)
    assert targets["vs_random"]["differences"] == pytest.approx([1.0, -1.0])


METRICS = ("accuracy", "exact_match", "visual_accuracy")


def _record(
    task: str, mode: str, seed: int, steps: int, tokens: list[int], accuracy: list[float], eval_every: int = 0
) -> dict:
    """A run record at `steps`, with the task's plateau split and evaluation interval (or `eval_every`)."""
    curve = [
        {"step": i, "answer_tokens": t, "train_seconds": float(i), **dict.fromkeys(METRICS, a)}
        for i, (t, a) in enumerate(zip(tokens, accuracy))
    ]
    settings = {**se.PLATEAU_RUNS[task], "steps": steps, **({"eval_every": eval_every} if eval_every else {})}
    return {
        "task": task,
        "mode": mode,
        "variant": "" if mode == "none" else "target",
        "keep_ratio": 1.0 if mode == "none" else 0.35,
        "seed": seed,
        "curve": curve,
        "final": curve[-1],
        "best": max(curve, key=lambda point: point["accuracy"]),
        "settings": settings,
    }


def test_suite_judges_each_task_on_its_plateau_runs_only() -> None:
    # refer-back, window 1: none reaches its plateau (100) at 400 tokens on both seeds. regate seed 0 reaches it at
    # 200 (0.5 of none's tokens: a hit) and ends on 100; seed 1 never comes within a point (ends on 97.5: 2.5 under).
    # random ends on 90 and 95, so regate's plateau is ahead by 10 and 2.5 on the two seeds.
    rb, sq, ds = (se.PLATEAU_RUNS[task]["steps"] for task in ("refer-back", "squares", "describe"))
    records = [
        _record("refer-back", "none", seed, rb, [0, 200, 400, 600], [10.0, 50.0, 100.0, 100.0]) for seed in (0, 1)
    ] + [
        _record("refer-back", "regate", 0, rb, [0, 100, 200, 300], [10.0, 60.0, 100.0, 100.0]),
        _record("refer-back", "regate", 1, rb, [0, 100, 200, 300], [10.0, 60.0, 90.0, 97.5]),
        _record("refer-back", "random", 0, rb, [0, 100, 200, 300], [10.0, 50.0, 80.0, 90.0]),
        _record("refer-back", "random", 1, rb, [0, 100, 200, 300], [10.0, 50.0, 80.0, 95.0]),
        # squares: regate at the plateau length reaches none's 80 only on its last evaluation (1.5 times none's
        # tokens); a shorter run of another length that looks better must not count
        _record("squares", "none", 0, sq, [0, 200, 400], [10.0, 80.0, 80.0]),
        _record("squares", "regate", 0, sq, [0, 100, 300], [10.0, 40.0, 80.0]),
        _record("squares", "regate", 0, 800, [0, 100, 150], [10.0, 80.0, 80.0]),
        # describe is evaluated every 200 steps at its plateau length: a run evaluated every 100 is another grid
        *(_record("describe", "none", seed, ds, [0, 200, 400], [10.0, 80.0, 80.0]) for seed in (0, 1)),
        _record("describe", "regate", 0, ds, [0, 100, 200], [10.0, 79.5, 80.0]),
        _record("describe", "regate", 1, ds, [0, 100, 200], [10.0, 80.0, 80.0], eval_every=100),
    ]
    settings = {"steps": 400, "test_per_task": 1, "eval_every": 100}  # steps and split are the plateau runs'
    board = se.suite_targets(records, se.settings_of({"settings": settings}), seeds=[0, 1], window=1)
    regate = board["regate target 0.35"]
    assert regate["refer-back"]["reached"] == "1/2" and regate["refer-back"]["under"] == "1/2"
    assert regate["refer-back"]["vs_random"].startswith("+6.2 (2/2,")
    assert regate["refer-back"]["random_control"] == ["random", "target", 0.35]
    assert regate["squares"] == {"reached": "0/1", "under": "0/1", "vs_random": None, "random_control": None}
    assert regate["describe"] == {"reached": "1/1", "under": "0/1", "vs_random": None, "random_control": None}
    assert set(regate) == {"refer-back", "squares", "describe"}
    assert "| regate target 0.35 | ≤ 60%: 1/2; > 2 under: 1/2; vs random target 0.35 +6.2" in se.suite_table(board)


def test_suite_judges_a_task_at_the_length_asked_instead() -> None:
    # squares at 800 steps: regate comes within a point of none's 80 on half of none's tokens (100 against 200)
    records = [
        _record("squares", "none", 0, 800, [0, 200, 400], [10.0, 80.0, 80.0]),
        _record("squares", "regate", 0, 800, [0, 100, 150], [10.0, 80.0, 80.0]),
    ]
    settings = se.settings_of({"settings": {"steps": 400, "test_per_task": 1, "eval_every": 100}})
    assert se.suite_targets(records, settings, seeds=[0], window=1) == {}
    board = se.suite_targets(records, settings, seeds=[0], window=1, lengths=se.plateau_steps(["squares=800"]))
    assert board["regate target 0.35"]["squares"]["reached"] == "1/1"
    for bad in ("square=800", "squares=", "squares=8e2"):
        with pytest.raises(SystemExit, match=f"--plateau-steps '{bad}'"):
            se.plateau_steps([bad])


def test_a_budget_run_is_paired_with_random_at_its_tokens() -> None:
    """A run whose per-row count follows its data is compared with the `random` run that spent its tokens or up to
    10% more (at most 1% fewer), the closest, whatever its keep ratio; with none when no `random` run did."""

    def run(final_tokens: list[int]) -> dict:
        return {seed: {"final": {"answer_tokens": tokens}} for seed, tokens in enumerate(final_tokens)}

    budget = ("regate", "budget", 0.1)
    by_run = {
        budget: run([1000, 1100]),
        ("random", "target", 0.35): run([700, 770]),  # 30% fewer
        ("random", "target", 0.5): run([1050, 1160]),  # 5.2% more
        ("random", "target", 0.45): run([992, 1092]),  # 0.76% fewer
        ("random", "target", 0.6): run([1200, 1300]),  # 19% more
    }
    assert se.equal_token_control(by_run, budget) == ("random", "target", 0.45)
    del by_run[("random", "target", 0.45)]
    assert se.equal_token_control(by_run, budget) == ("random", "target", 0.5)
    del by_run[("random", "target", 0.5)]
    assert se.equal_token_control(by_run, budget) is None


def test_the_baselines_run_the_schedule_variants_and_the_default_unit_only() -> None:
    """`random` gets its own run of each variant that only changes the schedule (its control at equal tokens), and
    runs any other variant as `target`; `none` runs once."""
    got = se.planned_runs(["none", "regate", "random"], [0.35], ["target", "tail", "pair"])
    assert got == [
        ("none", "", 1.0),
        ("regate", "target", 0.35),
        ("regate", "tail", 0.35),
        ("regate", "pair", 0.35),
        ("random", "target", 0.35),
        ("random", "tail", 0.35),
    ]
    assert se.planned_runs(["random"], [0.35, 0.5], ["pair"]) == [("random", "target", 0.35), ("random", "target", 0.5)]
