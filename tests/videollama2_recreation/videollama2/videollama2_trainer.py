import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME


def find_all_linear_names(model):
    skip = ("mm_projector", "vision_tower", "vision_resampler")
    names = {
        name.split(".")[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip)
    }
    names.discard("lm_head")
    return sorted(names)


def get_peft_state_maybe_zero_3(named_params, bias):
    return {k: v.detach().cpu().clone() for k, v in named_params if "lora_" in k}


def get_peft_state_non_lora_maybe_zero_3(named_params, require_grad_only=True):
    return {
        k: v.detach().cpu().clone()
        for k, v in named_params
        if "lora_" not in k and (v.requires_grad or not require_grad_only)
    }


def safe_save_model_for_hf_trainer(trainer, output_dir):
    """Projector pretraining saves `mm_projector.bin` (into `../mm_projector/checkpoint-N.bin` for a checkpoint
    folder); otherwise the state dict, moved to the CPU, goes straight to `trainer._save` (not `save_model`)."""
    if getattr(trainer.args, "tune_mm_mlp_adapter", False):
        weights = {k: v.detach().cpu() for k, v in trainer.model.named_parameters() if "mm_projector" in k}
        trainer.model.config.save_pretrained(output_dir)
        current, parent = output_dir.split("/")[-1], os.path.dirname(output_dir)
        if trainer.args.local_rank in (0, -1):
            if current.startswith("checkpoint-"):
                os.makedirs(os.path.join(parent, "mm_projector"), exist_ok=True)
                torch.save(weights, os.path.join(parent, "mm_projector", f"{current}.bin"))
            else:
                torch.save(weights, os.path.join(output_dir, "mm_projector.bin"))
        return
    if trainer.deepspeed:
        trainer.save_model(output_dir)
        return
    state_dict = trainer.model.state_dict()
    if trainer.args.should_save:
        trainer._save(output_dir, state_dict={key: value.cpu() for key, value in state_dict.items()})


class VideoLLaMA2Trainer(Trainer):
    """Upstream overrides the sampler, the optimizer groups and checkpoint saving; never `compute_loss`.

    Its `_save_checkpoint` and `_save` name the class in `super(VideoLLaMA2Trainer, self)`, as these do."""

    def _save_checkpoint(self, model, trial, metrics=None):
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            output_dir = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            weights = {
                k: v.detach().cpu()
                for k, v in self.model.named_parameters()
                if any(key in k for key in ("mm_projector", "vision_resampler"))
            }
            if self.args.local_rank in (0, -1):
                self.model.config.save_pretrained(output_dir)
                torch.save(weights, os.path.join(output_dir, "mm_projector.bin"))
            self._save_optimizer_and_scheduler(output_dir)
            self._save_rng_state(output_dir)
            self.state.save_to_json(os.path.join(output_dir, TRAINER_STATE_NAME))
            self.args.distributed_state.wait_for_everyone()
        else:
            super(VideoLLaMA2Trainer, self)._save_checkpoint(model, trial, metrics)  # noqa: UP008 (as upstream)

    def _save(self, output_dir=None, state_dict=None):
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            pass
        else:
            super(VideoLLaMA2Trainer, self)._save(output_dir, state_dict)  # noqa: UP008 (as upstream)
