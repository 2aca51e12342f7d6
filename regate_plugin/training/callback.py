"""`TokenElisionCallback`: schedule from `global_step`, per-log elision metrics, state saved with each checkpoint."""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..core import distributed
from ..core.config import is_state_neutral
from ..core.errors import UserError
from ..core.files import replaced_on_success
from ..store import CacheError
from ..strategies import ElisionStats, TokenElision
from .arguments import CONFIG_FLAGS
from .preflight import startup_summary

STATE_FILE = "regate_state.pt"
# Counts a checkpoint holds as sums over the ranks (`batches` is the same on every rank and stays as it is).
_SUMMED_STATS = ("candidates", "kept", "targets", "missing_reference", "nonfinite")


class ResumeStateError(UserError, ValueError):
    """A checkpoint's token-elision state cannot be resumed as asked; the message says what to do."""


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
    candidates, kept, missing, nonfinite, targets, all_candidates, all_kept = _global_sum(
        [
            now.candidates - since.candidates,
            now.kept - since.kept,
            now.missing_reference - since.missing_reference,
            now.nonfinite - since.nonfinite,
            now.targets,
            now.candidates,
            now.kept,
        ]
    )
    answer_tokens = targets + all_candidates - all_kept  # every elided candidate is one dropped loss term
    return {
        "regate/candidates": candidates,
        "regate/kept": kept,
        "regate/kept_fraction": kept / candidates if candidates else 1.0,
        "regate/answer_tokens_processed": targets / answer_tokens if answer_tokens else 1.0,
        "regate/dense": float(elision.is_dense()),
        "regate/keep_ratio": elision.sparse_keep_ratio(),  # what sparse steps keep now (keep_control='adaptive')
        "regate/missing_reference": missing,
        "regate/nonfinite": nonfinite,
    }


