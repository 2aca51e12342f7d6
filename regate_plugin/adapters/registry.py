"""`enable_token_elision(model, elision)`: pick the adapter for a model's class and install it."""

from __future__ import annotations

from typing import Any

from ..core.errors import UserError
from ..strategies import TokenElision
from .base import ADAPTERS, Adapter


class UnsupportedModelError(UserError, TypeError):
    """No adapter knows this model class."""


_ENABLED_ATTR = "_regate_enabled"


def supported_models() -> list[str]:
    return sorted(name for _, adapter in ADAPTERS.items() for name in adapter.class_names)


def _unwrap(model: Any) -> Any:
    """The model the adapters patch: through peft's PeftModel (get_base_model) to the transformers model."""
    seen = set()
    while hasattr(model, "get_base_model") and id(model) not in seen:
        seen.add(id(model))
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


def _find_adapter(model: Any) -> Adapter:
    """The adapter of the most derived class in the model's MRO that an adapter names."""
    adapters = [adapter for _, adapter in ADAPTERS.items()]
    for cls in type(model).__mro__:
        for adapter in adapters:
            if cls.__name__ in adapter.class_names:
                return adapter
    raise UnsupportedModelError(
        f"token elision has no adapter for {type(model).__name__}; supported models (and their subclasses): "
        f"{', '.join(supported_models())}"
    )


def enable_token_elision(model: Any, elision: TokenElision) -> Any:
    """Make `model(**batch)` in training mode with labels run elided; returns the same model object.

    In eval mode, or without labels, the model behaves exactly as before (generation included).
    Enabling again replaces the previous strategy.
    """
    if not isinstance(elision, TokenElision):
        raise TypeError(f"elision must be a TokenElision (see build_token_elision), got {type(elision).__name__}")
    target = _unwrap(model)
    adapter = _find_adapter(target)
    disable_token_elision(model)
    remove = adapter.install(target, elision)
    setattr(target, _ENABLED_ATTR, (elision, remove))
    return model


def disable_token_elision(model: Any) -> Any:
    """Undo `enable_token_elision` (no-op when it is not enabled)."""
    target = _unwrap(model)
    enabled = target.__dict__.pop(_ENABLED_ATTR, None)
    if enabled is not None:
        enabled[1]()
    return model


def get_token_elision(model: Any) -> TokenElision | None:
    enabled = _unwrap(model).__dict__.get(_ENABLED_ATTR)
    return enabled[0] if enabled is not None else None
