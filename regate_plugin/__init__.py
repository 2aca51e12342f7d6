"""regate-plugin: ReGATE (Reference-Guided Adaptive Token Elision) for multimodal-LLM training.

import regate_plugin as rg
cfg = rg.ReGATEConfig(keep_ratio=0.5)
elision = rg.build_token_elision("regate", cfg, reference="path/to/ref_cache")
model = rg.enable_token_elision(model, elision)
"""

from .adapters import disable_token_elision, enable_token_elision, get_token_elision, supported_models
from .core import (
    ConfigError,
    DifficultyEMA,
    ReferenceScoredConfig,
    ReGATEConfig,
    ScheduleConfig,
    sample_key,
    select_kept_positions,
    tokenizer_fingerprint,
)
from .store import (
    CacheError,
    CorruptShardError,
    InMemoryReferenceStore,
    MissingReferenceError,
    ReferenceLossCache,
    ReferenceLossCacheWriter,
    ReferenceStore,
    TokenizerMismatchError,
)
from .strategies import (
    Capabilities,
    TokenElision,
    available_token_elisions,
    build_token_elision,
    register_token_elision,
)

__version__ = "0.1.0"


__all__ = [
    "Capabilities",
    "CacheError",
    "ConfigError",
    "CorruptShardError",
    "DifficultyEMA",
    "InMemoryReferenceStore",
    "MissingReferenceError",
    "ReferenceScoredConfig",
    "ReGATEConfig",
    "ScheduleConfig",
    "ReferenceLossCache",
    "ReferenceLossCacheWriter",
    "ReferenceStore",
    "TokenElision",
    "TokenizerMismatchError",
    "available_token_elisions",
    "build_token_elision",
    "disable_token_elision",
    "enable_token_elision",
    "get_token_elision",
    "supported_models",
    "register_token_elision",
    "sample_key",
    "select_kept_positions",
    "tokenizer_fingerprint",
    "__version__",
]