class TokenElisionCallback(TrainerCallback):
    """Drives a `TokenElision` from the Trainer: the dual-cycle schedule follows `state.global_step` (optimizer
    steps), training logs gain `regate/*` metrics summed over the ranks, and `checkpoint-N/regate_state.pt` saves
    and restores the step, running counts and student EMA (written when the Trainer decides to save, before it
    saves the model: it must run after the Trainer's `DefaultFlowCallback`). Rank 0 prints a startup summary before
    the first step.

    Under data parallelism every rank folds every rank's observations after each micro-batch (`sync`, see
    docs/DISTRIBUTED.md), so all ranks hold the same EMA; rank 0 writes the one state file, with the counts summed
    over the ranks, and every rank reads it back.
    """

    def __init__(self, elision: TokenElision, resume_from_checkpoint: str | os.PathLike[str] | None = None) -> None:
        self.elision = elision
        self.resume_from_checkpoint = resume_from_checkpoint
        self._since = dataclasses.replace(elision.stats)
        self._saved_step: int | None = None  # the step whose state file this run last wrote

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.elision.cfg = self.elision.cfg.scaled_to(state.max_steps)  # schedule='auto': from the run's length
        if state.global_step > 0:
            checkpoint = self.resume_from_checkpoint or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.load(checkpoint, state.global_step)
        self.elision.set_step(state.global_step)
        self._since = dataclasses.replace(self.elision.stats)
        if distributed.rank() == 0:
            print(startup_summary(self.elision, state.global_step, state.max_steps), flush=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.elision.set_step(state.global_step)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.elision.sync()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:  # training logs only (not eval, not the end-of-run summary)
            return
        metrics = elision_metrics(self.elision, self._since)
        self._since = dataclasses.replace(self.elision.stats)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)  # the Trainer appended this log before calling callbacks

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.elision.sync()
        if control.should_save:  # set by the Trainer's flow callback, which runs before this one
            self.save(args, state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self.save(args, state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._saved_step != state.global_step:  # a save decided after on_step_end (save_strategy='best')
            self.save(args, state)

    def save(self, args: Any, state: Any) -> None:
        """Write `checkpoint-N/regate_state.pt` for the checkpoint the Trainer is about to save, before it saves
        the model and rotates older checkpoints away: a kill during the model save leaves the older checkpoint
        whole, and the new one holds the state. Rank 0 writes it atomically (a temporary file, fsync, rename), so
        no reader sees a torn file; every rank runs the collective parts (sync, the summed counts) and waits for
        the file, so all ranks see the same checkpoint directory."""
        self.elision.sync()
        self.elision.set_step(state.global_step)  # the step a resumed run computes next
        saved = self.elision.state_dict()
        stats = vars(self.elision.stats)
        totals = _global_sum([stats[name] for name in _SUMMED_STATS])
        saved["stats"] = {**saved["stats"], **dict(zip(_SUMMED_STATS, totals))}
        if distributed.rank() == 0:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            with replaced_on_success(path) as staging, open(staging, "wb") as handle:
                torch.save(saved, handle)
                handle.flush()
                os.fsync(handle.fileno())
        if distributed.process_group_size() > 1:
            dist.barrier()
        self._saved_step = state.global_step

    def load(self, checkpoint: str | os.PathLike[str], global_step: int) -> None:
        """Restore the state saved in `checkpoint` on every rank (rank 0 carries the summed counts, the others
        restart theirs at 0).

        A state that is missing, unreadable (a truncated file), another strategy's, saved with other settings
        (state-neutral ones aside), or with an EMA that cannot be re-placed into this run's reference cache cannot
        continue the run: for a strategy that learns from the student's losses that is a `ResumeStateError` unless
        `resume_without_state='fresh'`, which continues the schedule with an empty EMA and zeroed counts, as a
        strategy that learns nothing always does; both with a warning."""
        path = Path(checkpoint) / STATE_FILE
        state, problem = _read_state(path)
        if state is not None:
            problem = _unusable(state, self.elision)
        if problem is None:
            if distributed.rank() != 0:
                state["stats"] = {**state["stats"], **dict.fromkeys(_SUMMED_STATS, 0)}
            try:
                self.elision.load_state_dict(state)
            except CacheError as err:  # an EMA that cannot be re-placed into this run's reference cache
                problem = str(err)
            else:
                if self.elision.step != global_step:
                    raise ValueError(
                        f"{path} was saved at step {self.elision.step}, but the Trainer resumes at step {global_step}"
                    )
                return
        if self.elision.capabilities.learns and self.elision.cfg.resume_without_state == "error":
            raise ResumeStateError(
                f"resuming at step {global_step}: {problem}, so the student EMA of token elision "
                f"'{self.elision.name}' cannot be restored. Resume from a checkpoint this run's settings saved, "
                "or pass --regate_resume_without_state fresh (ReGATEConfig.resume_without_state='fresh') to "
                "continue the schedule from this step with an empty student EMA"
            )
        warnings.warn(
            f"resuming at step {global_step}: {problem}; token elision '{self.elision.name}' continues the "
            "schedule from this step with a fresh state (no student EMA learnt yet, counts from 0)",
            stacklevel=2,
        )


def _read_state(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The state saved at `path`, or None and why it cannot be read (missing, truncated, not a state)."""
    if not path.exists():
        return None, f"{path.parent} holds no {STATE_FILE}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        return None, f"{path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    if not isinstance(state, dict) or not {"name", "step", "stats"} <= state.keys():
        return None, f"{path} is not a token elision state"
    return state, None


def _unusable(state: dict[str, Any], elision: TokenElision) -> str | None:
    """Why a loaded state cannot continue this run (another strategy, other settings), or None."""
    if state.get("name") != elision.name:
        return f"its {STATE_FILE} was saved by token elision '{state.get('name')}', this run uses '{elision.name}'"
    saved = state.get("config")
    if saved is None:  # written before states carried their settings
        return None
    fields = [f for f in dataclasses.fields(elision.cfg) if not is_state_neutral(f)]
    current = elision.cfg.to_dict()
    was_set = {f.name: saved.get(f.name, f.default) for f in fields}
    changed = [f.name for f in fields if was_set[f.name] != current[f.name]]
    if not changed:
        return None
    was = " ".join(f"--{CONFIG_FLAGS.get(name, name)} {was_set[name]}" for name in changed)
    now = " ".join(f"--{CONFIG_FLAGS.get(name, name)} {current[name]}" for name in changed)
    return f"its {STATE_FILE} was saved with {was}, this run has {now} ({', '.join(changed)} differ)"
