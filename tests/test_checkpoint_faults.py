"""Checkpoints under faults, through the real HF Trainer: a kill while a checkpoint is saved under
`save_total_limit=1` (the state file is written atomically before the Trainer saves the model and rotates older
checkpoints away), a resume into a reference cache whose shards were rebuilt in another order (the EMA is
re-placed by sample key), and an HF-native resume on transformers 5 (the checkpoint's keys renamed as
`from_pretrained` renames them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlavaForConditionalGeneration, TrainerCallback

from regate_plugin.store import ReferenceLossCache, ReferenceLossCacheWriter
from regate_plugin.training import STATE_FILE, ResumeStateError

from .tiny import tiny_llava
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


def _rebuilt(source: Path, directory: Path, drop: int = 0) -> Path:
    """`source`'s samples and losses written again in reverse order, three samples a shard (another layout of the
    same token space, as a repaired cache has), without the last `drop` samples of that order."""
    cache = ReferenceLossCache(source)
    keys = list(cache.keys())[::-1][: len(cache) - drop]
    manifest = cache.manifest
    with ReferenceLossCacheWriter(
        directory,
        reference=manifest.reference,
        tokenizer_fingerprint=manifest.tokenizer_fingerprint,
        reference_mode=manifest.reference_mode,
        dtype=manifest.dtype,
        shard_samples=3,
    ) as writer:
        for key in keys:
            writer.add(key, cache[key])
    return directory


def _per_key(values: torch.Tensor, keys: list[bytes], starts: Any, lengths: Any) -> dict[bytes, torch.Tensor]:
    return {key: values[int(s) : int(s) + int(n)] for key, s, n in zip(keys, starts, lengths)}


class _RestoredEMA(TrainerCallback):
    """The EMA tables as the resumed run starts its first step."""

    def __init__(self, elision: Any) -> None:
        self.elision = elision

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.values = self.elision.ema.values[:-1].clone()
        self.per_token = self.elision.ema.per_token[:-1].clone()


def test_a_resume_into_a_rebuilt_cache_re_places_the_ema_by_sample_key(tmp_path):
    rows = samples(8)
    cache = cache_for(tmp_path / "cache", rows)
    first = make_trainer(tmp_path / "a", rows, _regate(cache), max_steps=3, save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "a/out/checkpoint-3"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    layout = saved["reference_samples"]
    keys = [bytes(k) for k in layout["keys"].numpy()]
    want = _per_key(saved["ema"]["values"], keys, layout["starts"], layout["lengths"])
    assert sum(int((~torch.isnan(v)).sum()) for v in want.values()) > 0

    rebuilt = _rebuilt(cache, tmp_path / "rebuilt")
    other = ReferenceLossCache(rebuilt)
    assert other.layout_digest != ReferenceLossCache(cache).layout_digest and len(other.manifest.shards) == 3
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    resumed = make_trainer(tmp_path / "b", rows, _regate(rebuilt), model=model, max_steps=4)
    restored = _RestoredEMA(resumed.token_elision)
    resumed.add_callback(restored)  # after the token elision callback, which restores the state
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    starts, lengths = other.spans(other.locate(keys))
    got = _per_key(restored.values, keys, starts, lengths)
    for key in keys:
        torch.testing.assert_close(got[key], want[key], equal_nan=True)
    torch.testing.assert_close(restored.per_token, saved["ema"]["per_token"], equal_nan=True)

    short = _rebuilt(cache, tmp_path / "short", drop=1)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    flags = {**_regate(short), "regate_missing_reference": "ema"}  # the pre-flight check only warns of one miss
    refused = make_trainer(tmp_path / "c", rows, flags, model=model, max_steps=4)
    with (
        pytest.warns(UserWarning, match="1 of the first 8"),
        pytest.raises(ResumeStateError, match="1 of its 8 samples are missing .*--regate_resume_without_state fresh"),
    ):
        refused.train(resume_from_checkpoint=str(checkpoint))


class _WeightsAtStart(TrainerCallback):
    """The model's weights as the resumed run starts its first step (after the Trainer reloaded them)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.state = {name: value.detach().clone() for name, value in self.model.state_dict().items()}


def test_an_hf_native_resume_loads_the_checkpoint_s_weights_into_a_fresh_model(tmp_path):
    rows = samples(4)
    flags = _regate(cache_for(tmp_path / "cache", rows))
    make_trainer(tmp_path / "a", rows, flags, max_steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "a/out/checkpoint-2"
    want = LlavaForConditionalGeneration.from_pretrained(checkpoint).state_dict()  # transformers' own loading
    fresh = tiny_llava(seed=1)
    initial = {name: value.detach().clone() for name, value in fresh.state_dict().items()}
    assert initial.keys() == want.keys() and not torch.equal(initial["lm_head.weight"], want["lm_head.weight"])
    resumed = make_trainer(tmp_path / "b", rows, flags, model=fresh, max_steps=3)
    weights = _WeightsAtStart(fresh)
    resumed.add_callback(weights)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in want.items():
        torch.testing.assert_close(weights.state[name], value, rtol=0, atol=0, msg=name)
