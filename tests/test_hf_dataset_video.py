"""Video samples in the HF-native dataset: `LlavaHFDataset` over a LLaVA-format file and a folder of mp4 files
written with PyAV, for a tiny LLaVA-NeXT-Video built here. Each sample's ids are the ones the model's own
`LlavaNextVideoProcessor` makes of the same prompt and frames, its keys are in the cache `run_precompute` makes of the
same file, and a Trainer step at keep 1.0 logs the model's own loss on the collated batch.

transformers 5's video processors need torchvision, which this environment does not install: the processor is given
`FrameVideoProcessor`, LLaVA-NeXT-Video's frame preprocessing through HF's `CLIPImageProcessor` (resize the shorter
side, centre-crop, CLIP-normalise each frame, as transformers 4's `LlavaNextVideoImageProcessor` did). The rows per
video are still counted by HF's own `LlavaNextVideoProcessor.replace_video_token` from the pixels it returns."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from regate_plugin.eval.frames import VisualSource, sample_videollama2
from transformers import (
    AutoTokenizer,
    BatchFeature,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    ProcessorMixin,
)

from regate_plugin.cli import main as regate
from regate_plugin.core import IGNORE_INDEX, batch_sample_keys
from regate_plugin.data import DataError, HFVisionCollator, LlavaHFDataset
from regate_plugin.data.hf_visual import LlavaNextVideoRows, hf_video_rows, video_rows_of
from regate_plugin.store import ReferenceLossCache

from .llava_data import conversation_samples, write_json
from .tokenizers_fixture import write_bpe_chat_tokenizer
from .trainer_helpers import logged, make_trainer

SIDE = 56  # the tower's input: 4x4 patches of 14, which the model pools 2x2 -> 4 rows per frame
FRAMES = 4
MAX_LENGTH = 512


class FrameVideoProcessor:
    """LLaVA-NeXT-Video's video preprocessing without torchvision: each frame through `CLIPImageProcessor` (its
    shorter side resized to `side`, then centre-cropped to side x side where `crop`); `[videos, frames, 3, H, W]`."""

    def __init__(self, side: int, crop: bool = True) -> None:
        self.size, self.crop_size = {"shortest_edge": side}, {"height": side, "width": side}
        self.do_resize, self.do_center_crop = True, crop
        self.frames = CLIPImageProcessor(size=self.size, crop_size=self.crop_size, do_center_crop=crop)

    def __call__(self, videos: list[list[Any]], return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        pixels = [self.frames(list(frames), return_tensors="pt")["pixel_values"] for frames in videos]
        return BatchFeature({"pixel_values_videos": torch.stack(pixels)})


@pytest.fixture(autouse=True)
def without_video_processor_class_check(monkeypatch):
    """The processor checks its video processor's class, which needs torchvision to import; skip that check."""
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A Mistral-style BPE tokenizer with its chat template (VideoLLaMA2's LLM family; the `videollama2` template
    renders with it), loaded back from its saved directory as training and precompute load it."""
    tok = AutoTokenizer.from_pretrained(write_bpe_chat_tokenizer(tmp_path_factory.mktemp("tok"), "mistral"))
    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    saved = tmp_path_factory.mktemp("student_tok")
    tok.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


def _processor(tokenizer, crop: bool = True) -> LlavaNextVideoProcessor:
    return LlavaNextVideoProcessor(
        video_processor=FrameVideoProcessor(SIDE, crop),
        image_processor=CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
    )


def _student(tokenizer) -> LlavaNextVideoForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=SIDE, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaNextVideoConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[SIDE, SIDE]],
    )  # spatial_pool_stride 2, the processor's // 4
    torch.manual_seed(0)
    return LlavaNextVideoForConditionalGeneration(config)


def write_video(path: Path, width: int, height: int, frames: int = 6, seed: int = 0) -> Path:
    """An mp4 of `frames` frames of random colour blocks."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            blocks = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
            pixels = np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:height, :width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def _videos(folder: Path, records: list[dict], width: int = 48, height: int = 32) -> Path:
    for n, record in enumerate(records):
        if "video" in record:
            write_video(folder / record["video"], width, height, frames=3 + 2 * n, seed=n)
    return folder


def _chat(record: dict) -> list[dict[str, str]]:
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]


QUESTIONS = [
    {
        "id": "v0",
        "video": "0000.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the square?"},
            {"from": "gpt", "value": "red it is."},
        ],
    },
    {
        "id": "v1",
        "video": "0001.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nhow many are there?"},
            {"from": "gpt", "value": "three of them."},
            {"from": "human", "value": "and the colour?"},
            {"from": "gpt", "value": "blue."},
        ],
    },
]


