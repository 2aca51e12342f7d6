"""The strategies by name: `build_token_elision("regate", cfg, reference=...)`, and third-party ones registered
in code (`register_token_elision`) or by installed packages under the entry-point group
`regate_plugin.token_elision`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.config import ScheduleConfig
from ..core.keys import tokenizer_fingerprint
from ..registry import Registry, UnknownEntryError
from .base import TokenElision
from .none import NoElision
from .random import RandomElision
from .regate import ReGATEElision
from .rho import RhoElision

ElisionFactory = Callable[..., TokenElision]
"""`factory(cfg, **options)`: a strategy from a config (None: the strategy's defaults) and its options."""


class UnknownTokenElisionError(UnknownEntryError, ValueError):
    """A token elision name nothing registered (a `ValueError` too, as a bad option value is)."""


TOKEN_ELISIONS: Registry[ElisionFactory] = Registry("token elision", group="regate_plugin.token_elision")


def register_token_elision(name: str, factory: ElisionFactory, *, overwrite: bool = False) -> None:
    """Make `build_token_elision(name, cfg, **kwargs)` call `factory(cfg, **kwargs)`."""
    TOKEN_ELISIONS.register(name, factory, overwrite=overwrite)


def available_token_elisions() -> list[str]:
    return TOKEN_ELISIONS.names()


def build_token_elision(name: str, cfg: ScheduleConfig | None = None, **kwargs: Any) -> TokenElision:
    """Build the strategy registered as `name` ('none', 'random', 'regate', or a third-party one); a `tokenizer`
    option is checked against the reference store the strategy reads, if any."""
    try:
        factory = TOKEN_ELISIONS.get(name)
    except UnknownEntryError as err:
        raise UnknownTokenElisionError(str(err)) from None
    tokenizer = kwargs.pop("tokenizer", None)
    elision = factory(cfg, **kwargs)
    store = elision.capabilities.reference
    if tokenizer is not None and store is not None:
        store.check_tokenizer(tokenizer_fingerprint(tokenizer))
    return elision


def _plain(cls: type[TokenElision]) -> ElisionFactory:
    """The factory of a strategy that reads no reference store: the plugin-wide options are accepted, unused."""

    def factory(cfg: ScheduleConfig | None, **kwargs: Any) -> TokenElision:
        kwargs.pop("reference", None)
        kwargs.pop("vocab_size", None)
        if kwargs:
            raise TypeError(f"token elision '{cls.name}' takes no options {sorted(kwargs)}")
        return cls(cfg)

    return factory


register_token_elision("none", _plain(NoElision))
register_token_elision("random", _plain(RandomElision))
register_token_elision("regate", ReGATEElision)
register_token_elision("rho", RhoElision)
