"""One rank of a tiny-LLaVA HF Trainer run under token elision, started by `torchrun` from tests/test_distributed.py.

    torchrun --nproc_per_node 2 -m tests.distributed_worker OUT {ddp,zero2,zero3} {train,resume,kill,nonfinite}

Every rank writes `OUT/<phase>-rank<N>.pt`: its final elision state (step, stats, EMA arrays) and its `regate/*`
logs. `resume` trains to `SAVE_AT` with a checkpoint, then a fresh Trainer resumes from it to `STEPS`; `kill`
SIGKILLs rank 1 in the middle of a step; `nonfinite` gives one of rank 1's losses at step `FAULT_AT` the value +inf.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
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
    return args


def elision_flags(root: Path) -> dict[str, Any]:
    rows = samples(SAMPLES)
    return {**FLAGS, "regate_ref_cache": str(cache_for(root / "cache", rows))}


def record(trainer: Any) -> dict[str, Any]:
    """What the test compares: the elision state (the EMA synced) and the logged counts."""
    trainer.token_elision.sync()
    logs = [
        {k: v for k, v in entry.items() if k.startswith("regate/") or k in ("step", "loss")}
        for entry in trainer.state.log_history
        if "regate/kept" in entry
    ]
    return {"state": trainer.token_elision.state_dict(), "logs": logs}


class _KillRank1(TrainerCallback):
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 3 and int(os.environ["RANK"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out: Path, mode: str, phase: str) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    rows = samples(SAMPLES)
    flags = elision_flags(out / f"rank{rank}")  # every rank builds the same cache bytes from the same samples
    args = {**training_args(mode), "per_device_train_batch_size": PER_RANK_BATCH}
    if phase == "resume":
        args.update(save_strategy="steps", save_steps=SAVE_AT, max_steps=SAVE_AT)
    trainer = make_trainer(out / f"run-{phase}", rows, flags, model=tiny_llava(), **args)
    if phase == "kill":
        trainer.add_callback(_KillRank1())
    if phase == "nonfinite" and rank == 1:
        trainer.add_callback(LossFault(trainer.model.get_output_embeddings()).at_step(FAULT_AT))
    trainer.train()
    if phase == "resume":
        checkpoint = out / f"run-{phase}" / "out" / f"checkpoint-{SAVE_AT}"
        model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
        args.update(max_steps=STEPS, save_strategy="no")
        trainer = make_trainer(out / f"run-{phase}-2", rows, flags, model=model, **args)
        trainer.train(resume_from_checkpoint=str(checkpoint))
    torch.save(record(trainer), out / f"{phase}-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
    if torch.distributed.is_initialized():  # leave together: no rank exits while gloo still talks to it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
