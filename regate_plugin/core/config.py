"""`ReGATEConfig`: every knob of the method, validated on construction (docs/METHOD.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import UserError

ScoreNorm = Literal["none", "zscore"]
MissingReference = Literal["error", "ema"]
EMADtype = Literal["float32", "float16"]
ElisionUnit = Literal["target", "pair", "loss_only"]
EMAObserve = Literal["all", "dense"]
ResumeWithoutState = Literal["error", "fresh"]

SCORE_NORMS: tuple[str, ...] = get_args(ScoreNorm)
MISSING_REFERENCE_POLICIES: tuple[str, ...] = get_args(MissingReference)
EMA_DTYPES: tuple[str, ...] = get_args(EMADtype)
ELISION_UNITS: tuple[str, ...] = get_args(ElisionUnit)
EMA_OBSERVE: tuple[str, ...] = get_args(EMAObserve)
RESUME_WITHOUT_STATE_POLICIES: tuple[str, ...] = get_args(ResumeWithoutState)


class ConfigError(UserError, ValueError):
    """A setting (a `ReGATEConfig` field, a command-line flag) holds a value outside its allowed range; `field`
    names the config field where there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _knob(default: Any, help: str, flag: str | None = None) -> Any:
    """A field with its help text; `flag` names its `--regate_<flag>` command-line flag where that is not the
    field's own name (the training flags are generated from these fields, see `training.arguments`)."""
    metadata = {"help": help} if flag is None else {"help": help, "flag": flag}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ReGATEConfig:
    """Hyperparameters of ReGATE; defaults are the paper's (docs/TRAINING.md, "Flags")."""

    keep_ratio: float = _knob(0.5, "Fraction of elidable answer tokens kept on sparse steps, in (0, 1].")
    lam: float = _knob(
        0.5, "Weight of the reference loss in the fused score d = (1-lam)*m + lam*ref, in [0, 1].", flag="lambda"
    )
    ema_beta: float = _knob(0.9, "Decay of the student-difficulty EMA, in [0, 1).")
    warmup_steps: int = _knob(100, "Dense optimizer steps before the first cycle, >= 0.")
    cycle_steps: int = _knob(128, "Length C of one dense+sparse cycle in optimizer steps, >= 1.")
    dense_steps: int = _knob(16, "Dense steps F at the start of each cycle, in [0, cycle_steps].")
    score_norm: ScoreNorm = _knob(
        "none", "'none' fuses raw losses; 'zscore' standardises each signal per sample first."
    )
    missing_reference: MissingReference = _knob(
        "error",
        "A sample absent from the reference cache: 'error' stops, 'ema' scores it by the student EMA alone and "
        "counts it.",
    )
    seed: int = _knob(0, "Seed of the `random` baseline's generator.")
    loss_chunk_size: int = _knob(
        0, "Rows of logits materialised at once in the loss (recomputed in backward); 0 computes them in one piece."
    )
    ema_dtype: EMADtype = _knob(
        "float32", "Storage of the per-(sample, answer token) EMA: 'float32' (4 B per answer token) or 'float16' (2 B)."
    )
    resume_without_state: ResumeWithoutState = _knob(
        "error",
        "Resuming from a checkpoint without a usable regate_state.pt (none, another strategy's, or one saved with "
        "other settings): 'error' stops, 'fresh' continues the schedule at the checkpoint's step with an empty EMA.",
    )

    elision_unit: ElisionUnit = _knob(
        "target",
        "What a sparse step elides: 'target' drops an unselected candidate from the forward (its input token and "
        "its target's loss term); 'pair' selects as 'target' with each candidate scored by the larger of its target's "
        "score and its input token's (the previous candidate's), so an important token is kept as a target and as "
        "an input; 'loss_only' keeps every token in the forward and drops only the unselected loss terms (a control "
        "that saves no compute).",
    )
    ema_observe: EMAObserve = _knob(
        "all", "Which steps' losses the student EMA learns from: 'all' (dense and sparse) or 'dense' (full context)."
    )
    ema_visual_slots: int = _knob(
        1,
        "EMA slot groups per text: above 1, samples whose text is the same but whose visual input differs keep "
        "apart EMA entries (a fingerprint of each sample's pixels picks its group); the EMA's memory grows by this "
        "factor. Reference losses stay keyed by text.",
    )

    def __post_init__(self) -> None:
        _check_range("keep_ratio", self.keep_ratio, "(0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_range("lam", self.lam, "[0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_range("ema_beta", self.ema_beta, "[0, 1)", lambda v: 0.0 <= v < 1.0)
        for name in ("warmup_steps", "cycle_steps", "dense_steps", "seed", "loss_chunk_size", "ema_visual_slots"):
            _check_int(name, getattr(self, name))
        _check_range("ema_visual_slots", self.ema_visual_slots, "integers >= 1", lambda v: v >= 1)
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
        _check_choice("missing_reference", self.missing_reference, MISSING_REFERENCE_POLICIES)
        _check_choice("ema_dtype", self.ema_dtype, EMA_DTYPES)
        _check_choice("elision_unit", self.elision_unit, ELISION_UNITS)
        _check_choice("ema_observe", self.ema_observe, EMA_OBSERVE)
        _check_choice("resume_without_state", self.resume_without_state, RESUME_WITHOUT_STATE_POLICIES)

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
        raise ConfigError(f"ReGATEConfig.{name}={value!r} must be an integer", name)


def _check_range(name: str, value: Any, allowed: str, ok: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
        raise ConfigError(f"ReGATEConfig.{name}={value!r} is outside the allowed range {allowed}", name)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"ReGATEConfig.{name}={value!r} is not one of {list(choices)}", name)
