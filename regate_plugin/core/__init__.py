"""The pure-torch core of ReGATE: no transformers import anywhere below this package."""

from .compaction import (
    IGNORE_INDEX,
    CompactionPlan,
    elidable_positions,
    plan_compaction,
    shift_targets,
    target_ordinals,
)
from .config import ConfigError, ReferenceScoredConfig, ReGATEConfig, ScheduleConfig
from .ema import DifficultyEMA
from .keys import batch_sample_keys, sample_key, tokenizer_fingerprint
from .loss import TokenLoss, next_token_loss
from .reference import REFERENCE_MODES, ReferenceInput, build_reference_input
from .schedule import expected_keep_fraction, first_sparse_step, is_dense_step, keep_ratio_at
from .selection import fused_score, keep_counts, select_kept_positions

__all__ = [
    "batch_sample_keys",
    "build_reference_input",
    "CompactionPlan",
    "ConfigError",
    "DifficultyEMA",
    "elidable_positions",
    "expected_keep_fraction",
    "first_sparse_step",
    "fused_score",
    "IGNORE_INDEX",
    "is_dense_step",
    "keep_counts",
    "keep_ratio_at",
    "next_token_loss",
    "plan_compaction",
    "ReferenceScoredConfig",
    "ReGATEConfig",
    "ScheduleConfig",
    "sample_key",
    "select_kept_positions",
    "shift_targets",
    "target_ordinals",
    "REFERENCE_MODES",
    "ReferenceInput",
    "tokenizer_fingerprint",
    "TokenLoss",
]
