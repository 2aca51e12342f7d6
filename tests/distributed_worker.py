"""One rank of a tiny-LLaVA HF Trainer run under token elision, started by `torchrun` from tests/test_distributed.py.

    torchrun --nproc_per_node 2 -m tests.distributed_worker OUT {ddp,zero2,zero3,fsdp2,fsdp2-as-is} \
        {train,resume,kill,nonfinite}

Every rank writes `OUT/<phase>-rank<N>.pt`: its final elision state (step, stats, EMA arrays) and its `regate/*`
logs. `resume` trains to `SAVE_AT` with a checkpoint, then a fresh Trainer resumes from it to `STEPS`; `kill`
SIGKILLs rank 1 in the middle of a step; `nonfinite` gives one of rank 1's losses at step `FAULT_AT` the value +inf.
`fsdp2` shards the model with FSDP2 through accelerate, which on CPU only `_fsdp_on_cpu` lets it do; `fsdp2-as-is`
asks for the same under accelerate as installed (which trains with DDP instead on CPU, and token elision refuses).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule
from transformers import LlavaForConditionalGeneration, TrainerCallback

from .tiny import tiny_llava
from .trainer_helpers import LossFault, cache_for, make_trainer, samples

STEPS, SAVE_AT, SAMPLES, FAULT_AT = 12, 6, 16, 4
PER_RANK_BATCH = 2
# Two dense warm-up steps fill the EMA, then a sparse phase in which selection weighs it by 1 - lambda = 0.8.
FLAGS = {
    "token_elision": "regate",
    "regate_warmup_steps": 2,
    "regate_cycle_steps": STEPS,
    "regate_dense_steps": 0,
    "regate_lambda": 0.2,
    "regate_keep_ratio": 0.5,
}
ZERO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "zero_allow_untested_optimizer": True,
}


def training_args(mode: str) -> dict[str, Any]:
    """The arguments shared by the one-process reference and every rank (the reference runs mode 'ddp')."""
    args: dict[str, Any] = {"max_steps": STEPS, "optim": "adamw_torch", "learning_rate": 1e-3}
    if mode.startswith("zero"):
        args["deepspeed"] = {**ZERO, "zero_optimization": {"stage": int(mode[-1])}}
    if mode.startswith("fsdp2"):
        args.update(fsdp=True, fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT"})
    return args


def student(checkpoint: Path | None = None) -> LlavaForConditionalGeneration:
    """The tiny LLaVA (or the one saved in `checkpoint`), its vision tower's last layer norm frozen: LLaVA's forward
    reads the tower's hidden states before it, so it never has a gradient, and resuming FSDP2's sharded optimizer
    state fails on a trainable parameter that has no state (torch.distributed.checkpoint: "Missing key in
    checkpoint state_dict")."""
    model = tiny_llava() if checkpoint is None else LlavaForConditionalGeneration.from_pretrained(checkpoint)
    model.model.vision_tower.post_layernorm.requires_grad_(False)
    return model


def elision_flags(root: Path) -> dict[str, Any]:
    rows = samples(SAMPLES)
    return {**FLAGS, "regate_ref_cache": str(cache_for(root / "cache", rows))}


def record(trainer: Any) -> dict[str, Any]:
    """What the test compares: the elision state (the EMA synced), the logged counts, and whether FSDP sharded the
    model."""
    trainer.token_elision.sync()
    logs = [
        {k: v for k, v in entry.items() if k.startswith("regate/") or k in ("step", "loss")}
        for entry in trainer.state.log_history
        if "regate/kept" in entry
    ]
    sharded = isinstance(trainer.model_wrapped, FSDPModule)
    return {"state": trainer.token_elision.state_dict(), "logs": logs, "fsdp": sharded}


def _fsdp_on_cpu() -> None:
    """Let accelerate shard with FSDP on CPU. Its `AcceleratorState` turns FSDP on only for GPU-like devices and
    drops the plugin on CPU (the run trains with DDP); torch's FSDP2 itself runs on CPU with gloo, so this sets the
    two fields accelerate sets on a GPU, and everything after (accelerate's `fully_shard` wrapping, the Trainer's
    FSDP checkpoints and resume) is accelerate's and the Trainer's own code."""
    init = AcceleratorState.__init__

    @functools.wraps(init)
    def init_with_fsdp(self: AcceleratorState, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init_with_fsdp


class _KillRank1(TrainerCallback):
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 3 and int(os.environ["RANK"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out: Path, mode: str, phase: str) -> None:
    rank = int(os.environ["RANK"])
    if mode == "fsdp2":
        _fsdp_on_cpu()
    torch.manual_seed(0)
    rows = samples(SAMPLES)
    flags = elision_flags(out / f"rank{rank}")  # every rank builds the same cache bytes from the same samples
    args = {**training_args(mode), "per_device_train_batch_size": PER_RANK_BATCH}
    if phase == "resume":
        args.update(save_strategy="steps", save_steps=SAVE_AT, max_steps=SAVE_AT)
    trainer = make_trainer(out / f"run-{phase}", rows, flags, model=student(), **args)
    if phase == "kill":
        trainer.add_callback(_KillRank1())
    if phase == "nonfinite" and rank == 1:
        trainer.add_callback(LossFault(trainer.model.get_output_embeddings()).at_step(FAULT_AT))
    trainer.train()
    if phase == "resume":
        checkpoint = out / f"run-{phase}" / "out" / f"checkpoint-{SAVE_AT}"
        # FSDP's checkpoints hold sharded weights, which the Trainer loads into the wrapped model as it resumes
        model = student(None if mode.startswith("fsdp") else checkpoint)
        args.update(max_steps=STEPS, save_strategy="no")
        trainer = make_trainer(out / f"run-{phase}-2", rows, flags, model=model, **args)
        trainer.train(resume_from_checkpoint=str(checkpoint))
    torch.save(record(trainer), out / f"{phase}-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
    if torch.distributed.is_initialized():  # leave together: no rank exits while gloo still talks to it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
