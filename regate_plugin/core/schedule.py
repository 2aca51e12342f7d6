"""The dual-cycle schedule as pure functions of the optimizer step (docs/METHOD.md)."""

from __future__ import annotations

from .config import ConfigError, ScheduleConfig


def is_dense_step(step: int, cfg: ScheduleConfig) -> bool:
    """True when optimizer step `step` (0-based) trains on every answer token."""
    if step < 0:
        raise ValueError(f"optimizer step must be >= 0, got {step}")
    _require_run_length(cfg)
    tail = dense_tail_start(cfg)
    if step < cfg.warmup_steps or (tail is not None and step >= tail):
        return True
    return (step - cfg.warmup_steps) % cfg.cycle_steps < cfg.dense_steps


def dense_tail_start(cfg: ScheduleConfig) -> int | None:
    """The first step of the run's dense tail, its last round(dense_tail * total_steps) steps; None without a tail."""
    if cfg.dense_tail == 0.0:
        return None
    _require_run_length(cfg)
    return cfg.total_steps - round(cfg.dense_tail * cfg.total_steps)


def _require_run_length(cfg: ScheduleConfig) -> None:
    """A `ConfigError` naming `scaled_to` when the schedule depends on the run's length and it was never given."""
    needs = []
    if cfg.schedule == "auto":
        needs.append("schedule='auto'")
    if cfg.dense_tail > 0:
        needs.append(f"dense_tail={cfg.dense_tail}")
    if needs and cfg.total_steps == 0:
        raise ConfigError(
            f"{type(cfg).__name__}.{' and '.join(needs)} needs the run's length: use cfg.scaled_to(<total optimizer "
            "steps>)",
            "schedule" if cfg.schedule == "auto" else "dense_tail",
        )


def keep_ratio_at(step: int, cfg: ScheduleConfig) -> float:
    """Fraction of elidable tokens kept at optimizer step `step`."""
    return 1.0 if is_dense_step(step, cfg) else cfg.keep_ratio


def first_sparse_step(start: int, cfg: ScheduleConfig) -> int | None:
    """The first optimizer step >= `start` that `is_dense_step` makes sparse; None when none ever is."""
    if start < 0:
        raise ValueError(f"optimizer step must be >= 0, got {start}")
    if cfg.dense_steps >= cfg.cycle_steps:
        return None
    step = max(start, cfg.warmup_steps)
    step += max(cfg.dense_steps - (step - cfg.warmup_steps) % cfg.cycle_steps, 0)
    tail = dense_tail_start(cfg)
    return None if tail is not None and step >= tail else step


def expected_keep_fraction(total_steps: int, cfg: ScheduleConfig) -> float:
    """Mean keep ratio over steps [0, total_steps): what a run's candidate budget will be."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    return sum(keep_ratio_at(s, cfg) for s in range(total_steps)) / total_steps


# `schedule='auto'`: a sixteenth of the run dense first, then six cycles, an eighth of each dense (the paper's
# share per cycle, 16 of 128). At 400 steps this is 25 / 62 / 8 (the demo's 25 / 64 / 8); at the 5,197 steps of a
# LLaVA-1.5 fine-tune it is 325 / 812 / 102, where the paper's own 100 / 128 / 16 stay available as 'fixed'.
AUTO_WARMUP_SHARE = 1 / 16
AUTO_CYCLES = 6
AUTO_DENSE_SHARE = 1 / 8


def auto_schedule(total_steps: int) -> dict[str, int]:
    """warmup_steps, cycle_steps and dense_steps for a run of `total_steps` optimizer steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = round(total_steps * AUTO_WARMUP_SHARE)
    cycle = max(1, round((total_steps - warmup) / AUTO_CYCLES))
    return {"warmup_steps": warmup, "cycle_steps": cycle, "dense_steps": max(1, round(cycle * AUTO_DENSE_SHARE))}
