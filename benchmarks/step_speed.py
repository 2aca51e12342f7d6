"""Training-step time of a Llama-style decoder under token elision, against measured baselines (no FLOP model).

    python benchmarks/step_speed.py [--repeats 7] [--hidden 256] [--layers 4] [--device cpu|cuda] \
        [--out docs/benchmarks]
    python benchmarks/step_speed.py --replot docs/benchmarks/step_speed_cpu.json   # table and plot again
    python benchmarks/step_speed.py --clock cpu --threads 1 --tag _cputime   # on a shared CPU machine

One step = forward + backward + AdamW step over the decoder and LM head, with the batch already merged (visual
rows are embeddings, as after LLaVA's merge). Every mode below runs once per repeat, in turn, on every shape, and
each mode's median over the repeats is reported; ratios are medians of the per-repeat ratios (two modes of one
repeat ran back to back, so a shared machine's load cancels out of their ratio):
- `labels_only`: the plain step on the full batch, logits only at the positions with a label (no elision code).
- `none`: the same through the library (`plan`, `compact_*`, `loss` of the `none` strategy).
- `regate dense`: ReGATE on a dense step of its schedule (everything kept): its overhead over `none`.
- `regate@k`: ReGATE on a sparse step (fused reference + EMA scores from a cache, keep ratio k).
- `kept alone@k`: the limit: a plain step on exactly the tokens `regate@k` keeps, gathered before the clock
  starts (their embeddings, mask, original positions and targets), with no elision code.
- `labels_only+mask@k`: the naive implementation: the same selection hidden through the attention mask (dropped
  tokens are masked from every other token and from the loss, but still go through the decoder).
`bookkeeping` is the time of ReGATE's keys, selection (`plan`) and EMA update (`observe`) inside the `regate@k`
step, as a share of it. A separate `bookkeeping` shape (16 x 2048) measures that share at scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from timing import add_clock_flags, clock_from
from transformers import LlamaConfig, LlamaForCausalLM

from regate_plugin.core import (
    IGNORE_INDEX,
    ReGATEConfig,
    batch_sample_keys,
    next_token_loss,
    shift_targets,
)
from regate_plugin.store import ReferenceLossCacheWriter
from regate_plugin.strategies import build_token_elision

VOCAB = 32000
VISUAL_ID = 5
SPARSE_STEP, DENSE_STEP = 2, 0  # of the schedule below: warmup 0, cycle 4, 1 dense step


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    visual: int  # visual rows per sample, at the start
    turns: tuple[tuple[int, int], ...]  # (prompt tokens, answer tokens) per turn
    ragged: int  # later rows are this many tokens shorter each (right padding)

    @property
    def length(self) -> int:
        return self.visual + sum(p + a for p, a in self.turns)


SHAPES = {
    "demo": Shape("demo (8 x ~190, 16 answer tokens)", 8, 16, ((158, 16),), 0),
    "chat": Shape("chat (8 x ~512, ~300 answer tokens in 3 turns)", 8, 64, ((50, 100), (50, 100), (48, 100)), 4),
    "bookkeeping": Shape("16 x 2048, ~500 answer tokens in 3 turns", 16, 576, ((300, 170), (300, 170), (362, 170)), 0),
}


def make_batch(shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    """Pre-merge ids (visual rows as one placeholder id each), labels on the answers; right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (shape.batch, shape.length), generator=gen)
    ids[:, : shape.visual] = VISUAL_ID
    labels = torch.full_like(ids, IGNORE_INDEX)
    at = shape.visual
    for prompt, answer in shape.turns:
        labels[:, at + prompt : at + prompt + answer] = ids[:, at + prompt : at + prompt + answer]
        at += prompt + answer
    mask = torch.ones_like(ids)
    for b in range(1, shape.batch):
        cut = shape.length - shape.ragged * b
        mask[b, cut:] = 0
        labels[b, cut:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    clock = clock_from(args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 2),
        num_key_value_heads=max(args.hidden // 128, 1),
        max_position_embeddings=4096,
    )
    config._attn_implementation = args.attn
    model = LlamaForCausalLM(config).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    head = model.lm_head
    shapes = {name: SHAPES[name] for name in args.shapes}
    batches = {
        name: {k: v.to(device) for k, v in make_batch(s, i).items()} for i, (name, s) in enumerate(shapes.items())
    }
    embeds = {
        name: torch.randn(*b["input_ids"].shape, args.hidden, device=device, dtype=dtype) for name, b in batches.items()
    }
    cache = Path(tempfile.mkdtemp(prefix="step-speed-cache-"))
    gen = torch.Generator().manual_seed(1)
    with ReferenceLossCacheWriter(
        cache, reference="random", tokenizer_fingerprint="bench", reference_mode="gap"
    ) as writer:
        for b in batches.values():
            n_targets = (shift_targets(b["labels"], b["attention_mask"]) != IGNORE_INDEX).sum(1).tolist()
            for key, n in zip(batch_sample_keys(b["input_ids"], b["labels"], b["attention_mask"]), n_targets):
                writer.add(key, torch.rand(n, generator=gen) * 5)

    def elision(name: str, keep: float, step: int):
        cfg = ReGATEConfig(keep_ratio=keep, warmup_steps=0, cycle_steps=4, dense_steps=1)
        built = build_token_elision(name, cfg, reference=cache, vocab_size=VOCAB)
        built.set_step(step)
        return built

    none = elision("none", 1.0, DENSE_STEP)
    dense = elision("regate", 1.0, DENSE_STEP)
    sparse = {k: elision("regate", k, SPARSE_STEP) for k in args.keep}
    # The kept set of each shape at each k, for the limit and the naive mask (a copy of the strategy, so that
    # planning here leaves the timed strategy's EMA as it is).
    selections = {}
    for name, b in batches.items():
        keys = batch_sample_keys(b["input_ids"], b["labels"], b["attention_mask"])
        for k in args.keep:
            plan = elision("regate", k, SPARSE_STEP).plan(b["labels"], b["attention_mask"], keys)
            selections[name, k] = plan

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def optimizer_step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain(inputs_embeds, attention_mask, targets, position_ids=None) -> None:
        hidden = model.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        optimizer_step(next_token_loss(hidden, targets, head).loss)

    def labels_only(name: str) -> dict:
        b = batches[name]
        plain(embeds[name], b["attention_mask"], shift_targets(b["labels"], b["attention_mask"]))
        return {}

    def through_library(name: str, strategy) -> dict:
        b = batches[name]
        began = clock()
        keys = (
            batch_sample_keys(b["input_ids"], b["labels"], b["attention_mask"])
            if strategy.capabilities.sample_keys
            else None
        )
        plan = strategy.plan(b["labels"], b["attention_mask"], keys)
        sync()
        bookkeeping = clock() - began
        observe, observed = strategy.observe, [0.0]

        def timed_observe(*a, **kw):
            sync()
            t = clock()
            observe(*a, **kw)
            sync()
            observed[0] += clock() - t

        strategy.observe = timed_observe
        try:
            hidden = model.model(
                inputs_embeds=plan.compact_embeddings(embeds[name]),
                attention_mask=plan.compact_attention_mask(b["attention_mask"]),
                position_ids=plan.compact_position_ids(None),
            ).last_hidden_state
            optimizer_step(strategy.loss(plan, hidden, head).loss)
        finally:
            del strategy.observe
        return {"bookkeeping_s": bookkeeping + observed[0]}

    def kept_alone(name: str, k: float) -> tuple:
        plan = selections[name, k]
        mask = plan.compact_attention_mask(batches[name]["attention_mask"])
        return plan.compact_embeddings(embeds[name]), mask, plan.compact_targets(), plan.compact_position_ids(None)

    def masked(name: str, k: float) -> tuple:
        b, plan = batches[name], selections[name, k]
        dropped = plan.candidates & ~plan.kept_mask  # the token at t is the input whose target is labels[t + 1]
        mask = b["attention_mask"].masked_fill(dropped, 0)
        targets = shift_targets(b["labels"], b["attention_mask"]).masked_fill(dropped, IGNORE_INDEX)
        return embeds[name], mask, targets

    library: dict[str, Callable[[str], dict]] = {  # timed from the raw batch
        "labels_only": labels_only,
        "none": lambda name: through_library(name, none),
        "regate dense": lambda name: through_library(name, dense),
    }
    prepared: dict[str, Callable[[str], tuple]] = {}  # inputs made off the clock, then a plain step is timed
    for k in args.keep:
        library[f"regate@{k}"] = lambda name, k=k: through_library(name, sparse[k])
        prepared[f"kept alone@{k}"] = lambda name, k=k: kept_alone(name, k)
        prepared[f"labels_only+mask@{k}"] = lambda name, k=k: masked(name, k)
    modes = [*library, *prepared]

    def timed(name: str, mode: str) -> dict:
        inputs = prepared[mode](name) if mode in prepared else None
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        began = clock()
        if inputs is None:
            info = library[mode](name)
        else:
            plain(*inputs)
            info = {}
        sync()
        info["seconds"] = clock() - began
        if device.type == "cuda":
            info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return info

    samples: dict[str, dict[str, list[dict]]] = {}
    for name in shapes:  # the bookkeeping shape times only the ReGATE steps
        wanted = [m for m in modes if name != "bookkeeping" or m.startswith("regate@")]
        samples[name] = {mode: [] for mode in wanted}
        for mode in wanted:  # warm-up
            timed(name, mode)
    for repeat in range(args.repeats):
        for name in shapes:
            for mode in samples[name]:
                samples[name][mode].append(timed(name, mode))
            print(f"repeat {repeat + 1}/{args.repeats}: {name} done", file=sys.stderr)
    results = {}
    for name, by_mode in samples.items():
        results[name] = {}
        for mode, runs in by_mode.items():
            entry = {"seconds": statistics.median(r["seconds"] for r in runs), "repeats": [r["seconds"] for r in runs]}
            if "bookkeeping_s" in runs[0]:
                entry["bookkeeping_share"] = statistics.median(r["bookkeeping_s"] / r["seconds"] for r in runs)
                entry["bookkeeping_ms"] = 1000 * statistics.median(r["bookkeeping_s"] for r in runs)
            if "peak_mem_gib" in runs[0]:
                entry["peak_mem_gib"] = max(r["peak_mem_gib"] for r in runs)
            results[name][mode] = entry
    return {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype),
        "clock": args.clock,
        "config": {"hidden": args.hidden, "layers": args.layers, "vocab": VOCAB, "attn": args.attn},
        "shapes": {name: SHAPES[name].name for name in shapes},
        "keep": args.keep,
        "results": results,
    }


