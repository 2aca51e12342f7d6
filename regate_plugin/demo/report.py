"""What `regate demo` and `benchmarks/sample_efficiency.py` report: the table, the plot, and the few lines a user
should take away (did ReGATE reach `none`'s best, with what share of its answer tokens and seconds; against
`random` at equal tokens). Curves are sequences of evaluation points as dicts (`CurvePoint` fields)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .clock import CLOCK_NAMES
from .results import DemoResult
from .tasks import TASKS

Curve = Sequence[Mapping[str, Any]]


def first_reaching(curve: Curve, target: float) -> Mapping[str, Any] | None:
    """The first evaluation whose accuracy reaches `target`, or None."""
    return next((point for point in curve if point["accuracy"] >= target - 1e-9), None)


def accuracy_at(curve: Curve, tokens: float) -> float:
    """The curve's accuracy at `tokens` answer tokens, linearly interpolated between evaluations (the last one's
    beyond the curve's end)."""
    for before, after in zip(curve, curve[1:]):
        if after["answer_tokens"] >= tokens:
            span = after["answer_tokens"] - before["answer_tokens"]
            weight = (tokens - before["answer_tokens"]) / span if span else 1.0
            return before["accuracy"] + weight * (after["accuracy"] - before["accuracy"])
    return curve[-1]["accuracy"]


def peak(curve: Curve) -> Mapping[str, Any]:
    """The first evaluation with the curve's best accuracy."""
    return max(curve, key=lambda point: point["accuracy"])


def _curve(result: DemoResult) -> list[dict[str, Any]]:
    return [asdict(point) for point in result.curve]


def takeaways(results: list[DemoResult], task: str = "squares") -> list[str]:
    """Plain sentences on the default runs (no variant) of `none`, `regate` and `random`."""
    metric = TASKS[task].metric
    runs = {r.mode: r for r in results if not r.variant}
    none, regate, random = runs.get("none"), runs.get("regate"), runs.get("random")
    lines = []
    if none and regate:
        none_curve = _curve(none)
        best = peak(none_curve)
        if best["step"] == 0:
            lines.append(f"none never beat the start ({best['accuracy']:.1f} {metric}): train longer (--steps).")
        else:
            hit = first_reaching(_curve(regate), best["accuracy"])
            if hit is None:
                lines.append(
                    f"ReGATE did not reach none's best {metric} ({best['accuracy']:.1f}, step {best['step']}) within "
                    f"{regate.curve[-1].step} steps: it ended at {regate.accuracy:.1f}, with "
                    f"{regate.answer_tokens / none.answer_tokens:.0%} of none's answer tokens."
                )
            else:
                clock = f" ({CLOCK_NAMES[none.clock]})" if none.clock in CLOCK_NAMES else ""  # "": not recorded
                lines.append(
                    f"ReGATE reached none's best {metric} ({best['accuracy']:.1f}, step {best['step']}) at step "
                    f"{hit['step']}, with {hit['answer_tokens'] / best['answer_tokens']:.0%} of the answer tokens and "
                    f"{hit['train_seconds'] / best['train_seconds']:.0%} of the training seconds{clock} none needed "
                    "for it."
                )
        lines.append(
            f"At ReGATE's {regate.answer_tokens:,} answer tokens none stood at "
            f"{accuracy_at(none_curve, regate.answer_tokens):.1f} {metric}; ReGATE ended at {regate.accuracy:.1f}."
        )
    if regate and random:
        lines.append(
            f"Against random elision of as many tokens: {metric} {regate.accuracy:.1f} against {random.accuracy:.1f}, "
            f"whole-answer exact match {regate.final.exact_match:.1f} against {random.final.exact_match:.1f}."
        )
    if lines:
        lines.append(
            "One seed is one draw; the 5-seed evidence is benchmarks/sample_efficiency.py (docs/BENCHMARKS.md)."
        )
    return lines


def plot_curves(results: list[DemoResult], path: Path, task: str = "squares") -> Path:
    """The task's benchmark accuracy and whole-answer exact match against answer tokens processed, one line per run
    (the paper's Figure 1 in miniature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = f"{r.mode} {r.variant}".strip() + ("" if r.mode == "none" else f" (keep {r.keep_ratio:g})")
        tokens = [p.answer_tokens for p in r.curve]
        axes[0].plot(tokens, [p.accuracy for p in r.curve], marker="o", markersize=3, label=label)
        axes[1].plot(tokens, [p.exact_match for p in r.curve], marker="o", markersize=3, label=label)
    none = next((r for r in results if r.mode == "none" and not r.variant), None)
    if none is not None:
        axes[0].axhline(none.best_accuracy, color="grey", linestyle=":", linewidth=1, label="none's best")
    axes[0].set_ylabel(f"{TASKS[task].metric} accuracy (%)")
    axes[1].set_ylabel("whole-answer exact match (%)")
    for ax in axes:
        ax.set_xlabel("answer tokens processed (loss terms)")
        ax.legend()
    fig.suptitle(f"regate demo --task {task}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def clock_line(results: list[DemoResult]) -> str:
    """Which clock the table's seconds count, and why (the same for every run of one demo)."""
    return f"training seconds: {results[0].clock_reason}" if results else ""


def format_results(results: list[DemoResult], task: str = "squares") -> str:
    lines = [
        f"{'mode':<8} {'answer tokens':>13} {'kept':>5} {'train s':>7} {'act. MiB mean/peak':>18} "
        f"{TASKS[task].metric:>8} {'best':>5} {'visual':>6} {'exact':>5} {'last loss':>9}"
    ]
    for r in results:
        memory = f"{r.activation_mib:.1f} / {r.peak_activation_mib:.1f}"
        name = f"{r.mode}-{r.variant}" if r.variant else r.mode
        lines.append(
            f"{name:<8} {r.answer_tokens:>13} {r.kept_fraction:>5.2f} {r.seconds:>7.1f} {memory:>18} "
            f"{r.accuracy:>8.1f} {r.best_accuracy:>5.1f} {r.final.visual_accuracy:>6.1f} {r.final.exact_match:>5.1f} "
            f"{r.final_loss:>9.3f}"
        )
    return "\n".join(lines)
