"""The README's HF-native path, end to end: a reference LLM cut out of an HF LLaVA, `regate precompute --template v1
--image-token-id --student-config --tokenizer`, then `LlavaHFDataset` over the same file and a folder of PIL images,
collated by `HFVisionCollator`. Every sample's key, computed as the adapter computes it, must be in the cache, each
image must reach the batch as the processor's pixels, and the Trainer's sparse steps must find every reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from regate_plugin.eval.base import Prompt, Request
from regate_plugin.eval.runners import HFRunner
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, CLIPImageProcessor, LlavaProcessor

from regate_plugin.core import batch_sample_keys
from regate_plugin.data import V1_CHAT_TEMPLATE, DataError, HFVisionCollator, LlavaHFDataset
from regate_plugin.store import ReferenceLossCache

from .image_fixtures import write_image
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
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS row, which the "default" strategy drops: IMAGE_ROWS rows
    )
    student.save_pretrained(tmp_path / "student")
    processor.save_pretrained(tmp_path / "student")
    return student, tokenizer


def _images(folder, records):
    for n, record in enumerate(records):
        if "image" in record:
            write_image(folder / record["image"], 40 * n + 7)
    return folder


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
    images = _images(tmp_path / "images", json.loads(data.read_text()))
    # README step 2: precompute, with --tokenizer where training loads its tokenizer from.
    command = [sys.executable, "-m", "regate_plugin.cli", "precompute", "--data", str(data), "--reference"]
    command += [str(tmp_path / "reference"), "--tokenizer", str(tmp_path / "student"), "--template", "v1"]
    command += ["--image-token-id", str(student.config.image_token_id), "--student-config", str(tmp_path / "student")]
    command += ["--max-length", str(MAX_LENGTH), "--out", str(tmp_path / "cache"), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)

    # README step 3: the dataset and collator, reading the images we wrote.
    processor = AutoProcessor.from_pretrained(tmp_path / "student")
    dataset = LlavaHFDataset(data, images, processor, "v1", student.config.image_token_id, ROWS, MAX_LENGTH)
    collator = HFVisionCollator(processor.tokenizer.pad_token_id)
    records = json.loads(data.read_text())
    cache = ReferenceLossCache(tmp_path / "cache")
    items = [dataset[i] for i in range(len(dataset))]
    keys = [batch_sample_keys(d["input_ids"][None], d["labels"][None])[0] for d in items]
    assert all(key in cache for key in keys)
    assert sum(len(cache[key]) for key in keys) == sum(int((d["labels"][1:] != -100).sum()) for d in items) > 0
    for record, item in zip(records, items):  # each image is its file's pixels, not a stand-in
        assert ("pixel_values" in item) == ("image" in record)
        if "image" in record:
            expected = processor.image_processor(Image.open(images / record["image"]), return_tensors="pt")
            assert torch.equal(item["pixel_values"], expected["pixel_values"])
    assert len({float(d["pixel_values"].mean()) for d in items if "pixel_values" in d}) > 1

    # README step 4: a sparse Trainer step finds every reference (missing_reference='error').
    flags = {"token_elision": "regate", "regate_ref_cache": str(tmp_path / "cache")}
    flags |= {"regate_warmup_steps": 0, "regate_dense_steps": 0}
    trainer = make_trainer(
        tmp_path, dataset, flags, model=student, max_steps=3, processing_class=processor, collator=collator
    )
    trainer.train()
    kept, candidates = logged(trainer, "regate/kept"), logged(trainer, "regate/candidates")
    assert all(0 < k < c for k, c in zip(kept, candidates))


def test_dataset_names_a_sample_whose_image_is_not_in_the_folder(tmp_path):
    student, _ = _student(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path / "student")
    records = conversation_samples(6, seed=1)
    data = write_json(tmp_path / "train.json", records)
    images = _images(tmp_path / "images", records)
    (images / records[2]["image"]).unlink()
    with pytest.raises(DataError, match=rf"sample id 's0002'.*{records[2]['image']}.*not in the image folder"):
        LlavaHFDataset(data, images, processor, "v1", student.config.image_token_id, ROWS, MAX_LENGTH)


def test_v1_chat_template_makes_the_eval_runners_prompt_the_training_prompt(tmp_path):
    """`regate eval --runner hf` renders with the processor's chat template: with V1_CHAT_TEMPLATE its input ids for a
    question are the ids a `v1` training sample of that question has before its answer."""
    student, _ = _student(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path / "student")
    question = "what colour is the square?"
    records = [{"id": "q", "image": "q.jpg", "conversations": [{"from": "human", "value": f"{question} <image>"}]}]
    records[0]["conversations"].append({"from": "gpt", "value": "red it is."})
    data = write_json(tmp_path / "q.json", records)
    images = _images(tmp_path / "images", records)
    item = LlavaHFDataset(data, images, processor, "v1", student.config.image_token_id, ROWS)[0]
    answer_start = int((item["labels"] != -100).nonzero()[0])
    processor.chat_template = V1_CHAT_TEMPLATE
    runner = HFRunner(student, processor)
    image = Image.open(images / "q.jpg")
    text = runner._text(Request((image,), Prompt(user=question)))
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
    assert ids.tolist() == item["input_ids"][:answer_start].tolist()
