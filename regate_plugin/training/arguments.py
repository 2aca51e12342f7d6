"""`TokenElisionArguments`: the `--token_elision` / `--regate_*` flags, for `HfArgumentParser` or a subclass of
an upstream `TrainingArguments`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..core.config import ConfigError, ReGATEConfig
from ..core.elision import TokenElision, available_token_elisions, build_token_elision

# flag -> ReGATEConfig field
_CONFIG_FLAGS = {
    "regate_keep_ratio": "keep_ratio",
    "regate_lambda": "lam",
    "regate_ema_beta": "ema_beta",
    "regate_warmup_steps": "warmup_steps",
    "regate_cycle_steps": "cycle_steps",
    "regate_dense_steps": "dense_steps",
    "regate_score_norm": "score_norm",
    "regate_missing_reference": "missing_reference",
    "regate_loss_chunk_size": "loss_chunk_size",
    "regate_seed": "seed",
    "regate_ema_dtype": "ema_dtype",
}
_DEFAULTS = ReGATEConfig()


def _flag(config_field: str, help: str) -> Any:
    return field(default=getattr(_DEFAULTS, config_field), metadata={"help": help})


@dataclass
class TokenElisionArguments:
    """Token elision for training; every field is also a command-line flag of the same name."""

    token_elision: str = field(
        default="none", metadata={"help": "Which answer tokens the decoder skips: none, regate or random."}
    )
    regate_ref_cache: str | None = field(
        default=None, metadata={"help": "Reference-loss cache directory made by `regate precompute` (regate only)."}
    )
    regate_keep_ratio: float = _flag("keep_ratio", "Fraction of elidable answer tokens kept on sparse steps, (0, 1].")
    regate_lambda: float = _flag("lam", "Weight of the reference loss in the fused score, [0, 1].")
    regate_ema_beta: float = _flag("ema_beta", "Decay of the student-difficulty EMA, [0, 1).")
    regate_warmup_steps: int = _flag("warmup_steps", "Dense optimizer steps before the first cycle.")
    regate_cycle_steps: int = _flag("cycle_steps", "Optimizer steps per dense+sparse cycle.")
    regate_dense_steps: int = _flag("dense_steps", "Dense steps at the start of each cycle.")
    regate_score_norm: str = _flag("score_norm", "'none' fuses raw losses, 'zscore' standardises them per sample.")
    regate_missing_reference: str = _flag(
        "missing_reference", "A sample missing from the cache: 'error' stops, 'ema' scores it by the EMA alone."
    )
    regate_loss_chunk_size: int = _flag("loss_chunk_size", "Logit rows built at once in the loss (0: all).")
    regate_seed: int = _flag("seed", "Seed of the random baseline.")
    regate_ema_dtype: str = _flag("ema_dtype", "Storage of the student EMA: float32 (4 B/answer token) or float16.")

    @classmethod
    def from_object(cls, source: Any) -> TokenElisionArguments:
        """Pick the fields out of any object that carries them (e.g. a TrainingArguments subclass)."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if hasattr(source, f.name)})

    @classmethod
    def flag_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def regate_config(self) -> ReGATEConfig:
        values = {config_field: getattr(self, flag) for flag, config_field in _CONFIG_FLAGS.items()}
        try:
            return ReGATEConfig(**values)
        except ConfigError as err:
            flag = next(f for f, c in _CONFIG_FLAGS.items() if f"ReGATEConfig.{c}=" in str(err))
            raise ConfigError(f"--{flag}: {err}") from None

    def build(self, tokenizer: Any = None) -> TokenElision:
        """The strategy these flags describe, checked against the training tokenizer; errors name the flag."""
        if self.token_elision not in available_token_elisions():
            raise ConfigError(f"--token_elision {self.token_elision!r}: known values are {available_token_elisions()}")
        cfg = self.regate_config()
        if self.token_elision == "regate" and not self.regate_ref_cache:
            raise ConfigError(
                "--token_elision regate needs --regate_ref_cache DIR, a reference-loss cache made by "
                "`regate precompute` with this run's tokenizer, template and --model_max_length"
            )
        kwargs: dict[str, Any] = {"tokenizer": tokenizer}
        if self.regate_ref_cache:
            kwargs["reference"] = self.regate_ref_cache
        return build_token_elision(self.token_elision, cfg, **kwargs)


def with_token_elision_arguments(training_args_cls: type) -> type:
    """A dataclass subclass of `training_args_cls` (an upstream `TrainingArguments`) that also has the
    `--token_elision` / `--regate_*` fields, so the upstream `HfArgumentParser` accepts them."""
    if issubclass(training_args_cls, TokenElisionArguments):
        return training_args_cls
    namespace = {"__module__": training_args_cls.__module__, "__qualname__": training_args_cls.__qualname__}
    # TokenElisionArguments first in the bases puts its (defaulted) fields last, after a required `output_dir`.
    return dataclass(type(training_args_cls.__name__, (TokenElisionArguments, training_args_cls), namespace))
