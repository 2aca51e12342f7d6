"""`ReGATEConfig`: every knob of the method, validated on construction (DESIGN.md §1)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

ReferenceMode = Literal["gap", "pad"]
ScoreNorm = Literal["none", "zscore"]
MissingReference = Literal["error", "ema"]
EMADtype = Literal["float32", "float16"]

REFERENCE_MODES: tuple[str, ...] = ("gap", "pad")
SCORE_NORMS: tuple[str, ...] = ("none", "zscore")
MISSING_REFERENCE_POLICIES: tuple[str, ...] = ("error", "ema")
EMA_DTYPES: tuple[str, ...] = ("float32", "float16")


class ConfigError(ValueError):
    """A `ReGATEConfig` field holds a value outside its allowed range."""


@dataclass(frozen=True)
class ReGATEConfig:
    """Hyperparameters of ReGATE; defaults are the paper's (PAPER.md §3)."""

    keep_ratio: float = 0.5
    """Fraction of elidable answer tokens kept on sparse steps, in (0, 1]."""
    lam: float = 0.5
    """Weight of the reference loss in the fused score d = (1-lam)*m + lam*ref, in [0, 1]."""
    ema_beta: float = 0.9
    """Decay of the student-difficulty EMA, in [0, 1)."""
    warmup_steps: int = 100
    """Dense optimizer steps before the first cycle, >= 0."""
    cycle_steps: int = 128
    """Length C of one dense+sparse cycle in optimizer steps, >= 1."""
    dense_steps: int = 16
    """Dense steps F at the start of each cycle, in [0, cycle_steps]."""
    score_norm: ScoreNorm = "none"
    """'none' fuses raw losses; 'zscore' standardises each signal per sample first."""
    reference_mode: ReferenceMode = "gap"
    """How the text-only reference sees visual rows: 'gap' (skip, keep positions) or 'pad' (pad tokens)."""
    missing_reference: MissingReference = "error"
    """A sample absent from the reference cache: 'error' stops, 'ema' scores it by the EMA alone and counts it."""
    seed: int = 0
    """Seed of the `random` baseline's generator."""
    loss_chunk_size: int = 0
    """Rows of logits materialised at once in the loss (recomputed in backward); 0 computes them in one piece."""
    ema_dtype: EMADtype = "float32"
    """Storage of the per-(sample, answer token) EMA: 'float32' (4 B per answer token) or 'float16' (2 B)."""

    def __post_init__(self) -> None:
        _check_range("keep_ratio", self.keep_ratio, "(0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_range("lam", self.lam, "[0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_range("ema_beta", self.ema_beta, "[0, 1)", lambda v: 0.0 <= v < 1.0)
        for name in ("warmup_steps", "cycle_steps", "dense_steps", "seed", "loss_chunk_size"):
            _check_int(name, getattr(self, name))
        _check_range("warmup_steps", self.warmup_steps, "integers >= 0", lambda v: v >= 0)
        _check_range("cycle_steps", self.cycle_steps, "integers >= 1", lambda v: v >= 1)
        _check_range(
            "dense_steps",
            self.dense_steps,
            f"integers in [0, cycle_steps={self.cycle_steps}]",
            lambda v: 0 <= v <= self.cycle_steps,
        )
        _check_range("loss_chunk_size", self.loss_chunk_size, "integers >= 0", lambda v: v >= 0)
        _check_choice("score_norm", self.score_norm, SCORE_NORMS)
        _check_choice("reference_mode", self.reference_mode, REFERENCE_MODES)
        _check_choice("missing_reference", self.missing_reference, MISSING_REFERENCE_POLICIES)
        _check_choice("ema_dtype", self.ema_dtype, EMA_DTYPES)

    def replace(self, **changes: Any) -> ReGATEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReGATEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"ReGATEConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"ReGATEConfig.{name}={value!r} must be an integer")


def _check_range(name: str, value: Any, allowed: str, ok: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
        raise ConfigError(f"ReGATEConfig.{name}={value!r} is outside the allowed range {allowed}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"ReGATEConfig.{name}={value!r} is not one of {list(choices)}")
