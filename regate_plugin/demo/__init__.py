"""`regate demo`: the whole ReGATE story on a tiny video LLaVA, offline, in a few minutes on 2 CPU cores.

1. Draw a small video-QA set with PyAV (`demo.data`): train split in the LLaVA conversation format, test split in
   the MVBench layout.
2. Build a base LLM and train it on the text alone: the reference LLM. Build the video LLaVA student from it.
3. `regate precompute` the reference losses of the train split.
4. Train the student three ways from the same start on the same batches: `none`, `regate`, `random`.
5. Score each with the MVBench harness (official protocol) at several points, print a table, plot accuracy
   against answer tokens processed, and save the final checkpoints (HF format, with their results).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import enable_token_elision
from ..core import IGNORE_INDEX, ReGATEConfig, build_token_elision
from ..core.config import ConfigError
from ..core.reference import build_reference_input
from ..data import expand_placeholders, get_template, iter_conversations
from ..eval import aggregate, get_protocol, load_mvbench, predict
from ..eval.frames import VisualSource, sample_official
from ..eval.runners import HFRunner
from ..reference import ReferenceScorer
from ..reference.precompute import PrecomputeConfig, run_precompute
from . import data as demo_data
from .models import PRESETS, ROWS_PER_FRAME, build_student, processor_for, smollm2_base, tiny_base, train_tokenizer

MODES = ("none", "regate", "random")
TEMPLATE = "videollama2"  # VideoLLaMA2's preprocessing on the tokenizer's chat template


@dataclass
class DemoConfig:
    steps: int = 1500
    batch_size: int = 8
    train_size: int = 2400  # clips drawn for training; the steps cycle through them
    test_per_task: int = 30
    num_frames: int = 4  # frames per clip, sampled as the official MVBench protocol does
    keep_ratio: float = 0.35
    warmup_steps: int = ReGATEConfig.warmup_steps  # the dual-cycle schedule: the library's defaults
    cycle_steps: int = ReGATEConfig.cycle_steps
    dense_steps: int = ReGATEConfig.dense_steps
    eval_every: int = 250
    reference_steps: int = 150  # text-only training of the tiny base LLM
    learning_rate: float = 1e-3
    seed: int = 0
    preset: str = "tiny"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {PRESETS}, got {self.preset!r}")
        if min(self.steps, self.batch_size, self.train_size, self.test_per_task, self.num_frames, self.eval_every) < 1:
            raise ConfigError(
                "--steps, --batch-size, --train-size, --test-per-task, --num-frames and --eval-every must be >= 1"
            )


@dataclass
class DemoResult:
    mode: str
    answer_tokens: int  # loss terms trained on
    kept_fraction: float  # kept / elidable answer tokens over the run
    seconds: float  # training steps only (forward, backward, optimizer)
    activation_mib: float  # mean per-step memory autograd saved for backward (parameters excluded)
    peak_activation_mib: float  # the largest step's (a dense step's, under elision)
    accuracy: float  # MVBench average at the end (official protocol)
    final_loss: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (answer tokens, MVBench average), from step 0
    checkpoint: str = ""

    @property
    def best_accuracy(self) -> float:
        return max(accuracy for _, accuracy in self.curve)


@dataclass
class TrainSample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # [frames, 3, H, W]


class SavedActivations:
    """Bytes autograd keeps for backward during a forward: each saved storage once, parameters excluded. It is the
    activation memory that elision shrinks, measured the same way on any device."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.parameters and pointer not in self._seen:
            self._seen.add(pointer)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedActivations:
        self.bytes, self._seen = 0, set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _collate(rows: list[TrainSample], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(row.input_ids) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), pad_id),
        "labels": torch.full((len(rows), length), IGNORE_INDEX),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
    }
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        batch["input_ids"][b, :n] = torch.tensor(row.input_ids)
        batch["labels"][b, :n] = torch.tensor(row.labels)
        batch["attention_mask"][b, :n] = 1
    batch["pixel_values"] = torch.cat([row.pixel_values for row in rows])
    return batch


