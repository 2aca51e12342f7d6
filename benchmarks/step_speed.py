"""Training-step time of a Llama-style decoder on merged multimodal batches: ReGATE's compaction against full
training, and each measured time ratio beside the ideal ratio from a FLOP count of the same shapes.

    python benchmarks/step_speed.py [--repeats 3] [--hidden 256] [--layers 4] [--device cpu|cuda] \
        [--out docs/benchmarks]
    python benchmarks/step_speed.py --replot docs/benchmarks/step_speed_cpu.json   # table and plot again

One step = forward + backward + AdamW step over the decoder and LM head, with the batch already merged (visual
rows are embeddings, as after LLaVA's merge). Modes, interleaved in every repeat (best of `--repeats` kept):
- `full`: upstream-style, `model(inputs_embeds, labels)`: logits at every position.
- `labels_only`: the same tokens, logits only at the positions with a label (our chunked loss).
- `regate@k`: the batch compacted to the answer tokens ReGATE keeps at ratio k (fused reference + EMA scores from a
  cache), logits at kept targets only.
- `mask@k`: the same selection through the attention mask (dropped tokens are hidden from every other token and
  from the loss, but still go through the decoder and the LM head): a naive implementation of token dropping.
`select` is the time of ReGATE's scoring and selection (`plan`) and of its EMA update (`observe`) inside the regate
steps, as a share of the regate step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from regate_plugin.core import (
    IGNORE_INDEX,
    ReferenceLossCacheWriter,
    ReGATEConfig,
    batch_sample_keys,
    build_token_elision,
    next_token_loss,
    shift_targets,
)

VOCAB = 32000
VISUAL_ID = 5


@dataclass(frozen=True)
class Shape:
    name: str
    visual: int  # visual rows per sample
    prompt: int  # text tokens before the answer
    answer: int  # answer tokens (labelled)

    @property
    def length(self) -> int:
        return self.visual + self.prompt + self.answer


SHAPES = (
    Shape("video-like (answers 10%)", 1200, 144, 150),
    Shape("image chat (answers 30%)", 576, 140, 310),
    Shape("text heavy (answers 60%)", 144, 160, 460),
)


def make_batch(shape: Shape, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Pre-merge ids (visual rows as one placeholder id each), labels on the answer; rows differ in length."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (batch, shape.length), generator=gen)
    ids[:, : shape.visual] = VISUAL_ID
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, shape.visual + shape.prompt :] = ids[:, shape.visual + shape.prompt :]
    mask = torch.ones_like(ids)
    for b in range(1, batch):  # right padding: later rows are a little shorter
        cut = shape.length - 16 * b
        mask[b, cut:] = 0
        labels[b, cut:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def step_flops(config: LlamaConfig, lengths: list[int], logit_positions: int) -> float:
    """Forward + backward (3x forward) FLOPs: linear layers per token, causal attention per row, LM head per logit."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = d * config.num_key_value_heads // config.num_attention_heads
    linear = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * f)
    attention = sum(2 * layers * 2 * length * length * d / 2 for length in lengths)  # QK^T and AV, causal half
    return 3 * (linear * sum(lengths) + attention + 2 * d * config.vocab_size * logit_positions)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
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
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    head = model.lm_head
    batches = {
        shape.name: {k: v.to(device) for k, v in make_batch(shape, args.batch, i).items()}
        for i, shape in enumerate(SHAPES)
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
    elisions = {}
    for k in args.keep:
        elision = build_token_elision(
            "regate", ReGATEConfig(keep_ratio=k, warmup_steps=0, cycle_steps=4, dense_steps=1), reference=cache
        )
        elision.set_step(2)  # a sparse step
        elisions[k] = elision

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def optimizer_step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full(name: str) -> dict:
        b = batches[name]
        out = model(inputs_embeds=embeds[name], attention_mask=b["attention_mask"], labels=b["labels"])
        optimizer_step(out.loss)
        lengths = b["attention_mask"].sum(1).tolist()
        return {"flops": step_flops(config, lengths, sum(lengths))}

    def labels_only(name: str, labels: torch.Tensor | None = None) -> dict:
        b = batches[name]
        labels = b["labels"] if labels is None else labels
        hidden = model.model(inputs_embeds=embeds[name], attention_mask=b["attention_mask"]).last_hidden_state
        targets = shift_targets(labels, b["attention_mask"])
        optimizer_step(next_token_loss(hidden, targets, head).loss)
        return {"flops": step_flops(config, b["attention_mask"].sum(1).tolist(), int((targets != IGNORE_INDEX).sum()))}

    def regate(name: str, k: float) -> dict:
        elision = elisions[k]
        b = batches[name]
        began = time.perf_counter()
        plan = elision.plan(
            b["labels"], b["attention_mask"], batch_sample_keys(b["input_ids"], b["labels"], b["attention_mask"])
        )
        sync()
        select = time.perf_counter() - began
        observe, observed = elision.observe, [0.0]

        def timed_observe(*a, **kw):
            sync()
            t = time.perf_counter()
            observe(*a, **kw)
            sync()
            observed[0] += time.perf_counter() - t

        elision.observe = timed_observe
        mask = plan.compact_attention_mask(b["attention_mask"])
        hidden = model.model(
            inputs_embeds=plan.compact_embeddings(embeds[name]),
            attention_mask=mask,
            position_ids=plan.compact_position_ids(None),
        ).last_hidden_state
        optimizer_step(elision.loss(plan, hidden, head).loss)
        del elision.observe
        counts = plan.counts
        lengths = mask.sum(1).tolist()
        return {"flops": step_flops(config, lengths, counts["targets"]), "select_s": select + observed[0]}

    def masked(name: str, k: float) -> dict:
        b = batches[name]
        plan = elisions[k].plan(
            b["labels"], b["attention_mask"], batch_sample_keys(b["input_ids"], b["labels"], b["attention_mask"])
        )
        dropped = plan.candidates & ~plan.kept_mask  # the token at t is the input whose target is labels[t + 1]
        mask = b["attention_mask"].masked_fill(dropped, 0)
        labels = b["labels"].clone()
        labels[:, 1:][dropped[:, :-1]] = IGNORE_INDEX
        out = model(inputs_embeds=embeds[name], attention_mask=mask, labels=labels)
        optimizer_step(out.loss)
        lengths = b["attention_mask"].sum(1).tolist()
        return {"flops": step_flops(config, lengths, sum(lengths))}

    modes = {"full": full, "labels_only": labels_only}
    for k in args.keep:
        modes[f"regate@{k}"] = lambda name, k=k: regate(name, k)
        modes[f"mask@{k}"] = lambda name, k=k: masked(name, k)

    results: dict[str, dict[str, dict]] = {shape.name: {} for shape in SHAPES}
    for name in results:
        for fn in modes.values():  # warm-up
            fn(name)
    for repeat in range(args.repeats):
        for name in results:
            for mode, fn in modes.items():
                sync()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                began = time.perf_counter()
                info = fn(name)
                sync()
                seconds = time.perf_counter() - began
                best = results[name].get(mode)
                if best is None or seconds < best["seconds"]:
                    info["seconds"] = seconds
                    if device.type == "cuda":
                        info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    results[name][mode] = info
            print(f"repeat {repeat + 1}/{args.repeats}: {name} done", file=sys.stderr)
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype),
        "config": {"hidden": args.hidden, "layers": args.layers, "vocab": VOCAB, "batch": args.batch},
        "results": results,
    }


