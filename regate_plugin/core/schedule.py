"""The dual-cycle schedule as pure functions of the optimizer step (docs/METHOD.md)."""

from __future__ import annotations

from .config import ReGATEConfig


def is_dense_step(step: int, cfg: ReGATEConfig) -> bool:
    """True when optimizer step `step` (0-based) trains on every answer token."""
    if step < 0:
        raise ValueError(f"optimizer step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return True
    return (step - cfg.warmup_steps) % cfg.cycle_steps < cfg.dense_steps


def keep_ratio_at(step: int, cfg: ReGATEConfig) -> float:
    """Fraction of elidable tokens kept at optimizer step `step`."""
    return 1.0 if is_dense_step(step, cfg) else cfg.keep_ratio


def expected_keep_fraction(total_steps: int, cfg: ReGATEConfig) -> float:
    """Mean keep ratio over steps [0, total_steps): what a run's candidate budget will be."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    return sum(keep_ratio_at(s, cfg) for s in range(total_steps)) / total_steps
