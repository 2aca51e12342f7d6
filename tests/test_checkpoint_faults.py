"""Checkpoints under faults, through the real HF Trainer: a kill while a checkpoint is saved under
`save_total_limit=1` (the state file is written atomically before the Trainer saves the model and rotates older
checkpoints away), and a resume into a reference cache whose shards were rebuilt in another order (the EMA is
re-placed by sample key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from regate_plugin.training import STATE_FILE

from .trainer_helpers import cache_for, make_trainer, samples

SCHEDULE = {"regate_warmup_steps": 2, "regate_cycle_steps": 4, "regate_dense_steps": 1}


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def _regate(cache: Path) -> dict[str, Any]:
    return {"token_elision": "regate", "regate_ref_cache": str(cache), **SCHEDULE}


def _kill_in_second_save(trainer: Any, where: str) -> None:
    """Make the Trainer's second checkpoint save die: inside its model save once the checkpoint directory exists
    (`model`), or after the Trainer saved everything and rotated the older checkpoint away, before its `on_save`
    callbacks (`rotated`)."""
    saves = []
    if where == "model":
        save_model = trainer.save_model

        def dying_save_model(output_dir: str | None = None, _internal_call: bool = False) -> None:
            saves.append(output_dir)
            if len(saves) == 2:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / "model.safetensors").write_bytes(b"torn")
                raise Killed
            save_model(output_dir, _internal_call=_internal_call)

        trainer.save_model = dying_save_model
    else:
        save_checkpoint = trainer._save_checkpoint

        def dying_save_checkpoint(*args: Any, **kwargs: Any) -> None:
            save_checkpoint(*args, **kwargs)
            saves.append(trainer.state.global_step)
            if len(saves) == 2:
                raise Killed

        trainer._save_checkpoint = dying_save_checkpoint


@pytest.mark.parametrize("where", ["model", "rotated"])
def test_a_kill_during_a_checkpoint_save_leaves_a_checkpoint_with_its_state(tmp_path, where):
    rows = samples(8)
    flags = _regate(cache_for(tmp_path / "cache", rows))
    training = dict(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer = make_trainer(tmp_path / "a", rows, flags, **training)
    _kill_in_second_save(trainer, where)
    with pytest.raises(Killed):
        trainer.train()
    # The run's EMA when the kill came (steps 0-3): what the surviving checkpoint must hold.
    live = trainer.token_elision.state_dict()
    out = tmp_path / "a/out"
    left = sorted(p.name for p in out.glob("checkpoint-*"))
    step = 2 if where == "model" else 4  # the killed model save leaves checkpoint-2 whole; the rotation removed it
    assert f"checkpoint-{step}" in left, left
    checkpoint = out / f"checkpoint-{step}"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["step"] == step
    if where == "rotated":
        assert left == ["checkpoint-4"]
        for table in ("values", "per_token"):
            torch.testing.assert_close(state["ema"][table], live["ema"][table], equal_nan=True)
    assert not [p for p in out.rglob("*") if p.name.startswith(f".{STATE_FILE}")]  # no temporary left behind

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    resumed = make_trainer(tmp_path / "b", rows, flags, model=model, **training)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6 and resumed.token_elision.step == 6
    assert resumed.token_elision.ema.observed() > 0
