"""Command-line options from a config dataclass, so a `regate` command declares none of its config's options again.

Every field whose metadata has "help" becomes one option, `--field-name` (or `--<metadata["flag"]>`), with the
field's type, default and help, and `metadata["choices"]` where it has them. A field without a default is required;
a bool is a switch (`--name`, or `--no-name`, "without <help>", for one that defaults to true); a sequence takes
one or more values.
Every dashed option is also accepted with underscores (`--max_length`, the spelling of the training flags).
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import dataclasses
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that accepts each `--dashed-option` as `--dashed_option` too (help shows the dashed one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def _add_action(self, action: argparse.Action) -> argparse.Action:
        # Every option reaches the parser here, also through a mutually exclusive group.
        names = action.option_strings
        names += ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
        return super()._add_action(action)


class _Formatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if not (s.startswith("--") and "_" in s[2:])]
        return super()._format_action_invocation(shown)


def _unwrap_optional(kind: Any) -> Any:
    """`X | None` -> X; a union of several types other than None -> str (paths: `str | os.PathLike`)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return kind


def config_options(config: type) -> list[dataclasses.Field]:
    """The fields of the dataclass `config` that are command-line options (those with help)."""
    return [f for f in dataclasses.fields(config) if "help" in f.metadata]


def add_config_options(parser: argparse.ArgumentParser, config: type, **overrides: dict[str, Any]) -> None:
    """Add one option per option field of `config` to `parser`; `overrides[field]` replaces or adds `add_argument`
    keywords, and its "flag" the option's name."""
    hints = typing.get_type_hints(config)
    for spec in config_options(config):
        extra = dict(overrides.get(spec.name, {}))
        flag = "--" + extra.pop("flag", spec.metadata.get("flag", spec.name)).replace("_", "-")
        kind = _unwrap_optional(hints[spec.name])
        has_default = spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING
        default = spec.default if spec.default is not dataclasses.MISSING else None
        help_text = spec.metadata["help"]
        kwargs: dict[str, Any] = {"dest": spec.name, "help": help_text}
        if kind is bool:
            if default:
                flag, kwargs["help"] = "--no-" + flag[2:], f"without {help_text}"
            kwargs.update(action="store_false" if default else "store_true")
        else:
            if typing.get_origin(kind) in (list, tuple, collections.abc.Sequence):
                kwargs["nargs"] = "+"
            elif kind in (int, float):
                kwargs["type"] = kind
            if "choices" in spec.metadata:
                kwargs["choices"] = spec.metadata["choices"]
            kwargs.update(default=default, required=not has_default)
            if default is not None:
                kwargs["help"] = f"{help_text} (default: {default})"
        kwargs.update(extra)
        parser.add_argument(flag, **kwargs)


def config_from_args(config: type[C], args: argparse.Namespace, **changes: Any) -> C:
    """`config` built from the parsed values of its option fields, with `changes` on top (its other fields keep
    their defaults)."""
    values = {spec.name: getattr(args, spec.name) for spec in config_options(config)}
    return config(**{**values, **changes})
