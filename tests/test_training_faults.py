"""The training side of the fault and bad-input matrix (docs/RELIABILITY.md): non-finite losses and the EMA, the
logged fault counts, the startup summary, the pre-flight cache check (HF Trainer and the upstream launchers), an
unused cache, resuming without a usable state, and batches with all-padding rows, empty answers and over-long
samples. Elsewhere: the pre-flight check through the upstream launchers
(tests/test_launch_llava.py, tests/test_launch_videollama2.py: `..._refuses_a_cache_for_another_run_before_step_0`), a
killed rank (tests/test_distributed.py::test_a_killed_rank_ends_the_job_with_an_error), a cache for another tokenizer
(tests/test_trainer.py::test_bad_input_fails_before_the_first_step)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import torch
import transformers
from transformers import LlavaForConditionalGeneration, TrainingArguments

import regate_plugin as rg
from regate_plugin.core import IGNORE_INDEX, DifficultyEMA, batch_sample_keys, first_sparse_step, is_dense_step
from regate_plugin.store import Provenance
from regate_plugin.training import STATE_FILE, CacheMismatchError, ResumeStateError
from regate_plugin.training.preflight import startup_summary

from .tiny import IMAGE_ROWS, IMAGE_TOKEN, PAD, tiny_llava, write_cache_for
from .trainer_helpers import LossFault, cache_for, collate, logged, make_trainer, samples

SCHEDULE = {"regate_warmup_steps": 2, "regate_cycle_steps": 4, "regate_dense_steps": 1}
SPARSE = {"regate_warmup_steps": 0, "regate_dense_steps": 0}
INF, NAN = float("inf"), float("nan")


def _regate(cache: Path, **flags: Any) -> dict[str, Any]:
    return {"token_elision": "regate", "regate_ref_cache": str(cache), **flags}


# --- non-finite losses and the EMA -----------------------------------------------------------------------------


def _sequential_ema(values, per_token, beta, slots, token_ids, losses):
    """The EMA's definition, one observation at a time, skipping non-finite losses (the independent reference)."""
    values, per_token = values.double().clone(), per_token.double().clone()
    for slot, token, loss in zip(slots.tolist(), token_ids.tolist(), losses.tolist()):
        if not math.isfinite(loss):
            continue
        for table, index in ((values, slot), (per_token, token)):
            if 0 <= index < table.numel():
                old = float(table[index])
                table[index] = loss if math.isnan(old) else beta * old + (1 - beta) * loss
    return values.float(), per_token.float()


def test_non_finite_losses_neither_poison_nor_reset_an_entry():
    ema = DifficultyEMA(beta=0.8, slots=6, vocab_size=5)
    ema.update(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]))
    values, per_token = ema.values[:-1].clone(), ema.per_token[:-1].clone()
    slots = torch.tensor([0, 0, 1, 3, 4, 2, -1, 5])
    token_ids = torch.tensor([1, 1, 2, 4, 4, 3, 1, 0])
    losses = torch.tensor([INF, 0.5, NAN, INF, 2.0, 1.5, NAN, -INF])
    ema.update(slots, token_ids, losses)
    want_values, want_per_token = _sequential_ema(values, per_token, 0.8, slots, token_ids, losses)
    torch.testing.assert_close(ema.values[:-1], want_values, equal_nan=True)
    torch.testing.assert_close(ema.per_token[:-1], want_per_token, equal_nan=True)
    assert not torch.isinf(ema.values).any() and not torch.isinf(ema.per_token).any()
    assert float(ema.values[1]) == 2.0  # a NaN did not reset its history
    assert float(ema.values[4]) == 2.0 and math.isnan(float(ema.values[3]))  # +inf did not initialise an entry
    assert math.isnan(float(ema.per_token[0]))  # nor the per-token fallback unseen samples inherit


