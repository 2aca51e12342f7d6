"""How much a single evaluation of a demo run moves, from the sample-efficiency records alone (no training): per task,
test-split size and mode, the spread of each evaluation's residual (its score minus the mean of its neighbours)
over the second half of the curves; and, for the elided runs, the mean residual by how many sparse steps ran
since the last dense step (does a run score lower right after its sparse steps?).

    python benchmarks/eval_noise.py --evidence docs/benchmarks/evidence.json --out docs/benchmarks/eval_noise.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from sample_efficiency import load_records, settings_of

from regate_plugin.core import ScheduleConfig
from regate_plugin.core.schedule import is_dense_step

# Sparse steps run since the last dense step when a run is evaluated, in bins.
SINCE_DENSE_BINS = ((0, 0, "0 (after dense steps)"), (1, 16, "1-16"), (17, 10**9, "17 or more"))


def sparse_steps_since_dense(steps_done: int, schedule: ScheduleConfig) -> int:
    """How many of the optimizer steps before an evaluation after `steps_done` steps ran sparse since the last dense
    one."""
    count = 0
    for step in range(steps_done - 1, -1, -1):
        if is_dense_step(step, schedule):
            break
        count += 1
    return count


def residuals(curve: list[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    """(step, score minus the mean of the evaluations either side) for every inner evaluation of `curve`."""
    return [
        (curve[i]["step"], curve[i][metric] - (curve[i - 1][metric] + curve[i + 1][metric]) / 2)
        for i in range(1, len(curve) - 1)
    ]


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    return {"n": n, "mean": statistics.fmean(values), "sd": sd, "se": sd / n**0.5 if n else 0.0}


def analyse(records: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The residuals' spread per (task, test size, mode) and their mean per (mode, sparse steps since dense)."""
    spread: dict[str, list[float]] = defaultdict(list)
    by_phase: dict[str, list[float]] = defaultdict(list)
    for record in records:
        settings = settings_of(record)
        curve = record["curve"]
        late = residuals(curve, metric)[len(curve) // 2 - 1 :]
        spread[f"{record['task']} test {settings['test_per_task']} {record['mode']}"] += [r for _, r in late]
        if record["mode"] == "none":
            continue
        schedule = ScheduleConfig(
            warmup_steps=settings["warmup_steps"],
            cycle_steps=settings["cycle_steps"],
            dense_steps=settings["dense_steps"],
        )
        for step, residual in residuals(curve, metric):
            since = sparse_steps_since_dense(step, schedule)
            name = next(label for low, high, label in SINCE_DENSE_BINS if low <= since <= high)
            by_phase[f"{record['mode']} {name}"].append(residual)
    return {
        "spread": {key: _stats(values) for key, values in sorted(spread.items())},
        "by_sparse_steps_since_dense": {key: _stats(values) for key, values in sorted(by_phase.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evidence", type=Path, nargs="+", default=[Path("docs/benchmarks/evidence.json")])
    parser.add_argument("--llm-lr-factor", type=float, default=0.1, help="only records of this student (default 0.1)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    records = [
        r
        for path in args.evidence
        for r in load_records(path)
        if settings_of(r)["llm_lr_factor"] == args.llm_lr_factor and r["variant"] in ("", "target")
    ]
    result = {metric: analyse(records, metric) for metric in ("accuracy", "exact_match")}
    for metric, tables in result.items():
        for table, rows in tables.items():
            print(f"\n{metric}, residual {table}:")
            for key, s in rows.items():
                print(f"  {key:<40} n {s['n']:>4}  mean {s['mean']:+6.2f} ± {s['se']:.2f}  sd {s['sd']:5.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
