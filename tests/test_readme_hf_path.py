"""The README's HF-native path, end to end: a reference LLM cut out of an HF LLaVA, `regate precompute --template v1
--image-token-id --visual-tokens --tokenizer`, then a dataset built with the plugin's template and expansion. Every
sample's key, computed as the adapter computes it, must be in the cache, and a sparse Trainer step must find them."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from regate_plugin.core import batch_sample_keys
from regate_plugin.data import expand_placeholders, get_template, iter_conversations
from regate_plugin.store import ReferenceLossCache

from .llava_data import conversation_samples, write_json
from .tiny import IMAGE_ROWS, tiny_llava
from .tokenizers_fixture import write_sentencepiece_llama
from .trainer_helpers import logged, make_trainer

ROWS = IMAGE_ROWS
MAX_LENGTH = 256


def _student(tmp_path):
    write_sentencepiece_llama(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    student = tiny_llava(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    return student, tokenizer


def test_readme_hf_native_recipe_keys_match_the_cache_and_train(tmp_path):
    student, student_tokenizer = _student(tmp_path)
    # README step 1: the reference LLM is the student's own LLM.
    reference = AutoModelForCausalLM.from_config(student.config.text_config)
    reference.model.load_state_dict(student.model.language_model.state_dict())
    reference.lm_head.load_state_dict(student.lm_head.state_dict())
    reference.save_pretrained(tmp_path / "reference")
    student_tokenizer.save_pretrained(tmp_path / "reference")
    # The same files load as another tokenizer class from a Llama directory than from a LLaVA one, and tokenize
    # differently: precompute must load the tokenizer from where training does (--tokenizer).
    data = write_json(tmp_path / "train.json", conversation_samples(12, seed=3))
    # README step 2: precompute, with --tokenizer where training loads its tokenizer from.
    command = [sys.executable, "-m", "regate_plugin.cli", "precompute", "--data", str(data), "--reference"]
    command += [str(tmp_path / "reference"), "--tokenizer", str(tmp_path / "student"), "--template", "v1"]
    command += ["--image-token-id", str(student.config.image_token_id), "--student-config", str(tmp_path / "student")]
    command += ["--max-length", str(MAX_LENGTH), "--out", str(tmp_path / "cache"), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)

    # README step 3: the dataset, built as precompute builds it.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    template = get_template("v1")
    records = json.loads(data.read_text())
    dataset = []
    for record, conversation in zip(records, iter_conversations(data)):
        sample = expand_placeholders(
            template.encode(conversation, tokenizer, MAX_LENGTH), student.config.image_token_id, ROWS
        )
        item = {
            "input_ids": torch.tensor(sample.input_ids[:MAX_LENGTH]),
            "labels": torch.tensor(sample.labels[:MAX_LENGTH]),
        }
        if "image" in record:
            item["pixel_values"] = torch.randn(3, 28, 28)
        dataset.append(item)
    cache = ReferenceLossCache(tmp_path / "cache")
    keys = [batch_sample_keys(d["input_ids"][None], d["labels"][None])[0] for d in dataset]
    assert all(key in cache for key in keys)
    assert sum(len(cache[key]) for key in keys) == sum(int((d["labels"][1:] != -100).sum()) for d in dataset) > 0

    # README step 4: a sparse Trainer step finds every reference (missing_reference='error').
    with_image = [d for d in dataset if "pixel_values" in d]
    flags = {"token_elision": "regate", "regate_ref_cache": str(tmp_path / "cache")}
    flags |= {"regate_warmup_steps": 0, "regate_dense_steps": 0}
    trainer = make_trainer(tmp_path, with_image, flags, model=student, max_steps=2, processing_class=tokenizer)
    trainer.train()
    kept, candidates = logged(trainer, "regate/kept"), logged(trainer, "regate/candidates")
    assert all(0 < k < c for k, c in zip(kept, candidates))
