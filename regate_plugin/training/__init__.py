"""Training integration: flags, Trainer callback and mixin, pre-flight check, launchers for the upstream scripts."""

from .arguments import TokenElisionArguments, with_token_elision_arguments
from .callback import STATE_FILE, ResumeStateError, TokenElisionCallback, elision_metrics
from .preflight import CacheMismatchError
from .trainer import TokenElisionTrainerMixin, with_token_elision

__all__ = [
    "STATE_FILE",
    "CacheMismatchError",
    "ResumeStateError",
    "TokenElisionArguments",
    "TokenElisionCallback",
    "TokenElisionTrainerMixin",
    "elision_metrics",
    "with_token_elision",
    "with_token_elision_arguments",
]