def table(report: dict) -> str:
    lines = [
        "| shape | mode | step (s) | time / full | ideal (FLOPs) / full | measured / ideal | select + EMA share |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, modes in report["results"].items():
        full = modes["full"]
        for mode, r in modes.items():
            ratio, ideal = r["seconds"] / full["seconds"], r["flops"] / full["flops"]
            share = f"{100 * r['select_s'] / r['seconds']:.1f}%" if "select_s" in r else ""
            lines.append(
                f"| {name} | {mode} | {r['seconds']:.3f} | {ratio:.3f} | {ideal:.3f} | {ratio / ideal:.3f} | {share} |"
            )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Measured time / full (bars) beside the FLOP ideal (black ticks), one group per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(report["results"])
    modes = list(report["results"][shapes[0]])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs = [s + (i - (len(modes) - 1) / 2) * width for s in range(len(shapes))]
        rows = [report["results"][shape][mode] for shape in shapes]
        full = [report["results"][shape]["full"] for shape in shapes]
        ax.bar(xs, [r["seconds"] / f["seconds"] for r, f in zip(rows, full)], width, label=mode)
        ax.scatter(
            xs, [r["flops"] / f["flops"] for r, f in zip(rows, full)], marker="_", color="black", s=200, zorder=3
        )
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("step time / full (bars), FLOP ideal (ticks)")
    ax.set_title(f"training step on {report['device']}, {report['dtype']}")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--replot", type=Path, help="print the table and redraw the plot of a saved report")
    args = parser.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        print(table(report))
        print(f"plot: {plot(report, args.replot.with_suffix('.png'))}")
        return
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if args.device == "cuda" else "cpu"
    (args.out / f"step_speed_{tag}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"step_speed_{tag}.png")
    print(f"device: {report['device']}, {report['dtype']}, {report['config']}")
    print(table(report))


if __name__ == "__main__":
    main()
