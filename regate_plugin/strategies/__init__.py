"""Token-elision strategies: the base and its capabilities, one module per strategy, and the registry."""

from .base import Capabilities, ElisionStats, TokenElision, VisualRowCheck
from .none import NoElision
from .plan import BatchLayout, ElisionPlan
from .random import RandomElision
from .regate import ReGATEElision
from .registry import (
    TOKEN_ELISIONS,
    ElisionFactory,
    UnknownTokenElisionError,
    available_token_elisions,
    build_token_elision,
    register_token_elision,
)
from .rho import RhoElision
from .scored import NeedsReferenceError, ReferenceScoredElision, SampleRows

__all__ = [
    "available_token_elisions",
    "BatchLayout",
    "build_token_elision",
    "Capabilities",
    "ElisionFactory",
    "ElisionPlan",
    "ElisionStats",
    "NeedsReferenceError",
    "NoElision",
    "RandomElision",
    "ReferenceScoredElision",
    "ReGATEElision",
    "register_token_elision",
    "RhoElision",
    "SampleRows",
    "TOKEN_ELISIONS",
    "TokenElision",
    "UnknownTokenElisionError",
    "VisualRowCheck",
]
