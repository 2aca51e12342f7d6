"""The demo's runs: `prepare` a seed (data, reference LLM and its cache, the student's start), then `train_mode`
once per elision mode; `run_demo` does both."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import enable_token_elision
from ..core import ReGATEConfig
from ..core.reference import build_reference_input
from ..reference import ReferenceScorer
from ..reference.precompute import PrecomputeConfig, run_precompute
from ..strategies import build_token_elision
from .clock import Stopwatch, Usage, choose_clock, machine_load
from .collate import TrainSample, collate, encode_split
from .config import MODES, TEMPLATE, DemoConfig
from .data import DemoSplits
from .evaluate import evaluate
from .memory import SavedActivations
from .models import (
    build_student,
    processor_for,
    smollm2_base,
    student_lr_scheduler,
    student_parameter_groups,
    tiny_base,
    train_tokenizer,
)
from .results import CurvePoint, DemoResult, Evaluation
from .tasks import TASKS, DemoTask


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
    # One clock for the whole table, decided on all three modes' steps (each mode's own decision may differ).
    choice = choose_clock(cfg.clock, Usage.combined(r.usage for r in results if r.usage is not None))
    results = [r.timed_by(choice) for r in results]
    for result in results:
        if result.checkpoint:
            save_result(result)
    (setup.out_dir / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


def save_result(result: DemoResult) -> None:
    """Write `result` beside its checkpoint, as `demo_result.json`."""
    (Path(result.checkpoint) / "demo_result.json").write_text(json.dumps(asdict(result), indent=2))


def train_mode(
    setup: DemoSetup, mode: str, schedule: ReGATEConfig | None = None, variant: str = "", save: bool = True
) -> DemoResult:
    """Train the student's start with elision `mode` (config `schedule`, default the demo's) on the seed's batches,
    evaluating every `eval_every` steps; saves the checkpoint under `checkpoints/<mode>[-<variant>]` when `save`.
    The steps are timed on both clocks; the result's seconds count the one `cfg.clock` chooses on this mode's steps."""
    cfg = setup.cfg
    schedule = schedule or cfg.schedule()
    name = f"{mode}-{variant}" if variant else mode
    model = copy.deepcopy(setup.start)
    model.train()
    tokenizer = setup.processor.tokenizer
    elision = build_token_elision(mode, schedule, reference=setup.cache_dir, tokenizer=tokenizer)
    enable_token_elision(model, elision)
    optimizer = torch.optim.AdamW(student_parameter_groups(model, cfg.learning_rate))
    lr_scheduler = student_lr_scheduler(optimizer, cfg.lr_schedule, cfg.steps)
    meter = SavedActivations(model)
    answer_tokens, saved, peak, loss = 0, 0, 0, torch.tensor(0.0)
    assert setup.start_evaluation is not None
    curve = [CurvePoint(0, 0, 0.0, **asdict(setup.start_evaluation), wall_seconds=0.0, cpu_seconds=0.0)]
    watch, (load, cores) = Stopwatch(), machine_load()
    for step in tqdm(range(cfg.steps), desc=f"train student ({name})", disable=not cfg.progress):
        rows = [setup.samples[(step * cfg.batch_size + j) % len(setup.samples)] for j in range(cfg.batch_size)]
        batch = collate(rows, tokenizer.pad_token_id)
        with watch:
            elision.set_step(step)
            with meter:
                out = model(**batch)
            out.loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        saved, peak = saved + meter.bytes, max(peak, meter.bytes)
        answer_tokens += out.token_elision["targets"]
        loss = out.loss.detach()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            where = setup.out_dir / "eval" / name / f"step-{step + 1:05d}"
            evaluation = evaluate(model, setup, where, False)
            seconds = {"wall_seconds": watch.wall_seconds, "cpu_seconds": watch.cpu_seconds}
            curve.append(CurvePoint(step + 1, answer_tokens, watch.wall_seconds, **asdict(evaluation), **seconds))
    usage = Usage(watch.wall_seconds, watch.cpu_seconds, torch.get_num_threads(), load, cores)
    result = DemoResult(
        mode,
        variant,
        1.0 if mode == "none" else schedule.keep_ratio,
        answer_tokens,
        elision.stats.kept_fraction,
        watch.wall_seconds,
        saved / cfg.steps / 2**20,
        peak / 2**20,
        float(loss),
        curve,
        usage=usage,
    ).timed_by(choose_clock(cfg.clock, usage))
    if save:
        checkpoint = setup.out_dir / "checkpoints" / name
        model.save_pretrained(checkpoint)
        setup.processor.save_pretrained(checkpoint)
        result.checkpoint = str(checkpoint)
        save_result(result)
    return result
