"""`regate demo`: the whole ReGATE story on a tiny video LLaVA, offline, in a few minutes on 2 CPU cores.

1. Make the task's data (`demo.tasks`): by default a small video-QA set drawn with PyAV (`demo.data`), or easy-VQA's
   images and questions (`--task easy-vqa`): train split in the LLaVA conversation format, test split in its
   benchmark's layout (MVBench's, GQA's).
2. Build a base LLM and train it on the text alone: the reference LLM. Build the video LLaVA student from it.
3. `regate precompute` the reference losses of the train split.
4. Train the student three ways from the same start on the same batches: `none`, `regate`, `random`.
5. Score each with the task's harness (MVBench's official protocol, GQA's rule) at several points, print a table,
   plot accuracy against answer tokens processed, and save the final checkpoints (HF format, with their results).
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..adapters import enable_token_elision
from ..core import IGNORE_INDEX, ReGATEConfig
from ..core.config import ConfigError
from ..core.reference import build_reference_input
from ..data import expand_placeholders, get_template, iter_conversations
from ..eval.frames import VisualSource, sample_official
from ..eval.runners import HFRunner
from ..reference import ReferenceScorer
from ..reference.precompute import PrecomputeConfig, run_precompute
from ..strategies import build_token_elision
from .data import DemoSplits
from .models import PRESETS, build_student, processor_for, smollm2_base, tiny_base, train_tokenizer
from .tasks import TASKS, DemoTask

MODES = ("none", "regate", "random")
# What training seconds count (here and in benchmarks/): CPU time is what a shared machine barely disturbs, with one
# torch thread (a waiting thread's time counts too).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
TEMPLATE = "videollama2"  # VideoLLaMA2's preprocessing on the tokenizer's chat template


@dataclass
class DemoConfig:
    task: str = "squares"  # `demo.tasks.TASKS`
    steps: int | None = None  # default: the task's (400 for squares, 800 for easy-vqa)
    batch_size: int = 8
    train_size: int = 2400  # training samples (clips drawn, easy-VQA questions); the steps cycle through them
    test_per_task: int | None = None  # test questions per MVBench task / per colour; default: the task's
    num_frames: int = 4  # frames per clip, sampled as the official MVBench protocol does
    keep_ratio: float = 0.35
    # The dual-cycle schedule scaled to a 400-step run (docs/BENCHMARKS.md): the library's 100 warm-up steps are
    # about 2% of a LLaVA-1.5 fine-tune but a quarter of this run; cycles keep the library's share of dense steps.
    warmup_steps: int = 25
    cycle_steps: int = 64
    dense_steps: int = 8
    eval_every: int = 100
    reference_steps: int = 150  # text-only training of the tiny base LLM
    learning_rate: float = 1e-3
    seed: int = 0
    preset: str = "tiny"
    clock: str = "wall"  # what `train_seconds` counts: "wall" (elapsed) or "cpu" (this process's CPU time)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ConfigError(f"--clock must be one of {sorted(CLOCKS)}, got {self.clock!r}")
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {sorted(TASKS)}, got {self.task!r}")
        task = TASKS[self.task]
        self.steps = task.steps if self.steps is None else self.steps
        self.test_per_task = task.test_per_task if self.test_per_task is None else self.test_per_task
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {PRESETS}, got {self.preset!r}")
        if min(self.steps, self.batch_size, self.train_size, self.test_per_task, self.num_frames, self.eval_every) < 1:
            raise ConfigError(
                "--steps, --batch-size, --train-size, --test-per-task, --num-frames and --eval-every must be >= 1"
            )

    def schedule(self, **changes: Any) -> ReGATEConfig:
        """The elision config of a run: the demo's keep ratio and schedule, the library's other defaults, `changes`."""
        base = {
            "keep_ratio": self.keep_ratio,
            "warmup_steps": self.warmup_steps,
            "cycle_steps": self.cycle_steps,
            "dense_steps": self.dense_steps,
        }
        return ReGATEConfig(**{**base, **changes})


@dataclass
class Evaluation:
    accuracy: float  # the task's benchmark score of generated answers (MVBench average, GQA-rule accuracy)
    visual_accuracy: float  # % of the answer tokens that need the video predicted right (teacher forcing, argmax)
    exact_match: float  # % of answers whose every token, EOS included, is the argmax: what greedy decoding writes


@dataclass
class CurvePoint:
    step: int
    answer_tokens: int  # loss terms trained on so far
    train_seconds: float  # training steps so far (forward, backward, optimizer)
    accuracy: float
    visual_accuracy: float
    exact_match: float


@dataclass
class DemoResult:
    mode: str
    variant: str  # the elision options that differ from the demo's defaults, "" for none
    keep_ratio: float  # on sparse steps (1.0 for `none`)
    answer_tokens: int  # loss terms trained on
    kept_fraction: float  # kept / elidable answer tokens over the run
    seconds: float  # training steps only (forward, backward, optimizer)
    activation_mib: float  # mean per-step memory autograd saved for backward (parameters excluded)
    peak_activation_mib: float  # the largest step's (a dense step's, under elision)
    final_loss: float
    curve: list[CurvePoint] = field(default_factory=list)  # from step 0
    checkpoint: str = ""

    @property
    def final(self) -> CurvePoint:
        return self.curve[-1]

    @property
    def accuracy(self) -> float:
        return self.final.accuracy

    @property
    def best_accuracy(self) -> float:
        return max(point.accuracy for point in self.curve)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DemoResult:
        return cls(**{**values, "curve": [CurvePoint(**point) for point in values["curve"]]})


@dataclass
class TrainSample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # [frames, 3, H, W]
    visual: list[bool] = field(default_factory=list)  # per supervised label: it needs the video (test split only)


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


def _visual_targets(labels: list[int], tokenizer: Any, answer: str, spans: list[list[int]], where: str) -> list[bool]:
    """Per supervised label: whether its text overlaps one of the answer's `spans` (characters that need the video)."""
    ids = [label for label in labels if label != IGNORE_INDEX]
    ends = [len(tokenizer.decode(ids[: j + 1])) for j in range(len(ids))]
    if not tokenizer.decode(ids).startswith(answer):
        raise ValueError(f"{where}: the supervised tokens do not decode to the answer {answer!r}")
    starts = [0, *ends[:-1]]
    return [any(a < end and start < b for a, b in spans) for start, end in zip(starts, ends)]


