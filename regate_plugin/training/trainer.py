"""The Trainer side: a mixin that builds and installs token elision, and `with_token_elision(TrainerClass)`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import DefaultFlowCallback

from ..adapters import enable_token_elision
from ..adapters.common import PLANNED_BATCH, plan_ahead
from .arguments import TokenElisionArguments
from .callback import TokenElisionCallback
from .fsdp import check_fsdp
from .preflight import PREFLIGHT_SAMPLES, RunFacts, check_cache_fits
from .trl import check_trl_options

RunTemplate = Callable[[Any], "str | None"]
"""The plugin template a run's preprocessing equals, read off the trainer (the launchers know their codebase's)."""

_VISUAL_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def _text_tokenizer(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def _visual_token_ids(model: Any) -> tuple[int, ...]:
    """The ids an HF-native model's processor expands visual placeholders into (none for upstream models)."""
    config = getattr(model, "config", None)
    ids = (getattr(config, name, None) for name in _VISUAL_TOKEN_FIELDS)
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0))


def _checkpoint_key_renamer(model: Any) -> Callable[[str], str] | None:
    """How `from_pretrained` renames `model`'s checkpoint keys to its module names (transformers 5's weight
    renamings), or None where it renames none (transformers 4, a model without renamings, or one whose mapping also
    converts tensors, which the Trainer's reload cannot do by renaming)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoints hold the module names
        return None
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    transforms = get_model_conversion_mapping(model)
    if not transforms or not all(isinstance(t, WeightRenaming) for t in transforms):
        return None
    expected = model.state_dict()

    def rename(key: str) -> str:
        return rename_source_key(key, transforms, [], model.base_model_prefix, expected)[0]

    return rename


class TokenElisionTrainerMixin:
    """Put in front of a `transformers.Trainer` subclass: `class MyTrainer(TokenElisionTrainerMixin, Trainer)`.

    On construction it builds the strategy from `token_elision_args` (or from the `--token_elision` /
    `--regate_*` fields of `args`), checks it against the tokenizer and the run's FSDP setting (`training/fsdp.py`),
    installs it on the model (before any DeepSpeed / DDP / FSDP wrapping) and adds a `TokenElisionCallback` after the
    Trainer's flow callback and ahead of the logging callbacks. `train` first runs the pre-flight check of the
    reference cache against the run and its first training samples (`training/preflight.py`). Under gradient
    accumulation `num_items_in_batch` counts the loss terms elision keeps, so the loss stays the mean over kept
    targets of the whole accumulated batch.
    """

    token_elision_args: TokenElisionArguments | None = None
    token_elision_template: RunTemplate | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_trl_options(self)
        check_fsdp(self)
        elision_args = self.token_elision_args or TokenElisionArguments.from_object(self.args)
        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        self.token_elision = elision_args.build(tokenizer=_text_tokenizer(tokenizer))
        enable_token_elision(self.model, self.token_elision)
        self.token_elision_callback = TokenElisionCallback(self.token_elision)
        callbacks = self.callback_handler.callbacks  # after the flow callback (it decides saves), before the loggers
        flow = [i for i, callback in enumerate(callbacks) if isinstance(callback, DefaultFlowCallback)]
        callbacks.insert(flow[-1] + 1 if flow else 0, self.token_elision_callback)
        self.model_accepts_loss_kwargs = True  # the elided forward honours num_items_in_batch

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self.token_elision_callback.resume_from_checkpoint = resume_from_checkpoint
        self.check_reference_cache()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """The Trainer's own weight reload, with the checkpoint's keys renamed as `from_pretrained` renames them.

        transformers 5 saves some models (LLaVA-family, Qwen2-VL, ...) under their older key names and maps them back
        only in `from_pretrained`; the Trainer's reload (`model.load_state_dict(checkpoint, strict=False)`, per
        shard) does not, so a resumed run went on from the weights the model already had, with a "missing keys"
        warning (upstream transformers issue 43701). transformers 4 saves the module names: nothing to rename."""
        target = model if model is not None else self.model
        rename = _checkpoint_key_renamer(target)
        if rename is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_state_dict = target.load_state_dict

        def load_renamed(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            return load_state_dict({rename(key): value for key, value in state_dict.items()}, *args, **kwargs)

        target.load_state_dict = load_renamed
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            del target.load_state_dict

    def check_reference_cache(self) -> None:
        """The pre-flight check: the cache's manifest against this run, and its first training samples' keys
        against the cache; raises `CacheMismatchError` naming the likely cause (no-op without a cache)."""
        if self.token_elision.capabilities.reference is None:  # before asking the launcher for the template
            return
        template = self.token_elision_template
        run = RunFacts(
            template=template(self) if template is not None else None,
            max_length=getattr(self.args, "model_max_length", None),
            visual_token_ids=_visual_token_ids(self.model),
        )
        check_cache_fits(self.token_elision, self._first_training_batches(PREFLIGHT_SAMPLES), run)

    def _first_training_batches(self, count: int) -> Iterator[dict[str, Any]]:
        """The first `count` samples of the training set, in per-device batches collated as the Trainer's dataloader
        collates them (unused columns removed); the sampler and every random state are left alone."""
        dataset, collator = self.train_dataset, self.data_collator
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            return
        from transformers.utils import is_datasets_available

        arrow = False
        if is_datasets_available():
            import datasets

            arrow = isinstance(dataset, datasets.Dataset)
        if arrow:  # unused columns come off the dataset or off each batch, as the Trainer's own dataloader does
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        size, total = max(self.args.per_device_train_batch_size, 1), min(count, len(dataset))
        for start in range(0, total, size):
            batch = collator([dataset[i] for i in range(start, min(start + size, total))])
            if isinstance(batch, dict) and batch.get("input_ids") is not None and batch.get("labels") is not None:
                yield batch

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
        """The Trainer's batches, each with its sample keys and layout read on the host here (not between forward
        and backward); where the Trainer counts the loss terms of an accumulated batch (`num_items_in_batch`,
        transformers 4.46+), count the ones elision keeps instead of every supervised label."""
        batch_samples, label_count = super().get_batch_samples(epoch_iterator, num_batches, device)
        labelled = [batch for batch in batch_samples if isinstance(batch, dict) and batch.get("labels") is not None]
        for batch in labelled:
            batch[PLANNED_BATCH] = plan_ahead(self.token_elision, batch)
        if label_count is None:  # this Trainer does not normalise by a count
            return batch_samples, label_count
        self.token_elision.set_step(self.state.global_step)
        kept = sum(
            int(self.token_elision.loss_denominators(planned.layout, planned.keys).sum())
            for planned in (batch[PLANNED_BATCH] for batch in labelled)
        )
        return batch_samples, self._spread_like_label_count(torch.tensor(kept, device=device))

    def _spread_like_label_count(self, kept: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel processes (or split over DataParallel replicas) as the Trainer does its count."""
        args = self.args
        if getattr(args, "average_tokens_across_devices", False):
            if args.world_size > 1:
                kept = self.accelerator.gather(kept).sum()
        elif args.n_gpu > 1:
            kept = kept // args.n_gpu
        if args.n_gpu > 1:
            kept = kept.unsqueeze(0).expand(args.n_gpu, -1)
        return kept


