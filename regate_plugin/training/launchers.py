"""Zero-edit launchers: `python -m regate_plugin.launch {llava,videollama2} <upstream train args> --token_elision ...`.

Each one adds the flags and the Trainer integration to an unmodified upstream checkout (UPSTREAM.md §9.1), then
runs its `train()` exactly as its own entry point would. The model-side adapter is installed by the Trainer mixin
on the built model, before any DeepSpeed wrapping.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from transformers import HfArgumentParser

from .arguments import TokenElisionArguments, with_token_elision_arguments
from .trainer import with_token_elision


def _pop_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Remove `flag VALUE` / `flag=VALUE` from argv; returns (VALUE or None, the rest)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(flag + "="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return value, rest


def split_elision_flags(argv: list[str]) -> tuple[TokenElisionArguments, list[str]]:
    """Take `--token_elision` / `--regate_*` out of argv (parsed, with their errors) and return the rest."""
    ours, rest = [], list(argv)
    for name in TokenElisionArguments.flag_names():
        value, rest = _pop_option(rest, f"--{name}")
        if value is not None:
            ours += [f"--{name}", value]
    (elision_args,) = HfArgumentParser(TokenElisionArguments).parse_args_into_dataclasses(ours)
    return elision_args, rest


def launch_llava(argv: list[str]) -> None:
    """haotian-liu/LLaVA (and LLaVA-NeXT): patch `llava.train.train` in place, then run its `train()`."""
    attn_implementation, argv = _pop_option(argv, "--attn_implementation")
    import llava.train.train as upstream

    upstream.TrainingArguments = with_token_elision_arguments(upstream.TrainingArguments)
    upstream.LLaVATrainer = with_token_elision(upstream.LLaVATrainer)
    sys.argv = [upstream.__file__, *argv]
    upstream.train(attn_implementation=attn_implementation)


def launch_videollama2(argv: list[str]) -> None:
    """DAMO-NLP-SG/VideoLLaMA2: its train.py runs as `__main__`, so its dataclasses cannot be reached from outside.
    Strip and parse our flags, mix the integration into `VideoLLaMA2Trainer` where train.py imports it from, and
    run the script (first argument, default `videollama2/train.py`) as `__main__`."""
    script = argv.pop(0) if argv and not argv[0].startswith("-") else "videollama2/train.py"
    if not Path(script).is_file():
        raise SystemExit(
            f"regate launch videollama2: {script} not found (run from the VideoLLaMA2 checkout, or pass "
            "the path of videollama2/train.py as the first argument)"
        )
    elision_args, argv = split_elision_flags(argv)
    repo = str(Path(script).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import videollama2.videollama2_trainer as trainer_module

    trainer_module.VideoLLaMA2Trainer = with_token_elision(trainer_module.VideoLLaMA2Trainer, elision_args)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


LAUNCHERS = {"llava": launch_llava, "videollama2": launch_videollama2}


def main(argv: list[str] | None = None) -> None:
    """`[--local_rank=N] {llava,videollama2} <upstream arguments>`: the DeepSpeed launcher puts `--local_rank=N`
    before the codebase (`deepspeed --module regate_plugin.launch llava ...` starts each rank as `python -u -m
    regate_plugin.launch --local_rank=N llava ...`); it is handed on to the upstream script, which takes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m regate_plugin.launch",
        description="Run an upstream train script with --token_elision / --regate_* flags added (no edits to it).",
        epilog="Everything after the codebase name goes to the upstream script, plus: --token_elision "
        "{none,regate,random} --regate_ref_cache DIR --regate_keep_ratio ... (see README). llava also takes "
        "--attn_implementation (train_mem.py passes flash_attention_2).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--local_rank", type=int, help="set by the deepspeed launcher; passed on to the upstream script"
    )
    parser.add_argument("codebase", choices=sorted(LAUNCHERS))
    at = next((i for i, arg in enumerate(argv) if arg in LAUNCHERS), len(argv))
    ours = parser.parse_args(argv[: at + 1])  # exits with the usage when the codebase is missing or unknown
    upstream = argv[at + 1 :]
    if ours.local_rank is not None:
        upstream.append(f"--local_rank={ours.local_rank}")
    LAUNCHERS[ours.codebase](upstream)