def _ratio(modes: dict, mode: str, base: str) -> str:
    """Median over the repeats of mode / base within each repeat (the two ran back to back, under the same load)."""
    if base not in modes:
        return ""
    paired = [a / b for a, b in zip(modes[mode]["repeats"], modes[base]["repeats"])]
    return f"{statistics.median(paired):.3f}"


def table(report: dict) -> str:
    """Median step per mode, and the ratios the targets are stated in (medians of per-repeat ratios)."""
    lines = [
        "| shape | mode | median step (s) | / labels_only | / none | / kept alone | bookkeeping share |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, modes in report["results"].items():
        title = report["shapes"][name]
        for mode, r in modes.items():
            k = mode.split("@")[1] if "@" in mode else None
            limit = f"kept alone@{k}" if k and not mode.startswith("kept") else ""
            ratios = [_ratio(modes, mode, base) for base in ("labels_only", "none", limit)]
            share = f"{100 * r['bookkeeping_share']:.1f}%" if "bookkeeping_share" in r else ""
            if "bookkeeping_ms" in r:
                share += f" ({r['bookkeeping_ms']:.1f} ms)"
            lines.append(f"| {title} | {mode} | {r['seconds']:.4f} | {' | '.join(ratios)} | {share} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Median step time of each mode / `labels_only`, one group per shape (bookkeeping shape left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in report["results"] if "labels_only" in report["results"][s]]
    modes = list(report["results"][shapes[0]])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs = [s + (i - (len(modes) - 1) / 2) * width for s in range(len(shapes))]
        ys = [report["results"][s][mode]["seconds"] / report["results"][s]["labels_only"]["seconds"] for s in shapes]
        ax.bar(xs, ys, width, label=mode)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(shapes)), [report["shapes"][s] for s in shapes], fontsize=8)
    ax.set_ylabel("median step time / labels_only")
    ax.set_title(f"training step on {report['device']}, {report['dtype']}, {report['config']['attn']}")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["demo", "chat", "bookkeeping"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    add_clock_flags(parser)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--tag", default="", help="suffix of the report's file names")
    parser.add_argument("--replot", type=Path, help="print the table and redraw the plot of a saved report")
    args = parser.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        print(table(report))
        print(f"plot: {plot(report, args.replot.with_suffix('.png'))}")
        return
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step_speed_{'gpu' if args.device == 'cuda' else 'cpu'}{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"{stem}.png")
    print(f"device: {report['device']}, {report['dtype']}, {report['config']}")
    print(table(report))


if __name__ == "__main__":
    main()
