"""Zero-edit launchers: `python -m regate_plugin.launch {llava,videollama2,videochat2} <upstream train args>
--token_elision ...`.

Each one adds the flags and the Trainer integration to an unmodified upstream checkout (docs/ARCHITECTURE.md), then
runs its `train()` exactly as its own entry point would. The model-side adapter is installed by the Trainer mixin
on the built model, before any DeepSpeed wrapping. Each also tells the mixin's pre-flight check which plugin template
its codebase's preprocessing equals, read from what upstream's own `preprocess` reads. VideoChat2 has no Trainer:
its launcher wraps the `setup_model` its train script calls (docs/VIDEOCHAT2.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from ..core import distributed
from ..core.config import ConfigError
from ..data.templates import VICUNA_V1_SYSTEM
from .arguments import TokenElisionArguments, check_flag_names, with_token_elision_arguments
from .preflight import CacheMismatchError
from .trainer import add_token_elision, with_token_elision


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


def _plugin_template(conversation: Any, chosen: Any) -> str | None:
    """The plugin template equal to LLaVA's `preprocess` under the conversation template `chosen`, or None."""
    if chosen.sep_style == conversation.SeparatorStyle.PLAIN:
        return "plain"
    if chosen.sep_style == conversation.SeparatorStyle.TWO and chosen.version == "v1":
        return "v1" if chosen.system == VICUNA_V1_SYSTEM else None  # llava_v1 words its system prompt otherwise
    return "qwen_1_5" if chosen.version == "qwen" else None  # LLaVA-NeXT's preprocess_qwen


def llava_template(trainer: Any) -> str:
    """The plugin template equal to LLaVA's `preprocess` under the conversation `train()` chose from `--version`
    (`llava.conversation.default_conversation`). One the plugin has no template of is an error naming the
    `--version` and those that have one (asked only when a reference cache is given: none could fit)."""
    from llava import conversation

    chosen = conversation.default_conversation
    template = _plugin_template(conversation, chosen)
    if template is not None:
        return template
    names = [name for name, known in conversation.conv_templates.items() if known is chosen] or ["?"]
    usable = {name: _plugin_template(conversation, known) for name, known in conversation.conv_templates.items()}
    raise CacheMismatchError(
        f"--version {' / '.join(names)} (conversation version {chosen.version!r}, {chosen.sep_style.name}): the "
        "plugin has no template equal to its preprocess, so no reference cache fits this run. --version values "
        f"it has one for: {', '.join(f'{name} ({t})' for name, t in usable.items() if t)}; train with one of "
        "those, or with --token_elision none or random, which read no cache"
    )


def launch_llava(argv: list[str]) -> None:
    """haotian-liu/LLaVA and LLaVA-NeXT: patch `llava.train.train` in place, then run its `train()`.

    `--attn_implementation` stays in argv where the upstream `TrainingArguments` has that field (LLaVA-NeXT, whose
    `train()` reads it from there); otherwise (haotian-liu/LLaVA) it is passed to `train(attn_implementation=...)`.
    """
    import llava.train.train as upstream

    attn_implementation = None
    if "attn_implementation" not in {f.name for f in dataclasses.fields(upstream.TrainingArguments)}:
        attn_implementation, argv = _pop_option(argv, "--attn_implementation")
    upstream.TrainingArguments = with_token_elision_arguments(upstream.TrainingArguments)
    upstream.LLaVATrainer = with_token_elision(upstream.LLaVATrainer, template=llava_template)
    sys.argv = [upstream.__file__, *argv]
    upstream.train(attn_implementation=attn_implementation)


VIDEOLLAMA2_ATTENTION = "flash_attention_2"  # what videollama2/train.py's `__main__` passes to `train()`


def _load_script(script: str) -> types.ModuleType:
    """Import a train script as a module (its `__main__` block does not run), registered in sys.modules so the
    Trainer can pickle the dataclasses it defines."""
    name = f"regate_launched_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def videollama2_template(trainer: Any) -> str | None:
    """VideoLLaMA2's dataset runs `preprocess_plain` when `data_args.is_pretraining` (`--tune_mm_mlp_adapter`), else
    `preprocess`."""
    data_args = getattr(trainer.train_dataset, "data_args", None)
    if data_args is None:
        return None
    return "videollama2_plain" if getattr(data_args, "is_pretraining", False) else "videollama2"