def encode_split(
    split_json: Path,
    root: Path,
    tokenizer: Any,
    processor: Any,
    image_token_id: int,
    task: DemoTask,
    num_frames: int,
    progress: bool,
) -> list[TrainSample]:
    """A split's samples as the student trains on them: VideoLLaMA2's template on the chat template, `<video>` or
    `<image>` expanded into the image token once per visual row (as the processor does), a clip's frames sampled by
    the official MVBench rule; with `visual_spans` in a record (the test split), which answer tokens need the
    visual input."""
    template = get_template(TEMPLATE)
    samples = []
    records = json.loads(split_json.read_text())
    conversations = list(iter_conversations(split_json))
    for record, conversation in tqdm(
        list(zip(records, conversations, strict=True)), desc=f"encode {split_json.name}", disable=not progress
    ):
        encoded = expand_placeholders(
            template.encode(conversation, tokenizer), image_token_id, task.visual_rows(num_frames)
        )
        if task.video:
            frames = sample_official(VisualSource(root / record["video"]), num_frames, None)
        else:
            frames = [Image.open(root / record["image"]).convert("RGB")]
        pixels = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
        visual = []
        if "visual_spans" in record:
            where = f"{split_json} record {record['id']}"
            answer = record["conversations"][-1]["value"]
            visual = _visual_targets(encoded.labels, tokenizer, answer, record["visual_spans"], where)
        samples.append(TrainSample(encoded.input_ids, encoded.labels, pixels, visual))
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