@pytest.mark.parametrize("crop", [True, False], ids=["centre-crop", "resize-only"])
@pytest.mark.parametrize("size", [(48, 32), (32, 64)], ids=["wide", "tall"])
def test_video_sample_ids_are_the_processors_own(tmp_path, tokenizer, crop, size):
    """Independent reference: `LlavaNextVideoProcessor(text=..., videos=...)` on the tokenizer's own rendering of the
    conversation and the same frames (VideoLLaMA2's uniform sampling of the file)."""
    processor = _processor(tokenizer, crop)
    data = write_json(tmp_path / "train.json", QUESTIONS)
    videos = _videos(tmp_path / "videos", QUESTIONS, *size)
    dataset = LlavaHFDataset(
        data, tmp_path / "images", processor, "videollama2", 0, 1, video_folder=videos, num_frames=FRAMES
    )
    for n, record in enumerate(QUESTIONS):
        item = dataset[n]
        frames = sample_videollama2(VisualSource(videos / record["video"]), FRAMES, None, max_frames=FRAMES)
        text = tokenizer.apply_chat_template(_chat(record), tokenize=False)
        expected = processor(text=[text], videos=[frames], return_tensors="pt", add_special_tokens=False)
        assert item["input_ids"].tolist() == expected["input_ids"][0].tolist()
        assert torch.equal(item["pixel_values_videos"], expected["pixel_values_videos"])
        video = item["input_ids"] == processor.video_token_id
        assert int(video.sum()) > FRAMES and (item["labels"][video] == IGNORE_INDEX).all()
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        supervised = tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX])
        assert all(answer in supervised for answer in answers)


def _student_directory(directory: Path, student, processor, layout: str = "video_preprocessor_config.json") -> Path:
    """What `regate precompute --student-config` reads of a LLaVA-NeXT-Video student: its config, the processor's
    patch size and the video processor's settings, in `layout`: the file named so, or nested in
    `processor_config.json` (transformers 5's `save_pretrained`)."""
    student.config.save_pretrained(directory)
    video = processor.video_processor
    settings = {"size": video.size, "crop_size": video.crop_size, "do_center_crop": video.do_center_crop}
    settings["do_resize"] = video.do_resize
    processor_config: dict[str, Any] = {"patch_size": processor.patch_size}
    if layout == "nested":
        processor_config["video_processor"] = settings
    else:
        (directory / layout).write_text(json.dumps(settings))
    (directory / "processor_config.json").write_text(json.dumps(processor_config))
    return directory


