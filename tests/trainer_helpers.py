"""A tiny LLaVA run through the real HF Trainer: data, arguments, and a trainer with token elision mixed in."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from regate_plugin.training import TokenElisionArguments, with_token_elision

from .tiny import PAD, make_batch, tiny_llava, write_cache_for


def samples(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` unpadded samples (one image each) in the Trainer's dataset format."""
    batch = make_batch(batch=n, seed=seed)
    rows = []
    for i in range(n):
        valid = batch["attention_mask"][i].bool()
        rows.append(
            {
                "input_ids": batch["input_ids"][i][valid],
                "labels": batch["labels"][i][valid],
                "pixel_values": batch["pixel_values"][i],
            }
        )
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right padding, as the LLaVA collators do."""
    length = max(r["input_ids"].numel() for r in rows)
    out = {
        "input_ids": torch.zeros(len(rows), length, dtype=torch.long),
        "labels": torch.full((len(rows), length), -100, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
        "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
    }
    for b, r in enumerate(rows):
        n = r["input_ids"].numel()
        out["input_ids"][b, :n], out["labels"][b, :n], out["attention_mask"][b, :n] = r["input_ids"], r["labels"], 1
    return out


def cache_for(directory: Path, rows: list[dict[str, torch.Tensor]]) -> Path:
    return write_cache_for(directory, [collate([r]) for r in rows])


def make_trainer(
    tmp_path: Path,
    rows: list[dict[str, torch.Tensor]],
    elision: dict[str, Any],
    model: Any = None,
    processing_class: Any = None,
    collator: Any = collate,
    args_cls: type = TrainingArguments,
    template: Any = None,
    **training: Any,
) -> Trainer:
    """A `Trainer` with token elision over `rows`; `elision` holds `TokenElisionArguments` fields, `template` is
    `with_token_elision`'s."""
    # Build the model before TrainingArguments: with a ZeRO-3 config those switch on zero.Init for later models.
    model = model if model is not None else tiny_llava()
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="sgd",
        seed=0,
        disable_tqdm=True,
    )
    args = args_cls(**{**defaults, **training})
    trainer_cls = with_token_elision(Trainer, TokenElisionArguments(**elision), template=template)
    return trainer_cls(
        model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=processing_class
    )


def logged(trainer: Trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


class LossFault:
    """A forward hook on the real LM head: when armed, one kept target's logits put all their mass on PAD (never a
    target), so that target's loss is +inf while every gradient stays finite (the training step itself survives)."""

    def __init__(self, head: torch.nn.Module, row: int = 1) -> None:
        self.armed, self.row = False, row
        head.register_forward_hook(self)

    def __call__(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self.armed:
            return None
        self.armed = False
        faulty = torch.full_like(output[self.row], float("-inf"))
        faulty[PAD] = 0.0
        output = output.clone()
        output[self.row] = faulty
        return output

    def at_step(self, step: int) -> TrainerCallback:
        """A callback that arms the fault for optimizer step `step` of a Trainer run."""
        fault = self

        class ArmAt(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                fault.armed = state.global_step == step

        return ArmAt()


def assert_refused_before_step_0(command: list[str], env: dict[str, str], named: str) -> None:
    """Run a launcher command that must refuse its reference cache at the pre-flight check: a non-zero exit with a
    `CacheMismatchError` naming `named`."""
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0
    assert "CacheMismatchError" in done.stderr and named in done.stderr, done.stderr[-3000:]
