"""`TokenElisionArguments`: the `--token_elision` / `--regate_*` flags, for `HfArgumentParser` or a subclass of
an upstream `TrainingArguments`.

Every `ReGATEConfig` field (it holds every built-in strategy's settings) becomes a flag `--regate_<name>` (or
`--regate_<flag>` where the field's metadata names one, e.g. `--regate_lambda` for `lam`) with the field's type,
default and help text, so the config is the only place a knob is declared. The strategy built from the flags reads
the fields of its own config class only.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..core.config import ConfigError, ReGATEConfig
from ..strategies import NeedsReferenceError, TokenElision, available_token_elisions, build_token_elision


def _flag_of(config_field: dataclasses.Field) -> str:
    return f"regate_{config_field.metadata.get('flag', config_field.name)}"


CONFIG_FLAGS: dict[str, str] = {f.name: _flag_of(f) for f in dataclasses.fields(ReGATEConfig)}
"""`ReGATEConfig` field -> the `TokenElisionArguments` field (and command-line flag) that sets it."""


def _with_config_flags(cls: type) -> type:
    """Add one defaulted field per `ReGATEConfig` field to `cls`, then make it a dataclass."""
    types = typing.get_type_hints(ReGATEConfig)
    for config_field in dataclasses.fields(ReGATEConfig):
        flag = CONFIG_FLAGS[config_field.name]
        cls.__annotations__[flag] = types[config_field.name]
        setattr(cls, flag, field(default=config_field.default, metadata={"help": config_field.metadata["help"]}))
    return dataclass(cls)


@_with_config_flags
class TokenElisionArguments:
    """Token elision for training; every field is also a command-line flag of the same name."""

    token_elision: str = field(
        default="none",
        metadata={
            "help": "Which answer tokens the decoder skips: none, regate, or another registered token elision "
            "(docs/STRATEGIES.md)."
        },
    )
    regate_ref_cache: str | None = field(
        default=None,
        metadata={
            "help": "Reference-loss cache directory made by `regate precompute` (for strategies that read one: regate)."
        },
    )

    @classmethod
    def from_object(cls, source: Any) -> TokenElisionArguments:
        """Pick the fields out of any object that carries them (e.g. a TrainingArguments subclass)."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if hasattr(source, f.name)})

    @classmethod
    def flag_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def regate_config(self) -> ReGATEConfig:
        values = {config_field: getattr(self, flag) for config_field, flag in CONFIG_FLAGS.items()}
        try:
            return ReGATEConfig(**values)
        except ConfigError as err:
            raise ConfigError(f"--{CONFIG_FLAGS[err.field]}: {err}", err.field) from None

    def build(self, tokenizer: Any = None) -> TokenElision:
        """The strategy these flags describe, checked against the training tokenizer; errors name the flag."""
        if self.token_elision not in available_token_elisions():
            raise ConfigError(f"--token_elision {self.token_elision!r}: known values are {available_token_elisions()}")
        cfg = self.regate_config()
        kwargs: dict[str, Any] = {"tokenizer": tokenizer}
        if self.regate_ref_cache:
            kwargs["reference"] = self.regate_ref_cache
        try:
            elision = build_token_elision(self.token_elision, cfg, **kwargs)
        except NeedsReferenceError:
            raise ConfigError(
                f"--token_elision {self.token_elision} needs --regate_ref_cache DIR, a reference-loss cache made by "
                "`regate precompute` with this run's tokenizer, template and --model_max_length"
            ) from None
        if self.regate_ref_cache and elision.capabilities.reference is None:
            warnings.warn(
                f"--regate_ref_cache {self.regate_ref_cache} is unused: --token_elision {self.token_elision} reads "
                "no reference cache (pass a strategy that reads one, e.g. --token_elision regate, to use it)",
                stacklevel=2,
            )
        return elision


def check_flag_names(argv: list[str]) -> None:
    """Refuse a `--regate_*` / `--token_elision*` option that is none of ours, naming the closest one (difflib)."""
    known = TokenElisionArguments.flag_names()
    for arg in argv:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if name.startswith(("regate_", "token_el")) and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean --{close[0]}?" if close else f"the flags are --{', --'.join(known)}"
            raise ConfigError(f"--{name} is not a token-elision flag; {hint}")


def with_token_elision_arguments(training_args_cls: type) -> type:
    """A dataclass subclass of `training_args_cls` (an upstream `TrainingArguments`) that also has the
    `--token_elision` / `--regate_*` fields, so the upstream `HfArgumentParser` accepts them."""
    if issubclass(training_args_cls, TokenElisionArguments):
        return training_args_cls
    namespace = {"__module__": training_args_cls.__module__, "__qualname__": training_args_cls.__qualname__}
    # TokenElisionArguments first in the bases puts its (defaulted) fields last, after a required `output_dir`.
    return dataclass(type(training_args_cls.__name__, (TokenElisionArguments, training_args_cls), namespace))
