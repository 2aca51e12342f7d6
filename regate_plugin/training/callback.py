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

from ..core import distributed
from ..core.elision import ElisionStats, TokenElision

STATE_FILE = "regate_state.pt"
# Counts a checkpoint holds as sums over the ranks (`batches` is the same on every rank and stays as it is).
_SUMMED_STATS = ("candidates", "kept", "targets", "missing_reference")


def _global_sum(values: list[int]) -> list[int]:
    """Element-wise sum over the ranks (identity in one process)."""
    if distributed.process_group_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def elision_metrics(elision: TokenElision, since: ElisionStats) -> dict[str, float]:
    """What was elided since `since` (kept share of candidates) and over the whole run (share of answer tokens),
    summed over every rank (a collective: call it on all of them)."""
    now = elision.stats
    candidates, kept, targets, all_candidates, all_kept = _global_sum(
        [now.candidates - since.candidates, now.kept - since.kept, now.targets, now.candidates, now.kept]
    )
    answer_tokens = targets + all_candidates - all_kept  # every elided candidate is one dropped loss term
    return {
        "regate/candidates": candidates,
        "regate/kept": kept,
        "regate/kept_fraction": kept / candidates if candidates else 1.0,
        "regate/answer_tokens_processed": targets / answer_tokens if answer_tokens else 1.0,
        "regate/dense": float(elision.is_dense()),
    }


class TokenElisionCallback(TrainerCallback):
    """Drives a `TokenElision` from the Trainer: the dual-cycle schedule follows `state.global_step` (optimizer
    steps), training logs gain `regate/*` metrics summed over the ranks, and `checkpoint-N/regate_state.pt` saves
    and restores the step, running counts and student EMA.

    Under data parallelism every rank folds every rank's observations after each micro-batch (`sync`, see
    docs/DISTRIBUTED.md), so all ranks hold the same EMA; rank 0 writes the one state file, with the counts summed
    over the ranks, and every rank reads it back.
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

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.elision.sync()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.elision.sync()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:  # training logs only (not eval, not the end-of-run summary)
            return
        metrics = elision_metrics(self.elision, self._since)
        self._since = dataclasses.replace(self.elision.stats)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)  # the Trainer appended this log before calling callbacks

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.elision.sync()
        self.elision.set_step(state.global_step)  # the step a resumed run computes next
        saved = self.elision.state_dict()
        totals = _global_sum([getattr(self.elision.stats, name) for name in _SUMMED_STATS])
        saved["stats"] = {**saved["stats"], **dict(zip(_SUMMED_STATS, totals))}
        if distributed.rank() == 0:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(saved, directory / STATE_FILE)

    def load(self, checkpoint: str | os.PathLike[str], global_step: int) -> None:
        """Restore the state saved in `checkpoint` on every rank (rank 0 carries the summed counts, the others
        restart theirs at 0); a checkpoint without one restarts the EMA with a warning."""
        path = Path(checkpoint) / STATE_FILE
        if not path.exists():
            warnings.warn(
                f"resuming at step {global_step} from {Path(checkpoint)}, which holds no {STATE_FILE}: token "
                "elision continues the schedule from this step with an empty student EMA",
                stacklevel=2,
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if distributed.rank() != 0:
            state["stats"] = {**state["stats"], **dict.fromkeys(_SUMMED_STATS, 0)}
        self.elision.load_state_dict(state)
        if self.elision.step != global_step:
            raise ValueError(
                f"{path} was saved at step {self.elision.step}, but the Trainer resumes at step {global_step}"
            )
