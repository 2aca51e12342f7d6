"""Token elision inside the real HF Trainer: schedule, logs, checkpoints and resume, gradient accumulation,
gradient checkpointing, peft LoRA, DeepSpeed ZeRO-2/3 (single process, CPU, gloo) and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import regate_plugin as rg
from regate_plugin.adapters import UnsupportedModelError
from regate_plugin.core import ConfigError
from regate_plugin.store import TokenizerMismatchError
from regate_plugin.training import STATE_FILE

from .ranks import free_port
from .tiny import tiny_llava
from .trainer_helpers import cache_for, collate, logged, make_trainer, samples

SCHEDULE = {"regate_warmup_steps": 2, "regate_cycle_steps": 4, "regate_dense_steps": 1}
SPARSE = {"regate_warmup_steps": 0, "regate_dense_steps": 0}


def _regate(tmp_path, rows, **flags):
    return {"token_elision": "regate", "regate_ref_cache": str(cache_for(tmp_path / "cache", rows)), **flags}


def _dense_by_rule(step: int) -> bool:
    """The dual-cycle rule (docs/METHOD.md): W dense warm-up steps, then cycles of C whose first F are dense."""
    return step < 2 or (step - 2) % 4 < 1


def test_logged_kept_fraction_follows_the_schedule(tmp_path):
    rows = samples(8)
    trainer = make_trainer(tmp_path, rows, _regate(tmp_path, rows, **SCHEDULE), max_steps=8)
    trainer.train()
    steps = [e for e in trainer.state.log_history if "regate/kept_fraction" in e]
    assert [e["step"] for e in steps] == list(range(1, 9))
    for entry in steps:
        step = entry["step"] - 1  # the optimizer step that was computed before `global_step` advanced
        candidates, kept = entry["regate/candidates"], entry["regate/kept"]
        assert candidates > 0
        if _dense_by_rule(step):
            assert kept == candidates and entry["regate/kept_fraction"] == 1.0, entry
        else:  # k = ceil(p * n) per row, two rows per batch
            assert candidates / 2 <= kept < candidates / 2 + 2, entry
    processed = logged(trainer, "regate/answer_tokens_processed")
    assert processed[1] == 1.0 and 0.5 < processed[-1] < 1.0
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_checkpoint_holds_the_state_and_resume_continues_schedule_and_ema(tmp_path):
    rows = samples(8)
    flags = _regate(tmp_path, rows, **SCHEDULE)
    straight = make_trainer(tmp_path / "a", rows, flags, max_steps=6, save_strategy="steps", save_steps=3)
    straight.train()
    saved = torch.load(tmp_path / "a/out/checkpoint-3" / STATE_FILE, weights_only=True)
    assert saved["step"] == 3 and (~torch.isnan(saved["ema"]["values"])).sum() > 0

    # A freshly initialised model: the Trainer's reload must bring the checkpoint's weights (on transformers 5 the
    # integration renames the legacy keys LLaVA is saved under, as `from_pretrained` does).
    model = tiny_llava(seed=1)
    resumed = make_trainer(tmp_path / "b", rows, flags, model=model, max_steps=6, save_strategy="steps", save_steps=3)
    assert resumed.token_elision.step == 0 and resumed.token_elision.ema.observed() == 0
    resumed.train(resume_from_checkpoint=str(tmp_path / "a/out/checkpoint-3"))

    final_straight = straight.token_elision.state_dict()
    final_resumed = resumed.token_elision.state_dict()
    assert final_resumed["step"] == final_straight["step"] == 6
    assert final_resumed["stats"] == final_straight["stats"]
    for table in ("values", "per_token"):
        torch.testing.assert_close(final_resumed["ema"][table], final_straight["ema"][table], equal_nan=True)

    def after_resume(trainer, key):  # the resumed log history starts with the restored entries of steps 1-3
        return [e[key] for e in trainer.state.log_history if e.get("step", 0) > 3 and "loss" in e]

    assert len(after_resume(resumed, "loss")) == 3
    assert after_resume(resumed, "loss") == pytest.approx(after_resume(straight, "loss"), rel=1e-5)
    assert after_resume(resumed, "regate/kept") == after_resume(straight, "regate/kept")


def _one_sparse_step(tmp_path, rows, elision=None, **training):
    trainer = make_trainer(
        tmp_path, rows, _regate(tmp_path, rows, **SPARSE, **(elision or {})), max_steps=1, **training
    )
    trainer.train()
    return trainer


# keep_budget='reference' keeps another count per row than the keep ratio (every reference loss above 3 nats with its
# input, at least 0.2 of the candidates), so the Trainer's count of the loss terms must come from the budget too
BUDGET = {
    "regate_keep_budget": "reference",
    "regate_keep_budget_threshold": 3.0,
    "regate_elision_unit": "with_input",
    "regate_keep_ratio": 0.2,
}


@pytest.mark.parametrize(
    "elision",
    [{}, BUDGET, {"regate_loss_normalization": "all"}],
    ids=["ratio", "reference_budget", "loss_over_all_targets"],
)
def test_gradient_accumulation_gives_the_full_batch_step_and_the_mean_over_kept_targets(tmp_path, elision):
    rows = samples(2)
    full = _one_sparse_step(tmp_path / "full", rows, elision, per_device_train_batch_size=2)
    accumulated = _one_sparse_step(
        tmp_path / "ga", rows, elision, per_device_train_batch_size=1, gradient_accumulation_steps=2
    )
    for (name, a), (_, b) in zip(full.model.named_parameters(), accumulated.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

    # Independent reference for the loss value: the elided forward on the same batch, without the Trainer, whose
    # loss is the plain mean over the kept targets (num_items_in_batch=None), or their sum over every target under
    # loss_normalization='all'.
    model = tiny_llava()
    model.train()
    settings = {name.removeprefix("regate_"): value for name, value in elision.items()}
    cfg = rg.ReGATEConfig(**{"keep_ratio": 0.5, "warmup_steps": 0, "dense_steps": 0, **settings})
    rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=tmp_path / "full/cache"))
    out = model(**collate(rows))
    assert out.token_elision["kept"] < out.token_elision["candidates"]
    if elision is BUDGET:  # the budget, not the ratio, decided the count
        assert out.token_elision["kept"] > 0.2 * out.token_elision["candidates"] + 2
        assert logged(full, "regate/kept")[0] == out.token_elision["kept"]
    assert logged(full, "loss")[0] == pytest.approx(out.loss.item(), rel=1e-4)
    assert logged(accumulated, "loss")[0] == pytest.approx(out.loss.item(), rel=1e-4)


def test_gradient_checkpointing_trains_the_same_parameters(tmp_path):
    rows = samples(4)
    plain = make_trainer(tmp_path / "a", rows, _regate(tmp_path / "a", rows, **SPARSE), max_steps=2)
    plain.train()
    checkpointed = make_trainer(
        tmp_path / "b", rows, _regate(tmp_path / "b", rows, **SPARSE), max_steps=2, gradient_checkpointing=True
    )
    checkpointed.train()
    assert checkpointed.model.model.language_model.gradient_checkpointing
    for (name, a), (_, b) in zip(plain.model.named_parameters(), checkpointed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_peft_lora_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    rows = samples(4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    reference = get_peft_model(tiny_llava(), lora)
    reference.train()
    batch = collate(rows)
    expected = reference(**batch).loss

    model = copy.deepcopy(reference)
    cfg = rg.ReGATEConfig(keep_ratio=1.0, warmup_steps=0, dense_steps=0)
    rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=cache_for(tmp_path / "c1", rows)))
    torch.testing.assert_close(model(**batch).loss, expected, atol=1e-5, rtol=0)
    rg.disable_token_elision(model)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, rows, _regate(tmp_path, rows, **SPARSE), model=model, max_steps=2)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert logged(trainer, "regate/kept")[-1] < logged(trainer, "regate/candidates")[-1]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_plain_training(tmp_path, monkeypatch, stage):
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    for name, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "ACCELERATE_USE_DEEPSPEED": "false",
    }.items():
        monkeypatch.setenv(name, value)  # restored afterwards, also what accelerate sets during the run
    rows = samples(4)
    flags = _regate(tmp_path, rows, **SPARSE)
    zero = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    plain = make_trainer(tmp_path / "plain", rows, flags, max_steps=3, optim="adamw_torch", learning_rate=1e-3)
    plain.train()
    sharded = make_trainer(
        tmp_path / "zero", rows, flags, max_steps=3, optim="adamw_torch", learning_rate=1e-3, deepspeed=zero
    )
    try:
        sharded.train()
    finally:
        unset_hf_deepspeed_config()  # ZeRO-3 would otherwise partition every model later tests build
    assert sharded.is_deepspeed_enabled
    assert logged(sharded, "loss") == pytest.approx(logged(plain, "loss"), rel=1e-4)
    assert logged(sharded, "regate/kept") == logged(plain, "regate/kept")
    assert logged(sharded, "regate/kept")[0] < logged(sharded, "regate/candidates")[0]


def test_bad_input_fails_before_the_first_step(tmp_path):
    from transformers import AutoTokenizer

    from .tokenizers_fixture import write_bpe_chat_tokenizer

    rows = samples(2)
    with pytest.raises(ConfigError, match="--regate_ref_cache"):
        make_trainer(tmp_path, rows, {"token_elision": "regate"})
    with pytest.raises(ConfigError, match="--regate_keep_ratio"):
        make_trainer(tmp_path, rows, _regate(tmp_path, rows, regate_keep_ratio=0.0))
    with pytest.raises(ConfigError, match="--token_elision 'fast'"):
        make_trainer(tmp_path, rows, {"token_elision": "fast"})

    tokenizer = AutoTokenizer.from_pretrained(write_bpe_chat_tokenizer(tmp_path / "tok", "chatml"))
    with pytest.raises(TokenizerMismatchError):
        make_trainer(tmp_path, rows, _regate(tmp_path, rows), processing_class=tokenizer)

    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        make_trainer(tmp_path, rows, {"token_elision": "random"}, model=text_only)
