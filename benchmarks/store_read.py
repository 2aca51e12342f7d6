"""Reading the reference store as a training step does: `losses_block` on a batch, and `get` one key at a time,
against the number of shards.

    git show REV:regate_plugin/core/cache.py > /tmp/cache_before.py   # the reader to compare with (optional)
    python benchmarks/store_read.py [--samples 100000] [--tokens 20] [--shards 2 25 250] [--repeats 7] \
        [--baseline /tmp/cache_before.py] [--clock cpu --threads 1] [--out docs/benchmarks]

For each shard count, a cache of `--samples` samples (random 16-byte keys, 1 to 2 x `--tokens` float16 losses
each) is written in a temporary directory by each implementation's own writer (the baseline's, when given, and
this checkout's `regate_plugin.store`), from the same samples. Then, one thread, medians of `--repeats` rounds in
which the implementations alternate: samples/s of `losses_block(rows, width)` on batches of 8 and 64 random
located rows (width: the batch's longest sample, as the strategy asks), and of `get(key)`. The baseline file is
loaded as a module of `regate_plugin.core`, where `core/cache.py` lived, so its relative imports resolve.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from timing import Clock, add_clock_flags, clock_from

import regate_plugin.store as after

BATCHES = (8, 64)
CALLS = 20000  # samples read per timed block


def load_baseline(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("regate_plugin.core.cache_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build(implementation: ModuleType, directory: Path, keys: np.ndarray, losses: list[torch.Tensor], shards: int):
    per_shard = -(-len(losses) // shards)
    with implementation.ReferenceLossCacheWriter(
        directory, reference="bench", tokenizer_fingerprint="bench", reference_mode="gap", shard_samples=per_shard
    ) as writer:
        for i, values in enumerate(losses):
            writer.add(keys[i].tobytes(), values)
    cache = implementation.ReferenceLossCache(directory)
    assert len(cache.manifest.shards) == shards, (len(cache.manifest.shards), shards)
    return cache


def time_block(cache: Any, rows: np.ndarray, batch: int, clock: Clock) -> float:
    """samples/s of `losses_block` over CALLS // batch batches of `batch` rows."""
    batches = rows[: (CALLS // batch) * batch].reshape(-1, batch)
    lengths = cache.spans(rows)[1][: batches.size].reshape(-1, batch)
    widths = lengths.max(1).tolist()
    start = clock()
    for chunk, width in zip(batches, widths):
        cache.losses_block(chunk, width)
    return batches.size / (clock() - start)


def time_get(cache: Any, keys: list[bytes], clock: Clock) -> float:
    start = clock()
    for key in keys:
        cache.get(key)
    return len(keys) / (clock() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 25, 250])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", type=Path, help="an earlier core/cache.py to compare with")
    parser.add_argument("--out", type=Path, help="write store_read.json here")
    add_clock_flags(parser)
    args = parser.parse_args()
    clock = clock_from(args)
    implementations = {"after": after}
    if args.baseline:
        implementations = {"before": load_baseline(args.baseline), **implementations}
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, size=(args.samples, 16), dtype=np.uint8)
    losses = [torch.rand(int(n)) * 5 for n in rng.integers(args.tokens, 2 * args.tokens + 1, args.samples)]
    picks = rng.integers(0, args.samples, CALLS)
    results: dict[str, Any] = {"settings": {**vars(args), "baseline": str(args.baseline), "out": str(args.out)}}
    with tempfile.TemporaryDirectory() as tmp:
        for shards in args.shards:
            caches = {
                name: build(module, Path(tmp) / f"{name}-{shards}", keys, losses, shards)
                for name, module in implementations.items()
            }
            probe = [keys[i].tobytes() for i in picks]
            rows = {name: cache.locate(probe) for name, cache in caches.items()}
            for name, cache in caches.items():  # the same answers before timing them
                block = cache.losses_block(rows[name][:64], 50)
                assert np.array_equal(block, caches["after"].losses_block(rows["after"][:64], 50), equal_nan=True)
                assert all(torch.equal(cache.get(key), caches["after"].get(key)) for key in probe[:100])
            runs: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for name, cache in caches.items():
                    for batch in BATCHES:
                        runs.setdefault(f"{name} losses_block {batch}", []).append(
                            time_block(cache, rows[name], batch, clock)
                        )
                    runs.setdefault(f"{name} get", []).append(time_get(cache, probe, clock))
            medians = {label: statistics.median(values) for label, values in runs.items()}
            results[str(shards)] = medians
            for label, value in medians.items():
                print(f"{shards:4d} shards  {label:26s} {value / 1e3:8.0f}k samples/s", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "store_read.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