@pytest.mark.parametrize("layout", ["nested", "video_preprocessor_config.json", "preprocessor_config.json"])
@pytest.mark.parametrize("crop", [True, False], ids=["centre-crop", "resize-only"])
def test_video_rows_from_the_student_directory_are_the_loaded_processors(tmp_path, tokenizer, crop, layout):
    processor = _processor(tokenizer, crop)
    student = _student_directory(tmp_path / "student", _student(tokenizer), processor, layout)
    assert hf_video_rows(student, FRAMES) == video_rows_of(processor, FRAMES)
    assert hf_video_rows(student, FRAMES).rows((640, 480)) == FRAMES * (4 * 5 // 4 if not crop else 4)


def test_training_keys_are_in_the_cache_and_keep_one_trains_on_the_models_own_loss(tmp_path, tokenizer):
    """`regate precompute --student-config --video-token-id --num-frames` (the student's own LLM as the reference)
    over the file, then the dataset over the same file and videos: every key is in the cache with one loss per
    answer token, and a Trainer step at keep 1.0 logs the loss the model itself computes on the collated batch."""
    processor = _processor(tokenizer)
    student = _student(tokenizer)
    records = conversation_samples(8, seed=3, modality="video")
    data = write_json(tmp_path / "train.json", records)
    videos = _videos(tmp_path / "videos", records)
    reference = LlamaForCausalLM(student.config.text_config)
    reference.model.load_state_dict(student.model.language_model.state_dict())
    reference.lm_head.load_state_dict(student.lm_head.state_dict())
    reference.save_pretrained(tmp_path / "reference")
    tokenizer.save_pretrained(tmp_path / "reference")
    command = ["precompute", "--data", str(data), "--reference", str(tmp_path / "reference"), "--template"]
    command += ["videollama2", "--image-token-id", str(student.config.image_token_id), "--video-token-id"]
    command += [str(student.config.video_token_id), "--num-frames", str(FRAMES), "--image-folder", str(videos)]
    command += ["--student-config", str(_student_directory(tmp_path / "student", student, processor))]
    command += ["--max-length", str(MAX_LENGTH), "--out", str(tmp_path / "cache"), "--no-progress"]
    assert regate(command) == 0

    dataset = LlavaHFDataset(
        data, videos, processor, "videollama2", student.config.image_token_id, 1, MAX_LENGTH, num_frames=FRAMES
    )
    items = [dataset[i] for i in range(len(dataset))]
    cache = ReferenceLossCache(tmp_path / "cache")
    keys = [batch_sample_keys(d["input_ids"][None], d["labels"][None])[0] for d in items]
    assert all(key in cache for key in keys)
    assert sum(len(cache[key]) for key in keys) == sum(int((d["labels"][1:] != -100).sum()) for d in items) > 0
    assert sum("pixel_values_videos" in d for d in items) == sum("video" in r for r in records) > 1

    pair = [items[0], items[2]]  # two videos of different lengths of text
    collator = HFVisionCollator(tokenizer.pad_token_id)
    batch = collator(pair)
    assert batch["pixel_values_videos"].shape == (2, FRAMES, 3, SIDE, SIDE)
    own = copy.deepcopy(student).train()
    with torch.no_grad():
        expected = float(own(**batch).loss)
    flags = {"token_elision": "regate", "regate_ref_cache": str(tmp_path / "cache"), "regate_keep_ratio": 1.0}
    flags |= {"regate_warmup_steps": 0, "regate_dense_steps": 0}
    trainer = make_trainer(
        tmp_path, pair, flags, model=student, max_steps=1, processing_class=processor, collator=collator
    )
    trainer.train()
    assert logged(trainer, "regate/kept") == logged(trainer, "regate/candidates")
    assert logged(trainer, "loss")[0] == pytest.approx(expected, rel=1e-5)


def _one_video(tmp_path: Path, video: bytes | None) -> Path:
    records = [{**QUESTIONS[0], "id": "bad7"}]
    if video is not None:
        (tmp_path / "videos").mkdir(exist_ok=True)
        (tmp_path / "videos" / "0000.mp4").write_bytes(video)
    return write_json(tmp_path / "train.json", records)


@pytest.mark.parametrize(
    ("video", "when", "message"),
    [
        (None, "init", r"sample id 'bad7'.*'0000\.mp4' is not in the video folder"),
        (b"", "init", r"sample id 'bad7'.*0000\.mp4 is empty \(0 bytes\)"),
        (b"not a video at all" * 10, "item", r"sample id 'bad7'.*0000\.mp4.*cannot read the video"),
    ],
    ids=["missing", "empty", "unreadable"],
)
def test_a_bad_video_is_named_with_its_sample(tmp_path, tokenizer, video, when, message):
    data = _one_video(tmp_path, video)
    make = lambda: LlavaHFDataset(data, tmp_path / "videos", _processor(tokenizer), "videollama2", 0, 1)  # noqa: E731
    if when == "init":
        with pytest.raises(DataError, match=message):
            make()
    else:
        dataset = make()
        with pytest.raises(DataError, match=message):
            dataset[0]


def test_a_template_that_leaves_video_as_text_is_refused(tmp_path, tokenizer):
    data = _one_video(tmp_path, None)
    write_video(tmp_path / "videos" / "0000.mp4", 32, 32)
    dataset = LlavaHFDataset(data, tmp_path / "videos", _processor(tokenizer), "v1", 0, 1)
    with pytest.raises(DataError, match=r"sample id 'bad7'.*1 video file\(s\) for 0 placeholder.*'videollama2'"):
        dataset[0]


def test_rows_need_a_processor_with_a_known_video_rule(tmp_path, tokenizer):
    data = _one_video(tmp_path, None)
    write_video(tmp_path / "videos" / "0000.mp4", 32, 32)
    with pytest.raises(DataError, match=r"train\.json has video samples: .*LlavaNextVideoProcessor"):
        LlavaHFDataset(data, tmp_path / "videos", tokenizer, "videollama2", 0, 1)
    assert LlavaNextVideoRows(FRAMES, 14, crop=(SIDE, SIDE)).describe()["crop"] == [SIDE, SIDE]


def test_a_cut_inside_a_video_is_refused(tmp_path, tokenizer):
    data = _one_video(tmp_path, None)
    write_video(tmp_path / "videos" / "0000.mp4", 32, 32)
    processor = _processor(tokenizer)
    dataset = LlavaHFDataset(data, tmp_path / "videos", processor, "videollama2", 0, 1, 12, num_frames=FRAMES)
    with pytest.raises(DataError, match=r"sample id 'bad7'.*cut at 12 tokens leaves \d+ of its videos' 16 rows"):
        dataset[0]