@torch.no_grad()
def answer_token_metrics(model: torch.nn.Module, test: list[TrainSample], pad_id: int) -> tuple[float, float]:
    """Visual-token accuracy and whole-answer exact match (%), by teacher forcing: the argmax at each answer
    position against its token. An answer is matched when every argmax is right, which is exactly when greedy
    decoding from the prompt writes it, EOS included."""
    correct_visual = total_visual = matched = 0
    for i in range(0, len(test), 16):
        rows = test[i : i + 16]
        batch = _collate(rows, pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        right = logits[:, :-1].argmax(-1) == labels[:, 1:]
        supervised = labels[:, 1:] != IGNORE_INDEX
        for b, row in enumerate(rows):
            hits = right[b][supervised[b]]
            visual = torch.tensor(row.visual, dtype=torch.bool)
            correct_visual += int(hits[visual].sum())
            total_visual += int(visual.sum())
            matched += bool(hits.all())
    return 100.0 * correct_visual / max(total_visual, 1), 100.0 * matched / len(test)


def evaluate(model: torch.nn.Module, setup: DemoSetup, out: Path, progress: bool) -> Evaluation:
    """The task's benchmark score of the demo's test split, and the answer-token metrics of the same questions;
    predictions and metrics go to `out`."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    was_training = model.training
    model.eval()
    runner = HFRunner(model, setup.processor)
    accuracy, result = setup.task.score(runner, setup.splits, setup.cfg.num_frames, out, progress)
    visual_accuracy, exact_match = answer_token_metrics(
        model, setup.test_samples, setup.processor.tokenizer.pad_token_id
    )
    model.train(was_training)
    metrics = {**result, "visual_accuracy": visual_accuracy, "exact_match": exact_match}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return Evaluation(accuracy, visual_accuracy, exact_match)


@dataclass
class DemoSetup:
    """What every run of one seed shares: data, the reference cache, the student's start and its evaluation."""

    cfg: DemoConfig
    out_dir: Path
    splits: DemoSplits
    processor: Any
    samples: list[TrainSample]
    test_samples: list[TrainSample]
    start: torch.nn.Module
    start_evaluation: Evaluation | None = None

    @property
    def task(self) -> DemoTask:
        return TASKS[self.cfg.task]

    @property
    def cache_dir(self) -> Path:
        return self.out_dir / "reference_cache"


def prepare(out_dir: Path, cfg: DemoConfig) -> DemoSetup:
    """Draw the data, train the reference on the text alone, precompute its losses, build the student's start."""
    out_dir = Path(out_dir)
    task = TASKS[cfg.task]
    splits = task.generate(out_dir / "data", cfg.train_size, cfg.test_per_task, cfg.seed, cfg.progress)
    if cfg.preset == "smollm2":
        base, tokenizer = smollm2_base()
    else:
        corpus = [turn["value"] for row in json.loads(splits.train_json.read_text()) for turn in row["conversations"]]
        tokenizer = train_tokenizer(corpus)
        base = tiny_base(tokenizer, cfg.seed)
    processor = processor_for(tokenizer, task.image_size, task.patch)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.pad_token_id
    encode = functools.partial(
        encode_split,
        root=splits.root,
        tokenizer=tokenizer,
        processor=processor,
        image_token_id=image_token_id,
        task=task,
        num_frames=cfg.num_frames,
        progress=cfg.progress,
    )
    samples, test_samples = encode(splits.train_json), encode(splits.test_json)
    if cfg.preset == "tiny":
        train_reference(base, samples, image_token_id, pad_id, cfg)
        base.save_pretrained(out_dir / "reference")  # `regate precompute --reference OUT/reference` uses it as it is
        tokenizer.save_pretrained(out_dir / "reference")
    precompute = PrecomputeConfig(
        data=[splits.train_json],
        reference=f"demo-{cfg.preset}-base",
        template=TEMPLATE,
        out=out_dir / "reference_cache",
        visual_tokens=task.visual_rows(cfg.num_frames),
        image_token_id=image_token_id,
        overwrite=True,
        progress=cfg.progress,
    )
    run_precompute(precompute, model=copy.deepcopy(base), tokenizer=tokenizer)
    student = build_student(base, tokenizer, cfg.seed, task.image_size, task.patch)
    setup = DemoSetup(cfg, out_dir, splits, processor, samples, test_samples, student)
    setup.start_evaluation = evaluate(setup.start, setup, out_dir / "eval" / "start", cfg.progress)
    return setup


def run_demo(out_dir: Path, cfg: DemoConfig | None = None) -> list[DemoResult]:
    cfg = cfg or DemoConfig()
    setup = prepare(out_dir, cfg)
    results = [train_mode(setup, mode) for mode in MODES]
    (setup.out_dir / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


def train_mode(
    setup: DemoSetup, mode: str, schedule: ReGATEConfig | None = None, variant: str = "", save: bool = True
) -> DemoResult:
    """Train the student's start with elision `mode` (config `schedule`, default the demo's) on the seed's batches,
    evaluating every `eval_every` steps; saves the checkpoint under `checkpoints/<mode>[-<variant>]` when `save`."""
    cfg = setup.cfg
    schedule = schedule or cfg.schedule()
    name = f"{mode}-{variant}" if variant else mode
    model = copy.deepcopy(setup.start)
    model.train()
    tokenizer = setup.processor.tokenizer
    elision = build_token_elision(mode, schedule, reference=setup.cache_dir, tokenizer=tokenizer)
    enable_token_elision(model, elision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    meter = SavedActivations(model)
    answer_tokens, seconds, saved, peak, loss = 0, 0.0, 0, 0, torch.tensor(0.0)
    assert setup.start_evaluation is not None
    curve = [CurvePoint(0, 0, 0.0, **asdict(setup.start_evaluation))]
    clock = CLOCKS[cfg.clock]
    for step in tqdm(range(cfg.steps), desc=f"train student ({name})", disable=not cfg.progress):
        rows = [setup.samples[(step * cfg.batch_size + j) % len(setup.samples)] for j in range(cfg.batch_size)]
        batch = _collate(rows, tokenizer.pad_token_id)
        began = clock()
        elision.set_step(step)
        with meter:
            out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds += clock() - began
        saved, peak = saved + meter.bytes, max(peak, meter.bytes)
        answer_tokens += out.token_elision["targets"]
        loss = out.loss.detach()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            where = setup.out_dir / "eval" / name / f"step-{step + 1:05d}"
            evaluation = evaluate(model, setup, where, False)
            curve.append(CurvePoint(step + 1, answer_tokens, seconds, **asdict(evaluation)))
    result = DemoResult(
        mode,
        variant,
        1.0 if mode == "none" else schedule.keep_ratio,
        answer_tokens,
        elision.stats.kept_fraction,
        seconds,
        saved / cfg.steps / 2**20,
        peak / 2**20,
        float(loss),
        curve,
    )
    if save:
        checkpoint = setup.out_dir / "checkpoints" / name
        model.save_pretrained(checkpoint)
        setup.processor.save_pretrained(checkpoint)
        result.checkpoint = str(checkpoint)
        (checkpoint / "demo_result.json").write_text(json.dumps(asdict(result), indent=2))
    return result


__all__ = [
    "MODES",
    "CurvePoint",
    "DemoConfig",
    "DemoResult",
    "DemoSetup",
    "encode_split",
    "Evaluation",
    "SavedActivations",
    "prepare",
    "run_demo",
    "train_mode",
]
