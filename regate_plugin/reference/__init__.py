"""The frozen text-only reference LLM: loading and scoring it (`model`), the `regate precompute` pipeline that
fills a reference cache with its losses (`precompute`), and the `regate cache stats` report (`report`)."""

from .model import ReferenceScorer, load_reference_model, resolve_reference
from .precompute import PrecomputeConfig, PrecomputeSummary, run_precompute

__all__ = [
    "PrecomputeConfig",
    "PrecomputeSummary",
    "ReferenceScorer",
    "load_reference_model",
    "resolve_reference",
    "run_precompute",
]
