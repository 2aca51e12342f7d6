"""The pure-torch core of ReGATE: no transformers import anywhere below this package."""

from .cache import (
    CacheError,
    CacheManifest,
    CorruptShardError,
    MissingReferenceError,
    ReferenceLossCache,
    ReferenceLossCacheWriter,
    TokenizerMismatchError,
)
from .compaction import (
    IGNORE_INDEX,
    CompactionPlan,
    elidable_positions,
    plan_compaction,
    shift_targets,
    target_ordinals,
)
from .config import ConfigError, ReGATEConfig
from .elision import (
    ElisionPlan,
    NoElision,
    RandomElision,
    ReGATEElision,
    TokenElision,
    available_token_elisions,
    build_token_elision,
    register_token_elision,
)
from .ema import DifficultyEMA
from .keys import batch_sample_keys, sample_key, tokenizer_fingerprint
from .loss import TokenLoss, next_token_loss
from .reference import REFERENCE_MODES, ReferenceInput, build_reference_input
from .schedule import expected_keep_fraction, is_dense_step, keep_ratio_at
from .selection import fused_score, keep_counts, select_kept_positions

__all__ = [
    "available_token_elisions",
    "batch_sample_keys",
    "build_reference_input",
    "build_token_elision",
    "CacheError",
    "CacheManifest",
    "CompactionPlan",
    "ConfigError",
    "CorruptShardError",
    "DifficultyEMA",
    "elidable_positions",
    "ElisionPlan",
    "expected_keep_fraction",
    "fused_score",
    "IGNORE_INDEX",
    "is_dense_step",
    "keep_counts",
    "keep_ratio_at",
    "MissingReferenceError",
    "next_token_loss",
    "NoElision",
    "plan_compaction",
    "RandomElision",
    "ReferenceLossCache",
    "ReferenceLossCacheWriter",
    "ReGATEConfig",
    "ReGATEElision",
    "register_token_elision",
    "sample_key",
    "select_kept_positions",
    "shift_targets",
    "target_ordinals",
    "REFERENCE_MODES",
    "ReferenceInput",
    "TokenElision",
    "tokenizer_fingerprint",
    "TokenizerMismatchError",
    "TokenLoss",
]