def with_token_elision(
    trainer_cls: type, elision_args: TokenElisionArguments | None = None, template: RunTemplate | None = None
) -> type:
    """`trainer_cls` with token elision mixed in; `elision_args` overrides the fields read from `args`, and
    `template(trainer)` names the plugin template the run's preprocessing equals, for the pre-flight check."""
    if issubclass(trainer_cls, TokenElisionTrainerMixin):
        return trainer_cls
    namespace = {
        "token_elision_args": elision_args,
        "token_elision_template": staticmethod(template) if template is not None else None,
        "__module__": trainer_cls.__module__,
    }
    return type(trainer_cls.__name__, (TokenElisionTrainerMixin, trainer_cls), namespace)


def add_token_elision(
    trainer_cls: type, elision_args: TokenElisionArguments | None = None, template: RunTemplate | None = None
) -> type:
    """Mix token elision into `trainer_cls` itself (its bases gain the mixin), for upstream trainers whose methods
    call `super(TheirTrainer, self)` by name from the module a subclass would have to replace them in; the
    arguments are `with_token_elision`'s."""
    mixin_methods = {name for name, value in vars(TokenElisionTrainerMixin).items() if callable(value)}
    overridden = sorted(mixin_methods & set(vars(trainer_cls)))
    if overridden:
        raise TypeError(
            f"{trainer_cls.__name__} defines {', '.join(overridden)} itself; token elision cannot be mixed in "
            "behind them (subclass it with with_token_elision instead)"
        )
    if not issubclass(trainer_cls, TokenElisionTrainerMixin):
        trainer_cls.__bases__ = (TokenElisionTrainerMixin, *trainer_cls.__bases__)
    trainer_cls.token_elision_args = elision_args
    trainer_cls.token_elision_template = staticmethod(template) if template is not None else None
    return trainer_cls
