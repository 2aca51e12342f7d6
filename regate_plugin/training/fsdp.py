"""FSDP through accelerate under token elision: which runs it serves, the others refused before any step.

Under FSDP2 (`fully_shard`, what `--fsdp` with transformers 5's default `fsdp_config` version 2 builds) the root
module's forward pre-hook gathers the parameters no nested unit holds, the LM head's among them, and each decoder
layer gathers its own in its own hooks; the elided forward runs inside the root forward, so every piece it calls
sees whole parameters, and its state is kept in step across the ranks as under DDP (docs/DISTRIBUTED.md). What it
is not tested under is refused, naming the setting and what to use instead.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import parse_flag_from_env

from ..core.config import ConfigError


def unsupported_fsdp(asked: bool, plugin: Any | None) -> str | None:
    """Why token elision cannot run under this FSDP setting and what to use instead, or None where it can; `asked`
    is whether the run asks for FSDP (`--fsdp`, `accelerate launch --use_fsdp`), `plugin` accelerate's FSDP plugin
    in effect (None: no FSDP)."""
    if plugin is None and asked:
        return (
            "FSDP is asked for (--fsdp, or accelerate's use_fsdp), but accelerate did not shard this run: it "
            "shards with FSDP on GPUs and other accelerators only, and on CPU trains the whole model with DDP "
            "instead; drop --fsdp / use_fsdp to train with DDP here, or run on GPUs"
        )
    if plugin is None:
        return None
    version = getattr(plugin, "fsdp_version", 1)  # older accelerate has FSDP1 only
    if version != 2:
        return (
            f"FSDP{version} (fsdp_config version {version}, deprecated by transformers 5) is not tested under token "
            "elision: use FSDP2, fsdp_config {'version': 2} (transformers 5's default), or DeepSpeed ZeRO-2 / ZeRO-3"
        )
    from torch.distributed.fsdp import CPUOffloadPolicy  # torch 2.6+, which FSDP2 needs anyway

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        return (
            "fsdp_config cpu_offload: FSDP2's CPU offload pins host memory, which needs a GPU, so token elision is "
            "not tested under it; drop cpu_offload"
        )
    return None


def check_fsdp(trainer: Any) -> None:
    """Raise `ConfigError` where the trainer's FSDP setting is one token elision does not run under."""
    asked = bool(getattr(trainer.args, "fsdp", None)) or parse_flag_from_env("ACCELERATE_USE_FSDP")
    accelerator = getattr(trainer, "accelerator", None)
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    problem = unsupported_fsdp(asked, plugin)
    if problem is not None:
        raise ConfigError(f"{type(trainer).__name__} with --token_elision: {problem}")
