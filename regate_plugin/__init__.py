"""regate-plugin: ReGATE (Reference-Guided Adaptive Token Elision) for multimodal-LLM training.

import regate_plugin as rg
cfg = rg.ReGATEConfig(keep_ratio=0.5)
elision = rg.build_token_elision("regate", cfg, reference="path/to/ref_cache")
model = rg.enable_token_elision(model, elision)
"""

import importlib
from typing import Any

# The public names, by the module that defines them: imported on first use, so that `import regate_plugin` (and
# `regate --help`) imports no torch.
_EXPORTS = {
    ".adapters": ("disable_token_elision", "enable_token_elision", "get_token_elision", "supported_models"),
    ".core": (
        "ConfigError",
        "DifficultyEMA",
        "ReferenceScoredConfig",
        "ReGATEConfig",
        "ScheduleConfig",
        "sample_key",
        "select_kept_positions",
        "tokenizer_fingerprint",
    ),
    ".store": (
        "CacheError",
        "CorruptShardError",
        "InMemoryReferenceStore",
        "MissingReferenceError",
        "ReferenceLossCache",
        "ReferenceLossCacheWriter",
        "ReferenceStore",
        "TokenizerMismatchError",
    ),
    ".strategies": (
        "Capabilities",
        "TokenElision",
        "available_token_elisions",
        "build_token_elision",
        "register_token_elision",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"


__all__ = [*_MODULE_OF, "__version__"]


def __getattr__(name: str) -> Any:
    """A public name or a subpackage (`regate_plugin.adapters`), imported on first use."""
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])
