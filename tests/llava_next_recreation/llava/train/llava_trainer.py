"""Upstream llava/train/llava_trainer.py: `LLaVATrainer`, the Trainer train() builds (samplers not re-created)."""

from transformers import Trainer


class LLaVATrainer(Trainer):
    pass
