"""Throughput of `regate precompute` against the reference LLM's decoder alone over the same tokens, and `gap` against
`pad` mode, on a VideoLLaMA2-like length mix (576 visual rows, 100-400 text tokens).

    python benchmarks/precompute_throughput.py [--reference smollm2] [--samples 6] [--repeats 3] [--clock wall|cpu] \
        [--threads N] [--out docs/benchmarks]

The comparator runs the reference LLM's decoder (no LM head) on the very batches precompute plans (same padding, same
position ids), with no tokenization, loss or cache writes: the least work any scorer of these tokens does, since
precompute adds only the LM head at answer targets and the bookkeeping. Both run once per repeat, in turn, and
each one's median over `--repeats` is reported (this machine is shared).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import add_clock_flags, clock_from

from regate_plugin.data import PLACEHOLDER_IDS, get_template, parse_sample
from regate_plugin.reference import ReferenceScorer, load_reference_model
from regate_plugin.reference.precompute import PrecomputeConfig, plan_batches, prepare_sample, run_precompute

WORDS = "the object in the video is a red green blue circle square that moves left right up down and then stops".split()


def make_samples(n: int, seed: int) -> list[dict]:
    """Video QA samples whose text (question + answers) is 100-400 tokens."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        target_words = rng.randint(70, 300)
        turns = []
        while sum(len(t["value"].split()) for t in turns) < target_words:
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) + "."
            turns += [{"from": "human", "value": ("<video>\n" if not turns else "") + q}, {"from": "gpt", "value": a}]
        samples.append({"id": str(i), "video": f"{i}.mp4", "conversations": turns})
    return samples


def decoder_seconds(
    model, tokenizer, samples: list[dict], mode: str, rows: int, batch_tokens: int, clock=time.perf_counter
) -> tuple[float, int]:
    template = get_template("videollama2")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prepared = [
        prepare_sample(parse_sample(s, i, "bench"), template, tokenizer, None, rows, mode, pad)
        for i, s in enumerate(samples)
    ]
    batches = plan_batches([p.length for p in prepared], batch_tokens)
    forward = model.get_decoder()
    scorer = ReferenceScorer(model, mode, PLACEHOLDER_IDS, rows, pad)
    tokens = 0
    start = clock()
    with torch.no_grad():
        for batch in batches:
            items = [prepared[i].reference_input for i in batch]
            ids, mask, positions, _ = scorer.pad_batch(items)
            tokens += int(mask.sum())
            forward(input_ids=ids, attention_mask=mask, position_ids=positions)
    return clock() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="smollm2")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--rows", type=int, default=576)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmarks")
    add_clock_flags(parser)
    args = parser.parse_args()
    clock = clock_from(args)

    torch.manual_seed(args.seed)
    model, tokenizer = load_reference_model(args.reference)
    samples = make_samples(args.samples, args.seed)
    work = Path(tempfile.mkdtemp(prefix="regate-bench-"))
    data = work / "train.json"
    data.write_text(json.dumps(samples))
    times: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    for repeat in range(args.repeats):
        for mode in ("gap", "pad"):
            seconds, tokens[mode] = decoder_seconds(
                model, tokenizer, samples, mode, args.rows, args.batch_tokens, clock
            )
            times.setdefault(f"decoder-{mode}", []).append(seconds)
            cfg = PrecomputeConfig(
                data=[data],
                reference=args.reference,
                template="videollama2",
                out=work / f"cache-{mode}-{repeat}",
                visual_tokens=args.rows,
                mode=mode,
                batch_tokens=args.batch_tokens,
                progress=False,
            )
            began = clock()
            run_precompute(cfg, model=model, tokenizer=tokenizer)
            precompute_s = clock() - began
            times.setdefault(f"precompute-{mode}", []).append(precompute_s)
            print(f"repeat {repeat} {mode}: precompute {precompute_s:.2f} s, decoder {seconds:.2f} s", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in times.items()}
    text_tokens = tokens["gap"]
    rows = [
        {
            "mode": mode,
            "reference_tokens": tokens[mode],
            "decoder_s": median[f"decoder-{mode}"],
            "precompute_s": median[f"precompute-{mode}"],
            "throughput_vs_decoder": median[f"decoder-{mode}"] / median[f"precompute-{mode}"],
            "repeats": {"decoder_s": times[f"decoder-{mode}"], "precompute_s": times[f"precompute-{mode}"]},
        }
        for mode in ("gap", "pad")
    ]
    result = {
        "command": "python " + " ".join(sys.argv),
        "reference": args.reference,
        "samples": args.samples,
        "visual_rows": args.rows,
        "visual_share_in_pad": 1 - text_tokens / tokens["pad"],
        "gap_speedup_over_pad": median["precompute-pad"] / median["precompute-gap"],
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precompute_throughput.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
