"""What a demo run reports: evaluations, the accuracy curve, and each mode's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
