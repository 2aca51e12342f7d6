"""ReGATE's state at scale: opening a reference cache, looking samples up, and the student EMA's size and update.

    python benchmarks/state_scale.py [--samples 1000000] [--tokens 100] [--repeats 5] [--clock wall|cpu] \
        [--out docs/benchmarks]

Builds a cache of `--samples` samples x `--tokens` answer tokens (float16 losses, random 16-byte keys, shards of
65536 samples) with `ReferenceLossCacheWriter` in a temporary directory, then measures on one thread:

- open: seconds and Python-heap bytes per sample (tracemalloc: numpy arrays included; the memory-mapped losses
  are not, they stay in the page cache) of `ReferenceLossCache(dir)` with and without the sha256 check;
- lookups/s: `locate` on batches of 4096 keys, and `get` one key at a time;
- EMA: bytes per answer token of its state, and the time of one batch's update (64 samples, every token observed,
  one closed-form fold), per sample.

Timings are medians of `--repeats` interleaved repeats. Nothing is extrapolated at the default size; a smaller
`--samples` run says so in its output.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from timing import Clock, add_clock_flags, clock_from

from regate_plugin.core.ema import DifficultyEMA
from regate_plugin.store import ReferenceLossCache, ReferenceLossCacheWriter


def build_cache(directory: Path, samples: int, tokens: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 256, size=(samples, 16), dtype=np.uint8)
    losses = torch.from_numpy(rng.random((samples, tokens), dtype=np.float32) * 5)
    with ReferenceLossCacheWriter(
        directory,
        reference="bench",
        tokenizer_fingerprint="bench",
        reference_mode="gap",
        dtype="float16",
        shard_samples=65536,
    ) as writer:
        for i in range(samples):
            writer.add(keys[i].tobytes(), losses[i])
    return [keys[i].tobytes() for i in range(samples)]


def open_cache(directory: Path, verify: bool, clock: Clock) -> tuple[float, int]:
    """(seconds, bytes held by the opened cache)."""
    gc.collect()
    tracemalloc.start()
    start = clock()
    cache = ReferenceLossCache(directory, verify=verify)
    seconds = clock() - start
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(cache) > 0
    return seconds, held


def time_locate(cache: ReferenceLossCache, keys: list[bytes], clock: Clock, batch: int = 4096) -> float:
    chunks = [keys[i : i + batch] for i in range(0, min(len(keys), 64 * batch), batch)]
    start = clock()
    for chunk in chunks:
        rows = cache.locate(chunk)
    seconds = clock() - start
    assert (rows >= 0).all()
    return sum(len(c) for c in chunks) / seconds


def time_get(cache: ReferenceLossCache, keys: list[bytes], clock: Clock, n: int = 100_000) -> float:
    picked = keys[:: max(len(keys) // n, 1)][:n]
    start = clock()
    for key in picked:
        cache.get(key)
    return len(picked) / (clock() - start)


def time_ema_update(cache: ReferenceLossCache, keys: list[bytes], tokens: int, clock: Clock, batch: int = 64) -> float:
    """Seconds per sample of folding one batch of `batch` samples (all their tokens) into the EMA."""
    ema = DifficultyEMA(0.9, cache.tokens, vocab_size=32000)
    starts, lengths = cache.spans(cache.locate(keys[:batch]))
    slots = torch.from_numpy(starts).repeat_interleave(tokens) + torch.arange(tokens).repeat(batch)
    token_ids = torch.randint(0, 32000, (batch * tokens,))
    losses = torch.rand(batch * tokens) * 5
    ema.update(slots, token_ids, losses)  # warm
    start = clock()
    ema.update(slots, token_ids, losses)
    return (clock() - start) / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write state_scale.json here")
    add_clock_flags(parser)
    args = parser.parse_args(argv)
    args.threads = args.threads or 1  # one thread, as the targets are stated
    clock = clock_from(args)
    with tempfile.TemporaryDirectory(prefix="regate-state-") as tmp:
        directory = Path(tmp) / "cache"
        t0 = time.perf_counter()
        keys = build_cache(directory, args.samples, args.tokens)
        build_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in directory.iterdir())
        cache = ReferenceLossCache(directory, verify=False)
        runs: dict[str, list[float]] = {
            k: [] for k in ("open_s", "open_verify_s", "open_bytes", "locate", "get", "ema")
        }
        for _ in range(args.repeats):  # interleaved: one of each per repeat
            seconds, held = open_cache(directory, verify=False, clock=clock)
            runs["open_s"].append(seconds)
            runs["open_bytes"].append(held)
            runs["open_verify_s"].append(open_cache(directory, verify=True, clock=clock)[0])
            runs["locate"].append(time_locate(cache, keys, clock))
            runs["get"].append(time_get(cache, keys, clock))
            runs["ema"].append(time_ema_update(cache, keys, args.tokens, clock))
        ema = DifficultyEMA(0.9, cache.tokens, vocab_size=32000)
        state = ema.state_dict()
        ema_bytes = state["values"].numel() * state["values"].element_size()
        median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "samples": args.samples,
        "answer_tokens_per_sample": args.tokens,
        "build_s": build_s,
        "disk_bytes_per_token": disk / (args.samples * args.tokens),
        "open_s": median["open_s"],
        "open_verify_s": median["open_verify_s"],
        "open_bytes_per_sample": median["open_bytes"] / args.samples,
        "locate_per_s": median["locate"],
        "get_per_s": median["get"],
        "ema_bytes_per_answer_token": ema_bytes / (args.samples * args.tokens),
        "ema_fp16_bytes_per_answer_token": 2.0,
        "ema_update_us_per_sample": median["ema"] * 1e6,
        "repeats": args.repeats,
        "clock": args.clock,
        "extrapolated": args.samples < 1_000_000,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "state_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
