"""What a demo run reports: evaluations, the accuracy curve, and each mode's result."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .clock import ClockChoice, Usage


@dataclass
class Evaluation:
    accuracy: float  # the task's benchmark score of generated answers (MVBench average, GQA-rule accuracy)
    visual_accuracy: float  # % of the answer tokens that need the video predicted right (teacher forcing, argmax)
    exact_match: float  # % of answers whose every token, EOS included, is the argmax: what greedy decoding writes


@dataclass
class CurvePoint:
    step: int
    answer_tokens: int  # loss terms trained on so far
    train_seconds: float  # training steps so far (forward, backward, optimizer) on the result's `clock`
    accuracy: float
    visual_accuracy: float
    exact_match: float
    wall_seconds: float | None = None  # train_seconds on each clock (both measured by every demo run; None where a
    cpu_seconds: float | None = None  # run was timed on one clock only)


@dataclass
class DemoResult:
    mode: str
    variant: str  # the elision options that differ from the demo's defaults, "" for none
    keep_ratio: float  # on sparse steps (1.0 for `none`)
    answer_tokens: int  # loss terms trained on
    kept_fraction: float  # kept / elidable answer tokens over the run
    seconds: float  # training steps only (forward, backward, optimizer) on `clock`
    activation_mib: float  # mean per-step memory autograd saved for backward (parameters excluded)
    peak_activation_mib: float  # the largest step's (a dense step's, under elision)
    final_loss: float
    curve: list[CurvePoint] = field(default_factory=list)  # from step 0
    checkpoint: str = ""
    clock: str = ""  # what `seconds` and the curve's `train_seconds` count: "wall" or "cpu" ("" if not recorded)
    clock_reason: str = ""  # why (`clock.choose_clock`): the measurements that decided it
    usage: Usage | None = None  # both clocks over the training steps, threads, load and cores

    def timed_by(self, choice: ClockChoice) -> DemoResult:
        """This result with its seconds, and its curve's, on `choice`'s clock (from the seconds measured on both)."""

        def on_clock(wall: float | None, cpu: float | None) -> float:
            seconds = cpu if choice.clock == "cpu" else wall
            if seconds is None:
                raise ValueError("timed_by needs the seconds measured on both clocks")
            return seconds

        curve = [replace(p, train_seconds=on_clock(p.wall_seconds, p.cpu_seconds)) for p in self.curve]
        usage = self.usage
        seconds = on_clock(*((usage.wall_seconds, usage.cpu_seconds) if usage else (None, None)))
        return replace(self, seconds=seconds, curve=curve, clock=choice.clock, clock_reason=choice.reason)

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
        usage = values.get("usage")
        return cls(
            **{
                **values,
                "curve": [CurvePoint(**point) for point in values["curve"]],
                "usage": None if usage is None else Usage.from_dict(usage),
            }
        )
