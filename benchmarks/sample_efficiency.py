"""Sample efficiency on the demo task: MVBench-format accuracy (official protocol) against answer tokens processed
for `none`, `regate` and `random`, over several seeds, and the answer tokens each mode needs to reach the `none`
run's best accuracy.

    python benchmarks/sample_efficiency.py [--seeds 0 1 2] [--steps 1500] [--eval-every 125] [--out docs/benchmarks]

Each seed regenerates the data, the reference LLM and the student start; the three modes of a seed share them and
see the same batches (`regate_plugin.demo.run_demo`). The task is the demo's as it is; nothing is tuned to the method.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from regate_plugin.demo import DemoConfig, DemoResult, format_results, plot_curves, run_demo


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Answer tokens at the first evaluation whose accuracy reaches `target`, or None."""
    return next((tokens for tokens, accuracy in curve if accuracy >= target), None)


def accuracy_at(curve: list[tuple[int, float]], tokens: int) -> float:
    """Accuracy of the last evaluation at or before `tokens` answer tokens."""
    return [a for t, a in curve if t <= tokens][-1]


def summarize(runs: dict[int, list[DemoResult]]) -> dict:
    rows = {}
    for seed, results in runs.items():
        by_mode = {r.mode: r for r in results}
        best = max(a for _, a in by_mode["none"].curve)
        needed = {mode: tokens_to_reach(r.curve, best) for mode, r in by_mode.items()}
        budget = by_mode["random"].answer_tokens  # regate and random process the same number of answer tokens
        rows[seed] = {
            "none_best_accuracy": best,
            "tokens_to_none_best": needed,
            "regate_tokens_over_none": None if needed["regate"] is None else needed["regate"] / needed["none"],
            "final_accuracy": {mode: r.accuracy for mode, r in by_mode.items()},
            # mean over the evaluations after step 0 (same steps for every mode): less noisy than one point
            "mean_accuracy": {mode: sum(a for _, a in r.curve[1:]) / len(r.curve[1:]) for mode, r in by_mode.items()},
            "accuracy_at_equal_tokens": {
                mode: accuracy_at(by_mode[mode].curve, budget) for mode in ("regate", "random")
            },
            "answer_tokens": {mode: r.answer_tokens for mode, r in by_mode.items()},
            "curves": {mode: r.curve for mode, r in by_mode.items()},
        }
    return rows


def table(rows: dict) -> str:
    lines = [
        "| seed | none best acc | tokens to reach it: none | regate | random | regate / none "
        "| acc at equal tokens: regate | random |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, r in rows.items():
        need = r["tokens_to_none_best"]
        ratio = "not reached" if r["regate_tokens_over_none"] is None else f"{r['regate_tokens_over_none']:.2f}"
        fmt = {m: "not reached" if need[m] is None else str(need[m]) for m in need}
        eq = r["accuracy_at_equal_tokens"]
        lines.append(
            f"| {seed} | {r['none_best_accuracy']:.1f} | {fmt['none']} | {fmt['regate']} | {fmt['random']} | {ratio} | "
            f"{eq['regate']:.1f} | {eq['random']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=125)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    runs = {}
    for seed in args.seeds:
        cfg = DemoConfig(steps=args.steps, eval_every=args.eval_every, seed=seed)
        runs[seed] = run_demo(Path(tempfile.mkdtemp(prefix=f"sample-eff-{seed}-")), cfg)
        print(f"seed {seed}\n{format_results(runs[seed])}", flush=True)
    rows = summarize(runs)
    for seed, results in runs.items():
        rows[seed]["runs"] = [{k: v for k, v in asdict(r).items() if k not in ("curve", "checkpoint")} for r in results]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sample_efficiency.json").write_text(json.dumps(rows, indent=2))
    for seed, results in runs.items():
        plot_curves(results, args.out / f"sample_efficiency_seed{seed}.png", f"demo task, seed {seed}")
    print(table(rows))


if __name__ == "__main__":
    main()
