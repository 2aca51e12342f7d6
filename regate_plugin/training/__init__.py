"""Training integration: flags, Trainer callback and mixin, launchers for the upstream train scripts."""

from .arguments import TokenElisionArguments, with_token_elision_arguments
from .callback import STATE_FILE, TokenElisionCallback, elision_metrics
from .trainer import TokenElisionTrainerMixin, with_token_elision

__all__ = [
    "STATE_FILE",
    "TokenElisionArguments",
    "TokenElisionCallback",
    "TokenElisionTrainerMixin",
    "elision_metrics",
    "with_token_elision",
    "with_token_elision_arguments",
]
