"""How large a per-answer budget would be: from a reference cache (`regate precompute`), the share of the elidable
answer tokens whose reference loss is above a threshold (the text alone cannot predict them), and the share they make
together with the token after each (whose input is the high-reference token: the `with_input` and `pair` units keep
it along). No training; the cache is read as stored, one row per distinct sample text. Answers are taken as one
turn each: a multi-turn sample's later turns start with a token the prompt predicts, counted here as a candidate.

    python benchmarks/reference_budget.py CACHE_DIR [CACHE_DIR ...] [--thresholds 0.1 0.35 0.693]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from regate_plugin.core.selection import reference_budget
from regate_plugin.store import open_store


def budget_shares(losses: np.ndarray, lengths: np.ndarray, threshold: float) -> tuple[float, float]:
    """(high, with inputs): shares of the candidates (answer ordinals 1 to n - 1 of each row: ordinal 0 is predicted
    from the prompt, so it is never elided) whose reference loss is above `threshold`, and of those plus each one's
    successor candidate: what `keep_budget='reference'` keeps under the `target` and the `with_input` units
    (`selection.reference_budget`). `losses` float [rows, width] by answer ordinal (NaN past a row's `lengths`)."""
    total = max(int(np.maximum(lengths - 1, 0).sum()), 1)
    high, paired = (int(reference_budget(losses, lengths, threshold, inputs).sum()) for inputs in (False, True))
    return high / total, paired / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("caches", type=Path, nargs="+", help="reference cache directories (`regate precompute`)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.35, math.log(2)])
    args = parser.parse_args()
    print("| cache | answers | mean length | " + " | ".join(f"> {t:.2f}: high / with inputs" for t in args.thresholds))
    print("|---|---:|---:|" + "---|" * len(args.thresholds))
    for directory in args.caches:
        store = open_store(directory)
        rows = store.locate(list(store.keys()))
        _, lengths = store.spans(rows)
        losses = store.losses_block(rows, int(lengths.max(initial=1)))
        shares = [budget_shares(losses, lengths, threshold) for threshold in args.thresholds]
        cells = [f"{high:.2f} / {paired:.2f}" for high, paired in shares]
        print(f"| {directory} | {len(rows)} | {lengths.mean():.1f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
