"""TRL's `SFTTrainer` (the real one, from the package index) with `--token_elision` on a tiny LLaVA.

TRL patches a fused LM head into the model and takes its loss, token accuracy and entropy from that head's per-token
outputs. The elided forward serves those fields over the kept targets: at keep 1.0 they equal TRL's own, a sparse run
trains and feeds the EMA, and the options elision cannot serve are refused before any step."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from regate_plugin import build_token_elision, enable_token_elision
from regate_plugin.core import ConfigError, ReGATEConfig
from regate_plugin.core.keys import tokenizer_fingerprint
from regate_plugin.data import HFVisionCollator, LlavaHFDataset
from regate_plugin.training import TokenElisionArguments, with_token_elision

from .llava_data import conversation_samples, write_json
from .test_readme_hf_path import ROWS, _images, _student
from .tiny import make_batch, tiny_llava, write_cache_for
from .tokenizers_fixture import write_sentencepiece_llama
from .trainer_helpers import collate, logged, samples

FIELDS = ("log_probs", "entropy", "is_top1")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = write_sentencepiece_llama(tmp_path_factory.mktemp("tok") / "tok")
    return AutoTokenizer.from_pretrained(directory)


def _run(tmp_path, tokenizer, elision, rows, **config):
    """A few SFTTrainer steps over `rows` (pre-tokenized, so TRL's preparation is skipped); its log history."""
    dataset = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows]).with_format("torch")
    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        learning_rate=1e-2,
        optim="sgd",
        seed=0,
        disable_tqdm=True,
    )
    args = SFTConfig(**{**options, **config})
    trainer_cls = SFTTrainer if elision is None else with_token_elision(SFTTrainer, TokenElisionArguments(**elision))
    model = tiny_llava(vocab_size=len(tokenizer))
    return trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collate, processing_class=tokenizer)


def _elision(tmp_path, tokenizer, rows, **flags):
    cache = write_cache_for(
        tmp_path / "cache", [collate([r]) for r in rows], fingerprint=tokenizer_fingerprint(tokenizer)
    )
    return {
        "token_elision": "regate",
        "regate_ref_cache": str(cache),
        "regate_warmup_steps": 0,
        "regate_dense_steps": 0,
        **flags,
    }


def test_keep_one_sft_trainer_logs_trls_own_loss_accuracy_and_entropy(tmp_path, tokenizer):
    rows = samples(6, seed=2)
    own = _run(tmp_path / "own", tokenizer, None, rows)
    own.train()
    elided = _run(tmp_path / "el", tokenizer, _elision(tmp_path, tokenizer, rows, regate_keep_ratio=1.0), rows)
    elided.train()
    assert logged(elided, "regate/kept") == logged(elided, "regate/candidates")
    # The first step's values agree to float32 rounding; later steps carry the rounding of differently shaped
    # reductions through the optimizer (2.8e-5 relative with two threads), far below what a dropped or
    # mis-normalised target would change.
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        first, *later = logged(elided, key)
        own_first, *own_later = logged(own, key)
        assert first == pytest.approx(own_first, rel=1e-5, abs=1e-6), key
        assert later == pytest.approx(own_later, rel=2e-4, abs=1e-6), key


def test_sparse_sft_trainer_on_the_recipes_dataset_trains_on_kept_targets_and_feeds_the_ema(tmp_path):
    """docs/TRAINING.md's recipe: LlavaHFDataset over a file and PIL images, as a `datasets.Dataset`."""
    student, tokenizer = _student(tmp_path)
    records = conversation_samples(8, seed=4)
    data = write_json(tmp_path / "train.json", records)
    processor = AutoProcessor.from_pretrained(tmp_path / "student")
    items = LlavaHFDataset(
        data, _images(tmp_path / "images", records), processor, "v1", student.config.image_token_id, ROWS
    )
    collator = HFVisionCollator(processor.tokenizer.pad_token_id)
    dataset = datasets.Dataset.from_list([{k: v.tolist() for k, v in item.items()} for item in items])
    cache = write_cache_for(
        tmp_path / "cache", [collator([item]) for item in items], fingerprint=tokenizer_fingerprint(processor.tokenizer)
    )
    elision = {
        "token_elision": "regate",
        "regate_ref_cache": str(cache),
        "regate_warmup_steps": 0,
        "regate_dense_steps": 0,
    }
    args = SFTConfig(
        str(tmp_path / "out"),
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        learning_rate=1e-2,
        optim="sgd",
        seed=0,
        disable_tqdm=True,
        loss_type="dft",
    )
    trainer = with_token_elision(SFTTrainer, TokenElisionArguments(**elision))(
        model=student,
        args=args,
        train_dataset=dataset.with_format("torch"),
        data_collator=collator,
        processing_class=processor,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    losses, kept, candidates = (
        logged(trainer, "loss"),
        logged(trainer, "regate/kept"),
        logged(trainer, "regate/candidates"),
    )
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(0 < k < c for k, c in zip(kept, candidates))
    assert 0 < trainer.token_elision.ema.observed() <= sum(candidates)
    assert all(0 <= a <= 1 for a in logged(trainer, "mean_token_accuracy")) and logged(trainer, "entropy")
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


def test_fused_head_fields_at_keep_one_equal_trls_head_with_their_gradients():
    """Forward level, with targets planted at the model's own argmax so token accuracy is not trivially zero."""
    batch = make_batch(batch=3, seed=5)
    model = tiny_llava()
    model.train()
    with torch.no_grad():
        predicted = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
    supervised = batch["labels"] != -100
    plant = supervised.clone()
    plant[:, 1:] &= torch.arange(plant.shape[1] - 1) % 2 == 0  # every other answer token is the model's own top-1
    plant[:, 0] = False
    batch["labels"][:, 1:] = torch.where(plant[:, 1:], predicted[:, :-1], batch["labels"][:, 1:])
    add_fused_lm_head(model, outputs=FIELDS)

    def fields() -> tuple[list[float], list[torch.Tensor]]:
        model.zero_grad()
        out = model(**batch, fused_lm_head=True)
        (-out.log_probs.sum()).backward()
        sums = [
            float(out.log_probs.detach().sum()),
            float(out.entropy.detach().sum()),
            int(out.is_top1.sum()),
            int(out.label_mask.sum()),
        ]
        return sums, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    own, own_grads = fields()
    enable_token_elision(model, build_token_elision("none", ReGATEConfig()))
    elided, elided_grads = fields()
    assert own[2] > 0 and own[2:] == elided[2:]
    assert elided[:2] == pytest.approx(own[:2], rel=1e-5)
    assert len(own_grads) == len(elided_grads)
    for mine, theirs in zip(elided_grads, own_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"packing": True, "packing_strategy": "wrapped", "max_length": 64}, "packing"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
        ({"completion_only_loss": True}, "completion_only_loss"),
    ],
)
def test_sft_options_elision_cannot_serve_are_refused_before_any_step(tmp_path, tokenizer, config, named):
    rows = samples(4, seed=1)
    with pytest.raises(ConfigError, match=rf"SFTTrainer with --token_elision: .*{named}"):
        _run(tmp_path, tokenizer, _elision(tmp_path, tokenizer, rows), rows, **config)
