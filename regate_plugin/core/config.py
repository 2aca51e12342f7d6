"""The strategies' settings, validated on construction (docs/METHOD.md): `ScheduleConfig`, which every strategy
reads, `ReferenceScoredConfig`, which adds the student EMA and the reference store's knobs, and `ReGATEConfig`,
which adds ReGATE's fused score."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from .errors import UserError

ScoreNorm = Literal["none", "zscore"]
MissingReference = Literal["error", "ema"]
EMADtype = Literal["float32", "float16"]
ElisionUnit = Literal["target", "pair", "with_input", "loss_only"]
Repeats = Literal["score", "last", "ema"]
Schedule = Literal["fixed", "auto"]
EMAObserve = Literal["all", "dense"]
ResumeWithoutState = Literal["error", "fresh"]
KeepControl = Literal["off", "adaptive"]
KeepBudget = Literal["ratio", "reference"]
LossNormalization = Literal["kept", "all"]

SCORE_NORMS: tuple[str, ...] = get_args(ScoreNorm)
MISSING_REFERENCE_POLICIES: tuple[str, ...] = get_args(MissingReference)
EMA_DTYPES: tuple[str, ...] = get_args(EMADtype)
ELISION_UNITS: tuple[str, ...] = get_args(ElisionUnit)
EMA_OBSERVE: tuple[str, ...] = get_args(EMAObserve)
REPEATS: tuple[str, ...] = get_args(Repeats)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
RESUME_WITHOUT_STATE_POLICIES: tuple[str, ...] = get_args(ResumeWithoutState)
KEEP_CONTROLS: tuple[str, ...] = get_args(KeepControl)
KEEP_BUDGETS: tuple[str, ...] = get_args(KeepBudget)
LOSS_NORMALIZATIONS: tuple[str, ...] = get_args(LossNormalization)

C = TypeVar("C", bound="ScheduleConfig")


class ConfigError(UserError, ValueError):
    """A setting (a config field, a command-line flag) holds a value outside its allowed range; `field` names the
    config field where there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _knob(default: Any, help: str, flag: str | None = None, state_neutral: bool = False) -> Any:
    """A field with its help text; `flag` names its `--regate_<flag>` command-line flag where that is not the
    field's own name (the training flags are generated from these fields, see `training.arguments`);
    `state_neutral` marks a setting a resumed run may change without invalidating the saved state (it decides how
    the step is computed: memory, storage precision, what a cache miss or a resume does; not what the state means)."""
    metadata: dict[str, Any] = {"help": help, "state_neutral": state_neutral}
    if flag is not None:
        metadata["flag"] = flag
    return field(default=default, metadata=metadata)


def is_state_neutral(config_field: dataclasses.Field) -> bool:
    return bool(config_field.metadata.get("state_neutral", False))