def test_a_non_finite_loss_is_counted_and_leaves_its_ema_entry_as_it_was(tmp_path):
    rows = samples(2)
    batch = collate(rows)
    cache = cache_for(tmp_path / "cache", rows)
    cfg = rg.ReGATEConfig(warmup_steps=10)  # dense: every candidate's loss is observed

    def strategy_and_model():
        model = tiny_llava()
        model.train()
        elision = rg.build_token_elision("regate", cfg, reference=cache)
        rg.enable_token_elision(model, elision)
        return elision, model

    faulted, model = strategy_and_model()
    twin, twin_model = strategy_and_model()  # the same two steps without the fault
    fault = LossFault(model.get_output_embeddings())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, twin_model)]
    for step in range(2):
        fault.armed = step == 1
        for m, optimizer in zip((model, twin_model), optimizers):
            out = m(**batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 0 and m is model:
                after_first = faulted.ema.values.clone()
            if step == 1 and m is model:
                faulted_loss = out.loss.item()
    assert math.isinf(faulted_loss)
    assert faulted.stats.nonfinite == 1 and twin.stats.nonfinite == 0
    # The faulted target is row 0's second answer target (ordinal 1, a candidate): its slot keeps its step-0 value,
    # every other slot holds what the twin holds.
    key = batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])[0]
    (start,), _ = faulted.reference.spans(faulted.reference.locate([key]))
    slot = int(start) + 1
    assert float(faulted.ema.values[slot]) == float(after_first[slot]) != float(twin.ema.values[slot])
    others = torch.ones_like(faulted.ema.values, dtype=torch.bool)
    others[slot] = False
    torch.testing.assert_close(faulted.ema.values[others], twin.ema.values[others], equal_nan=True)
    assert not torch.isinf(faulted.ema.per_token).any()


def test_the_trainer_logs_non_finite_losses_and_missing_references_as_counts(tmp_path):
    rows = samples(8)
    cache = cache_for(tmp_path / "cache", rows[:6])  # two samples are not in the cache
    trainer = make_trainer(tmp_path, rows, _regate(cache, regate_missing_reference="ema", **SPARSE), max_steps=4)
    trainer.add_callback(LossFault(trainer.model.get_output_embeddings()).at_step(2))
    with pytest.warns(UserWarning, match="scored by the student EMA alone"):  # the pre-flight check says so first
        trainer.train()  # 4 steps of 2: every sample once
    assert logged(trainer, "regate/nonfinite") == [0, 0, 1, 0]
    assert sum(logged(trainer, "regate/missing_reference")) == 2
    assert trainer.token_elision.stats.nonfinite == 1 and trainer.token_elision.stats.missing_reference == 2
    ema = trainer.token_elision.ema
    assert not torch.isinf(ema.values).any() and not torch.isinf(ema.per_token).any()


# --- the startup summary ---------------------------------------------------------------------------------------


def test_the_first_sparse_step_is_the_schedule_rule_s():
    for warmup in (0, 1, 5):
        for cycle in (1, 3, 7):
            for dense in range(cycle + 1):
                cfg = rg.ReGATEConfig(warmup_steps=warmup, cycle_steps=cycle, dense_steps=dense)
                for start in range(20):
                    window = range(start, start + warmup + cycle + 1)
                    want = next((s for s in window if not is_dense_step(s, cfg)), None)
                    assert first_sparse_step(start, cfg) == want, (cfg, start)


def test_rank_0_prints_the_startup_summary_once_before_step_0(tmp_path, capsys):
    rows = samples(4)
    schedule = {"regate_warmup_steps": 3, "regate_cycle_steps": 4, "regate_dense_steps": 2}
    trainer = make_trainer(tmp_path, rows, _regate(cache_for(tmp_path / "cache", rows), **schedule), max_steps=6)
    trainer.train()
    printed = capsys.readouterr().out
    summary = printed[: printed.index("{'loss'")]  # before the first step's log line
    assert summary.count("token elision 'regate', starting at optimizer step 0") == 1
    assert printed.count("token elision 'regate'") == 1
    assert f"{tmp_path / 'cache'}: 4 samples" in summary and "reference LLM 'test'" in summary
    assert "keep               0.5 of the elidable answer tokens" in summary
    assert "3 dense warm-up steps, then cycles of 4: 2 dense, 2 sparse" in summary
    assert "first sparse step  optimizer step 5 (logged as step 6)" in summary
    first_sparse = next(e["step"] for e in trainer.state.log_history if e.get("regate/dense") == 0.0)
    assert first_sparse == 6
    defaults = rg.build_token_elision("regate", reference=tmp_path / "cache")
    assert "first sparse step  116, after this run's last step (49)" in startup_summary(defaults, 0, 50)
    assert "every step dense" in startup_summary(rg.build_token_elision("none"), 0, 50)