def launch_videollama2(argv: list[str]) -> None:
    """DAMO-NLP-SG/VideoLLaMA2: its train.py defines its dataclasses in the script and its `__main__` calls
    `train("flash_attention_2")`. Strip and parse our flags (and `--attn_implementation`, default that same value),
    mix the integration into `VideoLLaMA2Trainer` itself (its `_save_checkpoint` / `_save` call
    `super(VideoLLaMA2Trainer, self)`, which a subclass put in its place would turn into a recursion), then import
    the script (first argument, default `videollama2/train.py`) and call its `train(attn_implementation)`."""
    script = argv.pop(0) if argv and not argv[0].startswith("-") else "videollama2/train.py"
    if not Path(script).is_file():
        raise SystemExit(
            f"regate launch videollama2: {script} not found (run from the VideoLLaMA2 checkout, or pass "
            "the path of videollama2/train.py as the first argument)"
        )
    attn_implementation, argv = _pop_option(argv, "--attn_implementation")
    elision_args, argv = split_elision_flags(argv)
    repo = str(Path(script).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import videollama2.videollama2_trainer as trainer_module

    add_token_elision(trainer_module.VideoLLaMA2Trainer, elision_args, template=videollama2_template)
    sys.argv = [script, *argv]
    _load_script(script).train(attn_implementation or VIDEOLLAMA2_ATTENTION)


VIDEOCHAT2_SCRIPT = "tasks/train_it.py"  # run_7b_stage3.sh: torchrun tasks/train_it.py <config.py> output_dir X


def videochat2_setup_model(setup_model: Any, elision_args: TokenElisionArguments) -> Any:
    """Wrap VideoChat2's `setup_model(config, model_cls, find_unused_parameters)`: on the model it built (the
    module DDP wraps, `model_without_ddp`), enable the elision its flags describe, and before every training
    forward fold the previous step's student losses into the EMA and set the step (`train_it.train` takes one
    optimizer step per batch, counted from the `global_step` it resumes at). Its checkpoints do not carry the EMA, so
    a resumed run of a strategy that learns one stops unless --regate_resume_without_state fresh."""
    from ..adapters import enable_token_elision
    from .callback import ResumeStateError

    def setup(config: Any, *args: Any, **kwargs: Any) -> tuple:
        built = setup_model(config, *args, **kwargs)
        model, global_step = built[1], built[-1]
        elision = elision_args.build(tokenizer=getattr(model, "mistral_tokenizer", None))
        if global_step and elision.capabilities.learns and elision.cfg.resume_without_state == "error":
            raise ResumeStateError(
                f"VideoChat2 resumes at step {global_step}, but its checkpoints do not hold the student EMA of token "
                f"elision '{elision.name}': pass --regate_resume_without_state fresh to continue the schedule from "
                "this step with an empty EMA, or start in a new output_dir"
            )
        if global_step and elision.capabilities.learns:
            warnings.warn(
                f"VideoChat2 resumes at step {global_step} with an empty student EMA (--regate_resume_without_state "
                "fresh): its checkpoints do not hold it",
                stacklevel=2,
            )
        enable_token_elision(model, elision)
        step = [global_step]

        def next_step(module: Any, args: tuple) -> None:
            if module.training:
                elision.sync()
                elision.set_step(step[0])
                step[0] += 1

        model.register_forward_pre_hook(next_step)
        return built

    return setup


def launch_videochat2(argv: list[str]) -> None:
    """OpenGVLab/Ask-Anything's VideoChat2 (docs/VIDEOCHAT2.md): `[tasks/train_it.py] <config.py> [key value ...]`.
    Its own loop, no Trainer; its `Config` takes only keys its config file defines, so our flags are stripped and
    parsed first. Import the script (first argument, default `tasks/train_it.py`, run from `video_chat2/`), replace
    `setup_model` in its namespace (`videochat2_setup_model`), then run what its `__main__` runs:
    `main(setup_main())`."""
    script = argv.pop(0) if argv and Path(argv[0]).name.startswith("train_it") else VIDEOCHAT2_SCRIPT
    if not Path(script).is_file():
        raise SystemExit(
            f"regate launch videochat2: {script} not found (run from Ask-Anything's video_chat2/ directory, or "
            "pass the path of tasks/train_it.py as the first argument)"
        )
    elision_args, argv = split_elision_flags(argv)
    repo = str(Path(script).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    module = _load_script(script)
    module.setup_model = videochat2_setup_model(module.setup_model, elision_args)
    sys.argv = [script, *argv]
    module.main(module.setup_main())


LAUNCHERS = {"llava": launch_llava, "videollama2": launch_videollama2, "videochat2": launch_videochat2}


def main(argv: list[str] | None = None) -> None:
    """`[--local_rank=N] {llava,videollama2} <upstream arguments>`: the DeepSpeed launcher puts `--local_rank=N`
    before the codebase (`deepspeed --module regate_plugin.launch llava ...` starts each rank as `python -u -m
    regate_plugin.launch --local_rank=N llava ...`); it is handed on to the upstream script, which takes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m regate_plugin.launch",
        description="Run an upstream train script with --token_elision / --regate_* flags added (no edits to it).",
        epilog="Everything after the codebase name goes to the upstream script, plus: --token_elision "
        "{none,regate,random} --regate_ref_cache DIR --regate_keep_ratio ... (see README), and "
        "--attn_implementation (eager, sdpa, flash_attention_2: what train_mem.py / train.py's __main__ would pass).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--local_rank", type=int, help="set by the deepspeed launcher; passed on to the upstream script"
    )
    parser.add_argument("codebase", choices=sorted(LAUNCHERS))
    at = next((i for i, arg in enumerate(argv) if arg in LAUNCHERS), len(argv))
    ours = parser.parse_args(argv[: at + 1])  # exits with the usage when the codebase is missing or unknown
    upstream = argv[at + 1 :]
    try:
        check_flag_names(upstream)
    except ConfigError as err:
        parser.error(str(err))  # the usage and one line, before anything upstream is imported
    if ours.local_rank is not None:
        upstream.append(f"--local_rank={ours.local_rank}")
    LAUNCHERS[ours.codebase](upstream)
    distributed.destroy_process_group()  # the one upstream's TrainingArguments opened