@dataclass(frozen=True)
class ScheduleConfig:
    """What every strategy reads: the dual-cycle schedule, the keep ratio and how the loss runs; defaults are the
    paper's (docs/TRAINING.md, "Flags")."""

    keep_ratio: float = _knob(0.5, "Fraction of elidable answer tokens kept on sparse steps, in (0, 1].")
    warmup_steps: int = _knob(100, "Dense optimizer steps before the first cycle, >= 0.")
    cycle_steps: int = _knob(128, "Length C of one dense+sparse cycle in optimizer steps, >= 1.")
    dense_steps: int = _knob(16, "Dense steps F at the start of each cycle, in [0, cycle_steps].")
    seed: int = _knob(0, "Seed of the `random` baseline's generator.")
    loss_chunk_size: int = _knob(
        0,
        "Rows of logits materialised at once in the loss (recomputed in backward); 0 computes them in one piece.",
        state_neutral=True,
    )
    resume_without_state: ResumeWithoutState = _knob(
        "error",
        "Resuming from a checkpoint without a usable regate_state.pt (none, another strategy's, or one saved with "
        "other settings): 'error' stops, 'fresh' continues the schedule at the checkpoint's step with an empty EMA.",
        state_neutral=True,
    )
    elision_unit: ElisionUnit = _knob(
        "target",
        "What a sparse step elides: 'target' drops an unselected candidate from the forward (its input token and "
        "its target's loss term); 'pair' selects as 'target' with each candidate scored by the larger of its target's "
        "score and its input token's (the previous candidate's), so an important token is kept as a target and as "
        "an input; 'with_input' keeps the best-ranked targets each with its input token (the next candidate), as many "
        "as fit in k; 'loss_only' keeps every token in the forward and drops only the unselected loss terms (a control "
        "that saves no compute).",
    )
    loss_normalization: LossNormalization = _knob(
        "kept",
        "What a step's summed loss is divided by: 'kept' by the loss terms it keeps (a sparse step is the mean over "
        "its kept targets), 'all' by every target of the batch, elided or not (a kept target weighs what it weighs on "
        "a dense step, and a sparse step's gradient shrinks with what it elides).",
        state_neutral=True,
    )
    schedule: Schedule = _knob(
        "fixed",
        "'fixed' uses warmup_steps, cycle_steps and dense_steps as given (the paper's by default); 'auto' sets them "
        "from the run's total optimizer steps (`ScheduleConfig.scaled_to`).",
    )
    dense_tail: float = _knob(
        0.0,
        "Share of the run's last optimizer steps that are all dense, in [0, 1): the student ends on whole contexts, "
        "as InfoBatch anneals to the full data (docs/METHOD.md, 'A dense tail'); > 0 needs the run's length "
        "(`ScheduleConfig.scaled_to`, which the Trainer integration calls).",
    )
    total_steps: int = _knob(
        0,
        "The run's optimizer steps under schedule='auto' or dense_tail > 0, set by `scaled_to` (0: not yet known).",
    )

    def __post_init__(self) -> None:
        _check_range(self, "keep_ratio", "(0, 1]", lambda v: 0.0 < v <= 1.0)
        for name in ("warmup_steps", "cycle_steps", "dense_steps", "seed", "loss_chunk_size", "total_steps"):
            _check_int(self, name)
        _check_range(self, "warmup_steps", "integers >= 0", lambda v: v >= 0)
        _check_range(self, "cycle_steps", "integers >= 1", lambda v: v >= 1)
        _check_range(
            self,
            "dense_steps",
            f"integers in [0, cycle_steps={self.cycle_steps}]",
            lambda v: 0 <= v <= self.cycle_steps,
        )
        _check_range(self, "loss_chunk_size", "integers >= 0", lambda v: v >= 0)
        _check_range(self, "dense_tail", "[0, 1)", lambda v: 0.0 <= v < 1.0)
        _check_choice(self, "resume_without_state", RESUME_WITHOUT_STATE_POLICIES)
        _check_choice(self, "elision_unit", ELISION_UNITS)
        _check_choice(self, "schedule", SCHEDULES)
        _check_choice(self, "loss_normalization", LOSS_NORMALIZATIONS)

    @classmethod
    def of(cls: type[C], other: ScheduleConfig) -> C:
        """This class's fields taken from any config (a strategy narrows the config it is given to its own class;
        fields `other` lacks keep their defaults)."""
        if type(other) is cls:
            return other
        return cls(**{f.name: getattr(other, f.name) for f in dataclasses.fields(cls) if hasattr(other, f.name)})

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def scaled_to(self: C, total_steps: int) -> C:
        """This config for a run of `total_steps` optimizer steps: under `schedule='auto'` its warm-up, cycle and dense
        steps scale with it (`schedule.auto_schedule`), and the dense tail is counted from its end; a config that
        needs neither is returned as it is."""
        if self.schedule == "fixed" and self.dense_tail == 0.0:
            return self
        from .schedule import auto_schedule

        scaled = auto_schedule(total_steps) if self.schedule == "auto" else {}
        return self.replace(total_steps=total_steps, **scaled)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class ReferenceScoredConfig(ScheduleConfig):
    """The settings of a strategy that scores candidates from the student EMA and a reference store (`rho`), and
    the base of `ReGATEConfig`."""

    ema_beta: float = _knob(0.9, "Decay of the student-difficulty EMA, in [0, 1).")
    missing_reference: MissingReference = _knob(
        "error",
        "A sample absent from the reference cache: 'error' stops, 'ema' scores it by the student EMA alone and "
        "counts it.",
        state_neutral=True,
    )
    keep_control: KeepControl = _knob(
        "off",
        "'off' keeps keep_ratio on every sparse step; 'adaptive' raises or lowers it by keep_control_step every "
        "keep_control_interval steps, within [keep_ratio_min, keep_ratio_max], from the student's losses "
        '(docs/METHOD.md, "The adaptive keep ratio").',
    )
    keep_budget: KeepBudget = _knob(
        "ratio",
        "How many candidates a sparse step keeps per row: 'ratio' ceil(keep_ratio * n); 'reference' every candidate "
        "whose reference loss is above keep_budget_threshold, each with the candidate after it under the 'pair' and "
        "'with_input' units, and never fewer than 'ratio' would (docs/METHOD.md, \"A budget from the reference\").",
    )
    keep_budget_threshold: float = _knob(
        0.35, "Reference loss (nats) above which keep_budget='reference' counts a candidate as needing the input, >= 0."
    )
    keep_ratio_min: float = _knob(
        0.1, "Lowest keep ratio keep_control='adaptive' may set, in (0, 1], at most keep_ratio under 'adaptive'."
    )
    keep_ratio_max: float = _knob(
        1.0,
        "Highest keep ratio keep_control='adaptive' may set, in [keep_ratio_min, 1], at least keep_ratio under "
        "'adaptive'.",
    )
    keep_control_step: float = _knob(0.05, "Change of the adaptive keep ratio per update, in (0, 1].")
    keep_control_interval: int = _knob(128, "Optimizer steps between the adaptive keep ratio's updates, >= 1.")
    keep_control_gap: float = _knob(
        0.5,
        "Adaptive keep ratio: keep more when, on dense steps, the student's mean loss on the candidates sparse steps "
        "would elide exceeds this multiple of its loss on those they would keep, > 0.",
    )
    keep_control_low: float = _knob(
        0.05,
        "Adaptive keep ratio: a loss (nats) below which the student knows a token: keep less when both means are "
        "below it on dense steps; a kept candidate whose EMA is below it is never stalled. >= 0.",
    )
    ema_dtype: EMADtype = _knob(
        "float32",
        "Storage of the per-(sample, answer token) EMA: 'float32' (4 B per answer token) or 'float16' (2 B).",
        state_neutral=True,
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
    repeats: Repeats = _knob(
        "score",
        "Candidates whose target token already appeared earlier among the sample's supervised tokens: 'score' ranks "
        "them by their score like any other; 'last' ranks them after every other candidate (a restated fact is "
        "predictable from the answer so far, whatever an under-trained reference scores it); 'ema' scores them by "
        "the student's EMA alone, their reference loss left out as for a sample missing from the cache (kept while "
        "the student gets them wrong; under rho, whose excess loss needs both, they rank after the known scores).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range(self, "ema_beta", "[0, 1)", lambda v: 0.0 <= v < 1.0)
        _check_choice(self, "keep_control", KEEP_CONTROLS)
        _check_range(self, "keep_ratio_min", "(0, 1]", lambda v: 0.0 < v <= 1.0)
        bounds = f"[keep_ratio_min={self.keep_ratio_min}, keep_ratio_max={self.keep_ratio_max}]"
        _check_range(self, "keep_ratio_max", bounds, lambda v: self.keep_ratio_min <= v <= 1.0)
        if self.keep_control == "adaptive":  # the bounds hold the ratio a run starts from
            _check_range(
                self,
                "keep_ratio",
                f"{bounds} under keep_control='adaptive'",
                lambda v: self.keep_ratio_min <= v <= self.keep_ratio_max,
            )
        _check_choice(self, "keep_budget", KEEP_BUDGETS)
        _check_range(self, "keep_budget_threshold", "[0, inf)", lambda v: 0.0 <= v < math.inf)
        _check_range(self, "keep_control_step", "(0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_int(self, "keep_control_interval")
        _check_range(self, "keep_control_interval", "integers >= 1", lambda v: v >= 1)
        _check_range(self, "keep_control_gap", "(0, inf)", lambda v: 0.0 < v < math.inf)
        _check_range(self, "keep_control_low", "[0, inf)", lambda v: 0.0 <= v < math.inf)
        _check_int(self, "ema_visual_slots")
        _check_range(self, "ema_visual_slots", "integers >= 1", lambda v: v >= 1)
        _check_choice(self, "missing_reference", MISSING_REFERENCE_POLICIES)
        _check_choice(self, "ema_dtype", EMA_DTYPES)
        _check_choice(self, "ema_observe", EMA_OBSERVE)
        _check_choice(self, "repeats", REPEATS)


@dataclass(frozen=True)
class ReGATEConfig(ReferenceScoredConfig):
    """Hyperparameters of ReGATE: the reference-scored settings and the fused score's. It holds every built-in
    field, so the training flags are generated from it."""

    lam: float = _knob(
        0.5, "Weight of the reference loss in the fused score d = (1-lam)*m + lam*ref, in [0, 1].", flag="lambda"
    )
    score_norm: ScoreNorm = _knob(
        "none", "'none' fuses raw losses; 'zscore' standardises each signal per sample first."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range(self, "lam", "[0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_choice(self, "score_norm", SCORE_NORMS)


def _check_int(cfg: ScheduleConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{type(cfg).__name__}.{name}={value!r} must be an integer", name)


def _check_range(cfg: ScheduleConfig, name: str, allowed: str, ok: Any) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
        raise ConfigError(f"{type(cfg).__name__}.{name}={value!r} is outside the allowed range {allowed}", name)


def _check_choice(cfg: ScheduleConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{type(cfg).__name__}.{name}={value!r} is not one of {list(choices)}", name)
