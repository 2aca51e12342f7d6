"""`TokenElisionCallback`: schedule from `global_step`, per-log elision metrics, state saved with each checkpoint."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..core.distributed import rank, world_size
from ..core.elision import ElisionStats, TokenElision

STATE_FILE = "regate_state.pt"


def state_file_name(rank: int) -> str:
    """Rank 0 writes `regate_state.pt`; other ranks keep their own EMA in `regate_state-rank{N}.pt`."""
    return STATE_FILE if rank == 0 else f"regate_state-rank{rank}.pt"


def elision_metrics(elision: TokenElision, since: ElisionStats) -> dict[str, float]:
    """What was elided since `since` (kept share of candidates) and over the whole run (share of answer tokens)."""
    now = elision.stats
    candidates, kept = now.candidates - since.candidates, now.kept - since.kept
    answer_tokens = now.targets + now.candidates - now.kept  # every elided candidate is one dropped loss term
    return {
        "regate/candidates": candidates,
        "regate/kept": kept,
        "regate/kept_fraction": kept / candidates if candidates else 1.0,
        "regate/answer_tokens_processed": now.targets / answer_tokens if answer_tokens else 1.0,
        "regate/dense": float(elision.is_dense()),
    }


class TokenElisionCallback(TrainerCallback):
    """Drives a `TokenElision` from the Trainer: the dual-cycle schedule follows `state.global_step` (optimizer
    steps), training logs gain `regate/*` metrics, and `checkpoint-N/regate_state.pt` saves and restores the
    step, running counts and student EMA. Under data parallelism the ranks exchange their EMA updates each step.
    """

    def __init__(self, elision: TokenElision, resume_from_checkpoint: str | os.PathLike[str] | None = None) -> None:
        self.elision = elision
        self.resume_from_checkpoint = resume_from_checkpoint
        self._since = dataclasses.replace(elision.stats)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0:
            checkpoint = self.resume_from_checkpoint or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.load(checkpoint, state.global_step)
        self.elision.set_step(state.global_step)
        self._since = dataclasses.replace(self.elision.stats)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.elision.set_step(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ema = getattr(self.elision, "ema", None)
        if ema is None or world_size() == 1:
            return
        gathered: list[Any] = [None] * world_size()
        dist.all_gather_object(gathered, ema.drain_pending())
        for sender, updates in enumerate(gathered):
            if sender != rank():
                ema.merge(updates)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:  # training logs only (not eval, not the end-of-run summary)
            return
        metrics = elision_metrics(self.elision, self._since)
        self._since = dataclasses.replace(self.elision.stats)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)  # the Trainer appended this log before calling callbacks

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        directory.mkdir(parents=True, exist_ok=True)
        self.elision.set_step(state.global_step)  # the step a resumed run computes next
        torch.save(self.elision.state_dict(), directory / state_file_name(rank()))

    def load(self, checkpoint: str | os.PathLike[str], global_step: int) -> None:
        """Restore the state saved in `checkpoint`; a checkpoint without one restarts the EMA with a warning."""
        directory = Path(checkpoint)
        path = directory / state_file_name(rank())
        if not path.exists() and (directory / STATE_FILE).exists():
            path = directory / STATE_FILE  # more ranks than the run that saved it: rank 0's EMA is the best start
        if not path.exists():
            warnings.warn(
                f"resuming at step {global_step} from {directory}, which holds no {STATE_FILE}: token elision "
                "continues the schedule from this step with an empty student EMA",
                stacklevel=2,
            )
            return
        self.elision.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if self.elision.step != global_step:
            raise ValueError(
                f"{path} was saved at step {self.elision.step}, but the Trainer resumes at step {global_step}"
            )
