import os

import torch
from transformers import Trainer


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
    if getattr(trainer.args, "tune_mm_mlp_adapter", False):
        weights = {k: v.detach().cpu() for k, v in trainer.model.named_parameters() if "mm_projector" in k}
        trainer.model.config.save_pretrained(output_dir)
        torch.save(weights, os.path.join(output_dir, "mm_projector.bin"))
        return
    trainer.save_model(output_dir)


class VideoLLaMA2Trainer(Trainer):
    """Upstream overrides the sampler, the optimizer groups and checkpoint saving; never `compute_loss`."""
