"""The dual-cycle schedule as pure functions of the optimizer step (docs/METHOD.md)."""

from __future__ import annotations

from .config import ScheduleConfig


def is_dense_step(step: int, cfg: ScheduleConfig) -> bool:
    """True when optimizer step `step` (0-based) trains on every answer token."""
    if step < 0:
        raise ValueError(f"optimizer step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return True
    return (step - cfg.warmup_steps) % cfg.cycle_steps < cfg.dense_steps


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
    return step + max(cfg.dense_steps - (step - cfg.warmup_steps) % cfg.cycle_steps, 0)


def expected_keep_fraction(total_steps: int, cfg: ScheduleConfig) -> float:
    """Mean keep ratio over steps [0, total_steps): what a run's candidate budget will be."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    return sum(keep_ratio_at(s, cfg) for s in range(total_steps)) / total_steps