def encode_train_split(
    splits: demo_data.DemoSplits, tokenizer: Any, processor: Any, image_token_id: int, num_frames: int, progress: bool
) -> list[TrainSample]:
    """The student's training samples: VideoLLaMA2's template on the chat template, `<video>` expanded into the
    image token once per frame row (as the processor does), frames sampled by the official MVBench rule."""
    template = get_template(TEMPLATE)
    samples = []
    records = json.loads(splits.train_json.read_text())
    conversations = list(iter_conversations(splits.train_json))
    for record, conversation in tqdm(
        list(zip(records, conversations, strict=True)), desc="encode train split", disable=not progress
    ):
        encoded = expand_placeholders(
            template.encode(conversation, tokenizer), image_token_id, ROWS_PER_FRAME * num_frames
        )
        frames = sample_official(VisualSource(splits.root / record["video"]), num_frames, None)
        pixels = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
        samples.append(TrainSample(encoded.input_ids, encoded.labels, pixels))
    return samples


def train_reference(
    base: torch.nn.Module, samples: list[TrainSample], image_token_id: int, pad_id: int, cfg: DemoConfig
) -> None:
    """Train the base LLM on what the reference sees: the samples' text, visual rows skipped, positions kept."""
    scorer = ReferenceScorer(base, "gap", (image_token_id,), 1, pad_id)
    inputs = [build_reference_input(s.input_ids, s.labels, (image_token_id,), 1, "gap", pad_id) for s in samples]
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
    base.train()
    for step in tqdm(range(cfg.reference_steps), desc="reference LLM (text only)", disable=not cfg.progress):
        chunk = [inputs[(step * 16 + j) % len(inputs)] for j in range(16)]
        ids, mask, positions, labels = scorer.pad_batch(chunk)
        loss = base(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def evaluate(
    model: torch.nn.Module, processor: Any, mvbench_root: Path, num_frames: int, out: Path, progress: bool
) -> float:
    """MVBench average (official protocol) of the demo's test split; predictions and metrics go to `out`."""
    shutil.rmtree(out, ignore_errors=True)
    data = load_mvbench(mvbench_root, tasks=demo_data.TASK_NAMES)
    protocol = get_protocol("official", num_frames)
    was_training = model.training
    runner = HFRunner(model, processor)
    records = list(
        predict(data, protocol, runner, out / "predictions-official.jsonl", progress=progress, batch_size=16)
    )
    model.train(was_training)
    result = aggregate(records)
    (out / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result.average


def run_demo(out_dir: Path, cfg: DemoConfig | None = None) -> list[DemoResult]:
    cfg = cfg or DemoConfig()
    out_dir = Path(out_dir)
    splits = demo_data.generate(out_dir / "data", cfg.train_size, cfg.test_per_task, cfg.seed, cfg.progress)

    if cfg.preset == "smollm2":
        base, tokenizer = smollm2_base()
    else:
        corpus = [turn["value"] for row in json.loads(splits.train_json.read_text()) for turn in row["conversations"]]
        tokenizer = train_tokenizer(corpus)
        base = tiny_base(tokenizer, cfg.seed)
    processor = processor_for(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.pad_token_id
    samples = encode_train_split(splits, tokenizer, processor, image_token_id, cfg.num_frames, cfg.progress)
    if cfg.preset == "tiny":
        train_reference(base, samples, image_token_id, pad_id, cfg)
        base.save_pretrained(out_dir / "reference")  # `regate precompute --reference OUT/reference` uses it as it is
        tokenizer.save_pretrained(out_dir / "reference")

    cache_dir = out_dir / "reference_cache"
    precompute = PrecomputeConfig(
        data=[splits.train_json],
        reference=f"demo-{cfg.preset}-base",
        template=TEMPLATE,
        out=cache_dir,
        visual_tokens=ROWS_PER_FRAME * cfg.num_frames,
        image_token_id=image_token_id,
        overwrite=True,
        progress=cfg.progress,
    )
    run_precompute(precompute, model=copy.deepcopy(base), tokenizer=tokenizer)

    start = build_student(base, tokenizer, cfg.seed)
    start_accuracy = evaluate(
        start, processor, splits.mvbench_root, cfg.num_frames, out_dir / "eval" / "start", cfg.progress
    )
    schedule = ReGATEConfig(
        keep_ratio=cfg.keep_ratio,
        warmup_steps=cfg.warmup_steps,
        cycle_steps=cfg.cycle_steps,
        dense_steps=cfg.dense_steps,
    )
    results = []
    for mode in MODES:
        results.append(_train_mode(mode, start, samples, schedule, processor, splits, start_accuracy, out_dir, cfg))
    (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


def _train_mode(
    mode: str,
    start: torch.nn.Module,
    samples: list[TrainSample],
    schedule: ReGATEConfig,
    processor: Any,
    splits: demo_data.DemoSplits,
    start_accuracy: float,
    out_dir: Path,
    cfg: DemoConfig,
) -> DemoResult:
    model = copy.deepcopy(start)
    model.train()
    tokenizer = processor.tokenizer
    reference = {"reference": out_dir / "reference_cache", "tokenizer": tokenizer} if mode == "regate" else {}
    elision = build_token_elision(mode, schedule, **reference)
    enable_token_elision(model, elision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    meter = SavedActivations(model)
    answer_tokens, seconds, saved, peak, loss = 0, 0.0, 0, 0, torch.tensor(0.0)
    curve = [(0, start_accuracy)]
    for step in tqdm(range(cfg.steps), desc=f"train student ({mode})", disable=not cfg.progress):
        rows = [samples[(step * cfg.batch_size + j) % len(samples)] for j in range(cfg.batch_size)]
        batch = _collate(rows, tokenizer.pad_token_id)
        began = time.perf_counter()
        elision.set_step(step)
        with meter:
            out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds += time.perf_counter() - began
        saved, peak = saved + meter.bytes, max(peak, meter.bytes)
        answer_tokens += out.token_elision["targets"]
        loss = out.loss.detach()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            where = out_dir / "eval" / mode / f"step-{step + 1:05d}"
            curve.append((answer_tokens, evaluate(model, processor, splits.mvbench_root, cfg.num_frames, where, False)))
    checkpoint = out_dir / "checkpoints" / mode
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    result = DemoResult(
        mode,
        answer_tokens,
        elision.stats.kept_fraction,
        seconds,
        saved / cfg.steps / 2**20,
        peak / 2**20,
        curve[-1][1],
        float(loss),
        curve,
        str(checkpoint),
    )
    (checkpoint / "demo_result.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def plot_curves(results: list[DemoResult], path: Path, title: str = "") -> Path:
    """MVBench accuracy against answer tokens processed, one line per mode (the paper's Figure 1 in miniature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([t for t, _ in r.curve], [a for _, a in r.curve], marker="o", markersize=3, label=r.mode)
    ax.set_xlabel("answer tokens processed (loss terms)")
    ax.set_ylabel("MVBench-format accuracy, official protocol (%)")
    ax.set_title(title or "regate demo")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_results(results: list[DemoResult]) -> str:
    lines = [
        f"{'mode':<8} {'answer tokens':>13} {'kept':>5} {'train s':>7} {'act. MiB mean/peak':>18} "
        f"{'MVBench':>7} {'best':>5} {'last loss':>9}"
    ]
    for r in results:
        memory = f"{r.activation_mib:.1f} / {r.peak_activation_mib:.1f}"
        lines.append(
            f"{r.mode:<8} {r.answer_tokens:>13} {r.kept_fraction:>5.2f} {r.seconds:>7.1f} {memory:>18} "
            f"{r.accuracy:>7.1f} {r.best_accuracy:>5.1f} {r.final_loss:>9.3f}"
        )
    return "\n".join(lines)


__all__ = ["MODES", "DemoConfig", "DemoResult", "SavedActivations", "format_results", "plot_curves", "run_demo"]
