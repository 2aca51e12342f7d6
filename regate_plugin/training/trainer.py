"""The Trainer side: a mixin that builds and installs token elision, and `with_token_elision(TrainerClass)`."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..adapters import enable_token_elision
from ..adapters.common import PLANNED_BATCH, plan_ahead
from ..core.keys import IGNORE_INDEX
from .arguments import TokenElisionArguments
from .callback import TokenElisionCallback


def _text_tokenizer(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def _count_as_labels(counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels whose supervised entries number `counts[b]` per row, none in column 0 (so a shifted count agrees)."""
    columns = torch.arange(labels.shape[1], device=labels.device)
    supervised = (columns >= 1) & (columns <= counts.to(labels.device).unsqueeze(1))
    return torch.where(supervised, torch.zeros_like(labels), torch.full_like(labels, IGNORE_INDEX))


class TokenElisionTrainerMixin:
    """Put in front of a `transformers.Trainer` subclass: `class MyTrainer(TokenElisionTrainerMixin, Trainer)`.

    On construction it builds the strategy from `token_elision_args` (or from the `--token_elision` /
    `--regate_*` fields of `args`), checks it against the tokenizer, installs it on the model (before any
    DeepSpeed / DDP wrapping) and adds a `TokenElisionCallback` ahead of the logging callbacks. Under gradient
    accumulation `num_items_in_batch` counts the loss terms elision keeps, so the loss stays the mean over kept
    targets of the whole accumulated batch.
    """

    token_elision_args: TokenElisionArguments | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        elision_args = self.token_elision_args or TokenElisionArguments.from_object(self.args)
        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        self.token_elision = elision_args.build(tokenizer=_text_tokenizer(tokenizer))
        enable_token_elision(self.model, self.token_elision)
        self.token_elision_callback = TokenElisionCallback(self.token_elision)
        self.callback_handler.callbacks.insert(0, self.token_elision_callback)
        self.model_accepts_loss_kwargs = True  # the elided forward honours num_items_in_batch

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self.token_elision_callback.resume_from_checkpoint = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        """The Trainer's own `compute_loss`; takes `num_items_in_batch` on every transformers version."""
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return super().compute_loss(model, inputs, return_outputs, **kwargs)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batch_samples:  # keys and layout read on the host here, not between forward and backward
            if isinstance(batch, dict) and batch.get("labels") is not None:
                batch[PLANNED_BATCH] = plan_ahead(self.token_elision, batch)
        if num_items_in_batch is None or not hasattr(self, "_get_num_items_in_batch"):
            return batch_samples, num_items_in_batch
        self.token_elision.set_step(self.state.global_step)
        kept = [
            {
                "labels": _count_as_labels(
                    self.token_elision.kept_target_counts(b["labels"], b.get("attention_mask")), b["labels"]
                )
            }
            for b in batch_samples
        ]
        return batch_samples, self._get_num_items_in_batch(kept, device)


def with_token_elision(trainer_cls: type, elision_args: TokenElisionArguments | None = None) -> type:
    """`trainer_cls` with token elision mixed in; `elision_args` overrides the fields read from `args`."""
    if issubclass(trainer_cls, TokenElisionTrainerMixin):
        return trainer_cls
    namespace = {"token_elision_args": elision_args, "__module__": trainer_cls.__module__}
    return type(trainer_cls.__name__, (TokenElisionTrainerMixin, trainer_cls), namespace)