def test_the_trainer_ends_on_the_dense_tail_it_counts_from_max_steps(tmp_path, capsys):
    rows = samples(4)
    schedule = {"regate_warmup_steps": 1, "regate_cycle_steps": 3, "regate_dense_steps": 1, "regate_dense_tail": 0.25}
    trainer = make_trainer(tmp_path, rows, _regate(cache_for(tmp_path / "cache", rows), **schedule), max_steps=8)
    trainer.train()
    assert "; from step 6 dense to the run's end (8 steps)" in capsys.readouterr().out
    # the walk: 1 warm-up step, then cycles [dense, sparse, sparse]; the last 2 of the 8 steps dense
    assert logged(trainer, "regate/dense") == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]


# --- the pre-flight check --------------------------------------------------------------------------------------


@dataclass
class _UpstreamStyleArguments(TrainingArguments):
    """As LLaVA's and VideoLLaMA2's `TrainingArguments`: the length their collators truncate samples at."""

    model_max_length: int = field(default=512)


def _cut(rows: list[dict[str, torch.Tensor]], max_length: int) -> list[dict[str, torch.Tensor]]:
    return [{**r, "input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]} for r in rows]


def _truncating(max_length: int):
    """A collator that truncates at `max_length` (the image stays: it sits in the first instruction)."""
    return lambda rows: collate(_cut(rows, max_length))


def _reexpanded(rows: list[dict[str, torch.Tensor]], copies: int, token: int) -> list[dict[str, torch.Tensor]]:
    """The rows with each run of IMAGE_ROWS image tokens replaced by `copies` copies of `token`: how `regate
    precompute` keys them with another --visual-tokens, or (token -200, one copy) without --image-token-id."""
    out = []
    for r in rows:
        ids, labels, i = [], [], 0
        source = r["input_ids"].tolist()
        while i < len(source):
            if source[i] == IMAGE_TOKEN:
                ids += [token] * copies
                labels += [IGNORE_INDEX] * copies
                i += IMAGE_ROWS
            else:
                ids.append(source[i])
                labels.append(int(r["labels"][i]))
                i += 1
        out.append({**r, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return out


def _precomputed(directory: Path, rows: list[dict[str, torch.Tensor]], visual_tokens: int = IMAGE_ROWS, **extra):
    """A cache of `rows` whose manifest records settings as `regate precompute` does."""
    settings = {"template": "v1", "max_length": None, "data": ["train.json"], "image_token_id": IMAGE_TOKEN, **extra}
    return write_cache_for(
        directory, [collate([r]) for r in rows], visual_tokens=visual_tokens, provenance=Provenance.from_dict(settings)
    )


def _fails_before_step_0(trainer: Any, match: str) -> str:
    with pytest.raises(CacheMismatchError, match=match) as raised:
        trainer.train()
    assert trainer.state.global_step == 0 and not trainer.state.log_history
    return str(raised.value)


def test_a_cache_made_with_another_max_length_fails_before_step_0_naming_both(tmp_path):
    rows = samples(4)
    cache = _precomputed(tmp_path / "cache", _cut(rows, 24), max_length=24)
    trainer = make_trainer(
        tmp_path, rows, _regate(cache), collator=_truncating(16), args_cls=_UpstreamStyleArguments, model_max_length=16
    )
    _fails_before_step_0(trainer, "made with --max-length 24, this run truncates its samples at 16 tokens")
    untruncated = _precomputed(tmp_path / "untruncated", rows, max_length=None)
    trainer = make_trainer(
        tmp_path,
        rows,
        _regate(untruncated),
        collator=_truncating(16),
        args_cls=_UpstreamStyleArguments,
        model_max_length=16,
    )
    _fails_before_step_0(trainer, r"made with no --max-length \(no truncation\).*--max-length 16")


def test_a_cache_made_without_image_token_id_fails_naming_it(tmp_path):
    rows = samples(4)
    cache = _precomputed(tmp_path / "cache", _reexpanded(rows, 1, -200), image_token_id=None)
    message = _fails_before_step_0(
        make_trainer(tmp_path, rows, _regate(cache)), f"made without --image-token-id: .*--image-token-id {IMAGE_TOKEN}"
    )
    assert "4 of the first 4 training samples" in message and "first: training sample 0, key " in message


def test_a_cache_scored_with_other_visual_rows_fails_naming_them(tmp_path):
    rows = samples(4)
    cache = _precomputed(tmp_path / "cache", _reexpanded(rows, 3, IMAGE_TOKEN), visual_tokens=3)
    _fails_before_step_0(
        make_trainer(tmp_path, rows, _regate(cache)), r"into 3 visual rows \(--visual-tokens\).*runs of \[4\]"
    )


def test_a_cache_made_with_another_template_fails_naming_both(tmp_path):
    rows = samples(4)
    cache = _precomputed(tmp_path / "cache", rows)  # template v1
    other = make_trainer(tmp_path, rows, _regate(cache), template=lambda trainer: "plain")
    _fails_before_step_0(other, "made with --template v1, this run preprocesses its samples as plain")
    alias = make_trainer(tmp_path, rows, _regate(cache), template=lambda trainer: "vicuna_v1", max_steps=1)
    alias.train()  # another name of the same template
    assert alias.state.global_step == 1


@pytest.mark.parametrize("policy", ["error", "ema"])
def test_a_cache_of_other_data_fails_before_step_0_under_either_policy(tmp_path, policy):
    rows = samples(4)
    cache = _precomputed(tmp_path / "cache", samples(4, seed=1))
    trainer = make_trainer(tmp_path, rows, _regate(cache, regate_missing_reference=policy))
    _fails_before_step_0(trainer, "4 of the first 4 training samples .* built from other data")


def test_a_cache_tokenized_under_other_library_versions_names_them(tmp_path):
    made = Provenance()  # as `regate precompute` records it: the installed versions
    assert made.versions == {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    rows = samples(4)
    other = {"transformers": "4.37.2", "tokenizers": "0.15.1"}
    cache = _precomputed(tmp_path / "other", samples(4, seed=1), versions=other)  # its token ids differ
    message = _fails_before_step_0(
        make_trainer(tmp_path, rows, _regate(cache)),
        "4 of the first 4 .* Likely cause: the cache was tokenized with tokenizers 0.15.1, transformers 4.37.2, this "
        f"run has tokenizers {tokenizers.__version__}, transformers {transformers.__version__}",
    )
    assert "re-run `regate precompute` in this run's environment" in message
    same = _precomputed(tmp_path / "same", samples(4, seed=1), versions=made.versions)
    message = _fails_before_step_0(make_trainer(tmp_path, rows, _regate(same)), "built from other data")
    assert "tokenized with tokenizers" not in message.split("The cache records")[0]


def test_a_cache_given_to_a_strategy_that_reads_none_warns(tmp_path):
    rows = samples(2)
    cache = cache_for(tmp_path / "cache", rows)
    for name in ("none", "random"):
        with pytest.warns(UserWarning, match=f"--regate_ref_cache {cache} is unused: --token_elision {name}"):
            make_trainer(tmp_path, rows, {"token_elision": name, "regate_ref_cache": str(cache)})


# --- resuming --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Any]:
    """Six steps with a checkpoint at step 3: what a resumed run starts from, and what it must end with."""
    root = tmp_path_factory.mktemp("saved")
    rows = samples(8)
    flags = _regate(cache_for(root / "cache", rows), **SCHEDULE)
    straight = make_trainer(root / "a", rows, flags, max_steps=6, save_strategy="steps", save_steps=3)
    straight.train()
    return {"rows": rows, "flags": flags, "checkpoint": root / "a/out/checkpoint-3", "final": straight}


def _resume(tmp_path: Path, saved: dict[str, Any], flags: dict[str, Any], checkpoint: Path | None = None) -> Any:
    """Resume the saved run from `checkpoint` (default: its own checkpoint-3) to step 6 with `flags`."""
    model = LlavaForConditionalGeneration.from_pretrained(saved["checkpoint"])  # see test_trainer.py on why
    trainer = make_trainer(
        tmp_path, saved["rows"], flags, model=model, max_steps=6, save_strategy="steps", save_steps=3
    )
    trainer.train(resume_from_checkpoint=str(checkpoint or saved["checkpoint"]))
    return trainer


def _without_state(tmp_path: Path, saved: dict[str, Any]) -> Path:
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(saved["checkpoint"], checkpoint)
    (checkpoint / STATE_FILE).unlink()
    return checkpoint


def test_a_checkpoint_without_regate_state_is_an_error_that_names_the_option(tmp_path, saved):
    checkpoint = _without_state(tmp_path, saved)
    with pytest.raises(ResumeStateError, match="holds no regate_state.pt.*--regate_resume_without_state fresh"):
        _resume(tmp_path, saved, saved["flags"], checkpoint)
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # no step ran, nothing was saved


def test_resume_without_state_fresh_continues_the_schedule_with_an_empty_ema(tmp_path, saved):
    flags = {**saved["flags"], "regate_resume_without_state": "fresh"}
    checkpoint = _without_state(tmp_path, saved)
    with pytest.warns(UserWarning, match="holds no regate_state.pt.*fresh state"):
        trainer = _resume(tmp_path, saved, flags, checkpoint)
    elision = trainer.token_elision
    assert elision.step == 6 and elision.stats.batches == 3  # steps 3, 4, 5 only: the counts restarted
    assert 0 < elision.ema.observed() < saved["final"].token_elision.ema.observed()


def test_a_truncated_state_file_is_named_and_fresh_gets_past_it(tmp_path, saved):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(saved["checkpoint"], checkpoint)
    state = checkpoint / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a write cut short
    with pytest.raises(ResumeStateError, match=f"{state} cannot be read .*--regate_resume_without_state fresh"):
        _resume(tmp_path / "a", saved, saved["flags"], checkpoint)
    flags = {**saved["flags"], "regate_resume_without_state": "fresh"}
    with pytest.warns(UserWarning, match=f"{state} cannot be read .*fresh state"):
        trainer = _resume(tmp_path / "b", saved, flags, checkpoint)
    assert trainer.token_elision.step == 6 and trainer.token_elision.stats.batches == 3


def test_a_state_saved_with_other_settings_is_refused_naming_them(tmp_path, saved):
    changed = {**saved["flags"], "regate_keep_ratio": 0.25, "regate_ema_beta": 0.8}
    with pytest.raises(
        ResumeStateError,
        match=r"saved with --regate_keep_ratio 0.5 --regate_ema_beta 0.9, this run has --regate_keep_ratio 0.25 "
        r"--regate_ema_beta 0.8 \(keep_ratio, ema_beta differ\)",
    ):
        _resume(tmp_path / "a", saved, changed)
    with pytest.warns(UserWarning, match="saved with --regate_keep_ratio 0.5"):
        fresh = _resume(tmp_path / "b", saved, {**changed, "regate_resume_without_state": "fresh"})
    assert fresh.token_elision.step == 6 and fresh.token_elision.ema.beta == 0.8


def test_settings_that_leave_the_state_valid_resume_to_the_uninterrupted_run(tmp_path, saved):
    trainer = _resume(tmp_path, saved, {**saved["flags"], "regate_loss_chunk_size": 3})
    got, want = trainer.token_elision.state_dict(), saved["final"].token_elision.state_dict()
    assert got["step"] == want["step"] and got["stats"] == want["stats"]
    for table in ("values", "per_token"):
        torch.testing.assert_close(got["ema"][table], want["ema"][table], equal_nan=True)


def test_a_strategy_that_learns_nothing_resumes_past_another_strategy_s_state_with_a_warning(tmp_path, saved):
    with pytest.warns(UserWarning, match="saved by token elision 'regate', this run uses 'none'"):
        trainer = _resume(tmp_path, saved, {"token_elision": "none"})
    assert trainer.state.global_step == 6


# --- batches: all-padding rows, empty answers, over-long samples -----------------------------------------------

MAX_LENGTH = 20  # the run's max length: most samples are longer and get cut


def _edge_rows() -> list[dict[str, torch.Tensor]]:
    """Four samples, plus one with no tokens (an all-padding row), one without answer tokens and one text-only
    sample; `_edge_collate` cuts every sample at MAX_LENGTH, so the longer ones are over-long."""
    rows = samples(4)
    no_answer = {**samples(1, seed=7)[0]}
    no_answer["labels"] = torch.full_like(no_answer["labels"], IGNORE_INDEX)
    text = samples(1, seed=8)[0]
    keep = text["input_ids"] != IMAGE_TOKEN
    text_only = {"input_ids": text["input_ids"][keep], "labels": text["labels"][keep]}
    empty = {"input_ids": torch.zeros(0, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)}
    return [rows[0], empty, rows[1], no_answer, rows[2], text_only, rows[3]]


def _edge_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Truncate at MAX_LENGTH, pad on the right; images only for the samples that have one."""
    rows = _cut(rows, MAX_LENGTH)
    length = max(r["input_ids"].numel() for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), PAD),
        "labels": torch.full((len(rows), length), IGNORE_INDEX),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
    }
    for b, r in enumerate(rows):
        n = r["input_ids"].numel()
        batch["input_ids"][b, :n], batch["labels"][b, :n], batch["attention_mask"][b, :n] = (
            r["input_ids"],
            r["labels"],
            1,
        )
    images = [r["pixel_values"] for r in rows if "pixel_values" in r]
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch


def _edge_cache(directory: Path, rows: list[dict[str, torch.Tensor]]) -> Path:
    """What `regate precompute --max-length MAX_LENGTH` holds: every sample with tokens, cut as training cuts it."""
    return write_cache_for(directory, [_edge_collate([r]) for r in rows if r["input_ids"].numel()])


def test_all_padding_rows_empty_answers_and_over_long_samples_give_the_model_s_own_loss(tmp_path):
    rows = _edge_rows()
    batch = _edge_collate(rows)
    assert int(batch["attention_mask"][1].sum()) == 0 and (batch["attention_mask"].sum(1) == MAX_LENGTH).sum() >= 3
    reference = tiny_llava()
    reference.train()
    expected = reference(**batch).loss  # the model's own dense forward
    model = tiny_llava()
    model.train()
    elision = rg.build_token_elision("regate", rg.ReGATEConfig(keep_ratio=1.0), reference=_edge_cache(tmp_path, rows))
    elision.set_step(200)  # a sparse step, keeping every candidate
    rg.enable_token_elision(model, elision)
    out = model(**batch)
    assert not out.token_elision["dense"]
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    out.loss.backward()

    # A batch with no answer token at all: a zero loss that still backpropagates (every rank runs one backward).
    nothing = _edge_collate([rows[1], rows[3]])
    before = elision.ema.values.clone()
    out = model(**nothing)
    assert out.loss.item() == 0.0 and out.token_elision["targets"] == 0
    out.loss.backward()
    torch.testing.assert_close(elision.ema.values, before, equal_nan=True)


def test_the_trainer_trains_such_batches_dense_and_sparse(tmp_path):
    rows = _edge_rows()
    reference = tiny_llava()
    reference.train()
    expected = reference(**_edge_collate(rows)).loss.item()
    trainer = make_trainer(
        tmp_path,
        rows,
        _regate(_edge_cache(tmp_path / "cache", rows), regate_warmup_steps=1, regate_dense_steps=0),
        collator=_edge_collate,
        args_cls=_UpstreamStyleArguments,
        model_max_length=MAX_LENGTH,
        per_device_train_batch_size=len(rows),  # one batch holds every sample: step 1's loss is the whole set's
        max_steps=4,
    )
    trainer.train()
    losses = logged(trainer, "loss")
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    assert all(math.isfinite(x) for x in losses)
    assert logged(trainer, "regate/dense") == [1.0, 0.0, 0.0, 0.0]
    assert all(
        kept < candidates
        for kept, candidates in zip(logged(trainer, "regate/kept")[1:], logged(trainer, "regate/candidates")[1:])
    )
    assert sum(logged(trainer, "regate/missing_reference")) == 0 and sum(logged(trainer, "regate/nonfinite")) == 0
