"""Visual rows per image of the Qwen-VL and InternVL processors (`data/hf_visual.py`) against the processors' own
expansion of generated images: each processor, built from the same student directory, is run on a PIL image and
its expanded placeholder counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, InternVLProcessor, ProcessorMixin, Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from regate_plugin.cli import main as regate
from regate_plugin.core import IGNORE_INDEX, batch_sample_keys
from regate_plugin.data import PLACEHOLDER_IDS, DataError, get_template, iter_conversations
from regate_plugin.data.hf_visual import InternVLRows, QwenVLRows, hf_visual_rows
from regate_plugin.data.visual import visual_rows_from_path
from regate_plugin.reference.precompute import PrecomputeConfig, run_precompute
from regate_plugin.store import ReferenceLossCache

from .llava_data import caption_samples, write_json, write_tiny_reference
from .tiny import tiny_internvl, tiny_llava, tiny_qwen2_5_vl, tiny_qwen3_vl
from .tokenizers_fixture import write_bpe_chat_tokenizer, write_sentencepiece_llama

SIZES = [(333, 200), (200, 333), (448, 448), (1000, 400), (40, 30), (3000, 2000), (25, 1500), (900, 901)]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = write_bpe_chat_tokenizer(tmp_path_factory.mktemp("tok"), "chatml")
    tok = AutoTokenizer.from_pretrained(directory, extra_special_tokens=INTERNVL_TOKENS)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    return tok


@pytest.fixture
def without_video_processor(monkeypatch):
    """The processors insist on a video processor, which needs torchvision; images need none. Skip that class check."""
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)


def _student(directory: Path, model, preprocessor: dict, processor: dict | None = None) -> Path:
    model.config.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if processor is not None:
        (directory / "processor_config.json").write_text(json.dumps(processor))
    return directory


QWEN = {  # processor class, tiny model, preprocessor_config.json (the hub checkpoints' keys, smaller limits)
    "qwen2_5_vl": (Qwen2_5_VLProcessor, tiny_qwen2_5_vl, {"patch_size": 14, "min_pixels": 3136, "max_pixels": 401408}),
    "qwen3_vl": (
        Qwen3VLProcessor,
        tiny_qwen3_vl,
        {"patch_size": 16, "merge_size": 2, "size": {"shortest_edge": 65536, "longest_edge": 524288}},
    ),
}


@pytest.mark.parametrize("name", sorted(QWEN))
def test_qwen_vl_rows_match_the_processors_expansion(tmp_path, tokenizer, without_video_processor, name):
    cls, build, preprocessor = QWEN[name]
    student = _student(tmp_path, build(), preprocessor)
    rule = hf_visual_rows(student)
    assert isinstance(rule, QwenVLRows)
    processor = cls(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(student), tokenizer=tokenizer, video_processor=None
    )
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = []
    for size in SIZES:
        out = processor(
            text=["look <|vision_start|><|image_pad|><|vision_end|> here"],
            images=[Image.new("RGB", size, (size[0] % 256, 90, 30))],
            return_tensors="pt",
        )
        counts.append(int((out["input_ids"] == pad).sum()))
    assert [rule.rows(size) for size in SIZES] == counts
    assert len(set(counts)) > 4  # the sizes exercise the rounding and both pixel limits


def test_internvl_rows_match_the_processors_expansion(tmp_path, tokenizer, without_video_processor):
    # As the InternVL3-hf checkpoints ship it: crop_to_patches false in the file, which the processor overrides.
    preprocessor = {"crop_to_patches": False, "size": {"height": 448, "width": 448}, "min_patches": 1, "max_patches": 6}
    student = _student(tmp_path, tiny_internvl(), preprocessor, {"image_seq_length": 64})
    rule = hf_visual_rows(student)
    assert isinstance(rule, InternVLRows)
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil.from_pretrained(student),
        tokenizer=tokenizer,
        video_processor=None,
        image_seq_length=64,
    )
    context, start, end = tokenizer.convert_tokens_to_ids(["<IMG_CONTEXT>", "<img>", "</img>"])
    counts = []
    for size in SIZES:
        ids = processor(
            text=["look <IMG_CONTEXT> here"], images=[Image.new("RGB", size, (30, 90, 150))], return_tensors="pt"
        )["input_ids"][0].tolist()
        rows = ids.count(context)
        assert ids[ids.index(context) - 1] == start and ids[ids.index(context) + rows] == end  # <img> rows </img>
        counts.append(rows)
    assert [rule.rows(size) for size in SIZES] == counts
    assert len(set(counts)) > 2  # one tile, and grids of several sizes plus their thumbnail


def test_other_students_have_no_per_image_rule_and_bad_sizes_are_named(tmp_path):
    assert hf_visual_rows(_student(tmp_path / "llava", tiny_llava(), {})) is None
    # --student-config reads one count per placeholder: for these students it names the per-image rule instead
    with pytest.raises(DataError, match="qwen3_vl student.*processor_rows=hf_visual_rows"):
        visual_rows_from_path(_student(tmp_path / "qwen3", tiny_qwen3_vl(), {}))
    rule = QwenVLRows(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=401408)
    with pytest.raises(DataError, match="aspect ratio"):
        rule.rows((10, 3000))
    with pytest.raises(DataError, match="positive"):
        rule.rows((0, 10))


def _student_tokenizer(directory: Path):
    """A sentencepiece Llama tokenizer with the Qwen-VL and InternVL image tokens, saved to `directory`."""
    write_sentencepiece_llama(directory)
    tok = AutoTokenizer.from_pretrained(directory, extra_special_tokens=INTERNVL_TOKENS)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS, "pad_token": "<pad>"})
    tok.save_pretrained(directory)
    return tok


def _processor_run(processor, tokenizer, name: str, image: Image.Image) -> list[int]:
    """The ids the processor puts in place of one placeholder for `image`."""
    placeholder = "<|image_pad|>" if name != "internvl" else "<IMG_CONTEXT>"
    ids = processor(text=[placeholder], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    if name == "internvl":
        start, end = tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
        return ids[ids.index(start) : ids.index(end) + 1]
    return [t for t in ids if t == tokenizer.convert_tokens_to_ids(placeholder)]


PRECOMPUTE = {  # student builder, processor class, image processor class, preprocessor_config.json, processor kwargs
    "qwen2_5_vl": (tiny_qwen2_5_vl, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, QWEN["qwen2_5_vl"][2], {}),
    "internvl": (
        tiny_internvl,
        InternVLProcessor,
        GotOcr2ImageProcessorPil,
        {"size": {"height": 448, "width": 448}, "max_patches": 4},
        {"image_seq_length": 16},
    ),
}


@pytest.mark.parametrize("via", ["config", "cli"])
@pytest.mark.parametrize("name", sorted(PRECOMPUTE))
def test_precompute_keys_samples_as_the_processor_expands_their_images(tmp_path, without_video_processor, name, via):
    """Through `PrecomputeConfig(processor_rows=...)`, and through `regate precompute --student-config <dir>`, which
    reads the same rule off the student's directory."""
    build, processor_cls, image_processor_cls, preprocessor, processor_kwargs = PRECOMPUTE[name]
    tokenizer = _student_tokenizer(tmp_path / "student")
    student = _student(tmp_path / "student", build(), preprocessor, processor_kwargs or None)
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>" if name != "internvl" else "<IMG_CONTEXT>")
    processor = processor_cls(
        image_processor=image_processor_cls.from_pretrained(student),
        tokenizer=AutoTokenizer.from_pretrained(student),
        video_processor=None,
        **processor_kwargs,
    )
    samples = caption_samples(10, seed=4)  # `plain`: every answer survives this tokenizer's round trip
    images = tmp_path / "images"
    images.mkdir()
    for i, sample in enumerate(samples):
        Image.new("RGB", SIZES[i % len(SIZES)], (40, 80, 120)).save(images / sample["image"])
    data = write_json(tmp_path / "train.json", samples)
    reference = write_tiny_reference(tmp_path / "reference", tmp_path / "student")
    if via == "config":
        config = PrecomputeConfig(
            data=[data],
            reference=str(reference),
            tokenizer=str(student),  # where training loads it from
            template="plain",
            out=tmp_path / "cache",
            image_folder=images,
            image_token_id=image_token,
            processor_rows=hf_visual_rows(student),
            max_length=4096,
            progress=False,
        )
        assert run_precompute(config).empty == 0
    else:
        command = ["precompute", "--data", str(data), "--reference", str(reference), "--tokenizer", str(student)]
        command += ["--template", "plain", "--out", str(tmp_path / "cache"), "--image-folder", str(images)]
        command += ["--image-token-id", str(image_token), "--student-config", str(student), "--max-length", "4096"]
        assert regate([*command, "--no-progress"]) == 0

    cache = ReferenceLossCache(tmp_path / "cache")
    template, tokenizer = get_template("plain"), AutoTokenizer.from_pretrained(student)
    runs = set()
    for record, conversation in zip(samples, iter_conversations(data)):
        encoded = template.encode(conversation, tokenizer)
        ids, labels = [], []
        for token, label in zip(encoded.input_ids, encoded.labels):
            if token in PLACEHOLDER_IDS:  # the processor's own expansion of this sample's image
                with Image.open(images / record["image"]) as image:
                    run = _processor_run(processor, tokenizer, name, image.convert("RGB"))
                runs.add(len(run))
                ids, labels = ids + run, labels + [IGNORE_INDEX] * len(run)
            else:
                ids, labels = ids + [token], labels + [label]
        key = batch_sample_keys(torch.tensor([ids]), torch.tensor([labels]))[0]
        assert key in cache, record["id"]
    assert len(runs) > 2  # images of several sizes, several counts
