"""VideoLLaMA2 through `python -m regate_plugin.launch videollama2`, against the re-creation in
tests/videollama2_recreation (VideoLLaMA2 is not installable; the README there lists what it reproduces), in the
VideoLLaMA2-pinned env (transformers 4.40.0, accelerate 0.26.1, peft 0.4.0), with real mp4 videos (PyAV) and a
cache made by `regate precompute`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from regate_plugin.training import STATE_FILE

from .llava_data import conversation_samples, write_json, write_videos
from .test_launch_llava import _env, _log
from .test_templates import REPO, VIDEOLLAMA2_PYTHON, _images
from .trainer_helpers import assert_refused_before_step_0

RECREATION = REPO / "tests" / "videollama2_recreation"
SCRIPT = RECREATION / "videollama2" / "train.py"
ROWS = 4  # 2x2 patches of the tiny CLIP tower, mean-pooled over frames by mlp2x_gelu
CPU_SHIM = RECREATION / "run_on_cpu.py"
# The launcher's own flag: train.py's __main__ would ask for flash_attention_2.
LAUNCH = ["-m", "regate_plugin.launch", "videollama2", "--attn_implementation", "eager"]


def _videollama2(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert VIDEOLLAMA2_PYTHON.exists(), f"{VIDEOLLAMA2_PYTHON} is missing: run `make setup`"
    done = subprocess.run(
        [str(VIDEOLLAMA2_PYTHON), *args], capture_output=True, text=True, env=_env(), timeout=600, cwd=cwd
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videollama2")
    paths = {"base": root / "mistral-tiny", "clip": root / "clip-tiny", "media": root / "media"}
    _videollama2(str(RECREATION / "make_student.py"), str(root / "tok"), str(paths["base"]), str(paths["clip"]))
    write_videos(paths["media"], 24)
    _images(paths["media"], 24)
    samples = conversation_samples(24, seed=5, modality="video") + conversation_samples(24, seed=6, modality="image")
    paths["data"] = write_json(root / "train.json", samples)
    paths["cache"] = root / "ref_cache"
    _videollama2(
        "-m",
        "regate_plugin.cli",
        "precompute",
        "--no-progress",
        "--data",
        str(paths["data"]),
        "--reference",
        str(paths["base"]),
        "--template",
        "videollama2",
        "--out",
        str(paths["cache"]),
        "--visual-tokens",
        str(ROWS),
        "--max-length",
        "256",
        "--mode",
        "pad",
    )
    return paths


def _train_args(setup: dict[str, Path], output_dir: Path, max_steps: int, save_steps: int = 0) -> list[str]:
    """scripts/custom/finetune.sh's flags, scaled down to CPU."""
    return [
        "--model_type",
        "videollama2_mistral",
        "--model_path",
        str(setup["base"]),
        "--vision_tower",
        str(setup["clip"]),
        "--mm_projector_type",
        "mlp2x_gelu",
        "--mm_vision_select_layer",
        "-2",
        "--data_path",
        str(setup["data"]),
        "--data_folder",
        str(setup["media"]),
        "--num_frames",
        "2",
        "--image_aspect_ratio",
        "pad",
        "--bf16",
        "False",
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        "4",
        "--save_strategy",
        "steps" if save_steps else "no",
        "--save_steps",
        str(save_steps or 1000),
        "--learning_rate",
        "2e-3",
        "--lr_scheduler_type",
        "constant",
        "--logging_steps",
        "1",
        "--model_max_length",
        "256",
        "--gradient_checkpointing",
        "True",
        "--dataloader_num_workers",
        "0",
        "--report_to",
        "none",
        "--use_cpu",
        "True",
    ]


def _regate_flags(setup: dict[str, Path]) -> list[str]:
    return [
        "--token_elision",
        "regate",
        "--regate_ref_cache",
        str(setup["cache"]),
        "--regate_warmup_steps",
        "2",
        "--regate_cycle_steps",
        "4",
        "--regate_dense_steps",
        "1",
    ]


@pytest.fixture(scope="module")
def regate_run(setup, tmp_path_factory) -> Path:
    """12 steps with a checkpoint every 6: the re-created trainer's own `_save_checkpoint` / `_save` (which call
    `super(VideoLLaMA2Trainer, self)`) run at steps 6 and 12 and at the final save."""
    out = tmp_path_factory.mktemp("videollama2_run") / "videollama2-tiny-regate"
    args = _train_args(setup, out, 12, save_steps=6)
    _videollama2(*LAUNCH[:3], str(SCRIPT), *LAUNCH[3:], *args, *_regate_flags(setup))
    return out


def test_launcher_trains_with_regate_and_checkpoints(regate_run):
    log = _log(regate_run)
    assert [e["step"] for e in log] == list(range(1, 13))
    losses = [e["loss"] for e in log]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-4:]) < sum(losses[:4]), losses
    for entry in log:
        step = entry["step"] - 1
        dense = step < 2 or (step - 2) % 4 < 1
        assert (entry["regate/kept"] == entry["regate/candidates"]) == dense, entry
    saved = torch.load(regate_run / "checkpoint-6" / STATE_FILE, weights_only=True)
    assert saved["step"] == 6 and (~torch.isnan(saved["ema"]["values"])).sum() > 0
    assert (regate_run / "checkpoint-12" / "trainer_state.json").exists()
    assert (regate_run / "config.json").exists()  # the final save through VideoLLaMA2Trainer._save


def test_resumed_run_equals_the_uninterrupted_one(setup, regate_run, tmp_path):
    out = tmp_path / "videollama2-tiny-regate"
    out.mkdir()
    shutil.copytree(regate_run / "checkpoint-6", out / "checkpoint-6")
    # upstream train() resumes by itself when output_dir holds a checkpoint-*
    args = _train_args(setup, out, 12, save_steps=6)
    _videollama2(*LAUNCH[:3], str(SCRIPT), *LAUNCH[3:], *args, *_regate_flags(setup))
    straight = torch.load(regate_run / "checkpoint-12" / STATE_FILE, weights_only=True)
    resumed = torch.load(out / "checkpoint-12" / STATE_FILE, weights_only=True)
    assert resumed["step"] == straight["step"] == 12 and resumed["stats"] == straight["stats"]
    torch.testing.assert_close(resumed["ema"]["values"], straight["ema"]["values"], equal_nan=True)
    torch.testing.assert_close(resumed["ema"]["per_token"], straight["ema"]["per_token"], equal_nan=True)
    after, expected = [e for e in _log(out) if e["step"] > 6], [e for e in _log(regate_run) if e["step"] > 6]
    assert [e["regate/kept"] for e in after] == [e["regate/kept"] for e in expected]
    assert [e["loss"] for e in after] == pytest.approx([e["loss"] for e in expected], rel=1e-5)


def test_none_matches_the_upstream_script_at_step_one(setup, tmp_path):
    """Both from the checkout root, as `torchrun videollama2/train.py` is run (the launcher's default script)."""
    ours = tmp_path / "ours"
    _videollama2(
        *LAUNCH,
        *_train_args(setup, ours, 1),
        "--token_elision",
        "none",
        cwd=RECREATION,
    )
    upstream = tmp_path / "upstream"
    _videollama2(str(CPU_SHIM), "videollama2/train.py", *_train_args(setup, upstream, 1), cwd=RECREATION)
    (ours_log,), (upstream_log,) = _log(ours), _log(upstream)
    assert ours_log["loss"] == pytest.approx(upstream_log["loss"], rel=1e-5)


def test_adapter_keeps_original_positions_and_equals_upstream_at_keep_ratio_one(setup):
    done = _videollama2(
        str(RECREATION / "check_adapter.py"),
        str(setup["base"]),
        str(setup["clip"]),
        str(setup["data"]),
        str(setup["media"]),
        str(setup["cache"]),
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(result["expected_loss"], abs=1e-5)
    assert result["grad_error"] < 1e-5 and result["labels_kept"]
    assert 0 < result["kept"] < result["candidates"]
    assert result["compact_length"] < result["merged_length"]
    assert result["positions_ok"] and result["mask_ok"]


def test_missing_script_and_bad_flags_are_named(setup, tmp_path):
    run = [str(VIDEOLLAMA2_PYTHON), "-m", "regate_plugin.launch", "videollama2"]
    missing = subprocess.run([*run, str(tmp_path / "nope/train.py")], capture_output=True, text=True, env=_env())
    assert missing.returncode != 0 and "nope/train.py not found" in missing.stderr
    bad = subprocess.run(
        [
            *run,
            str(SCRIPT),
            "--attn_implementation",
            "eager",
            *_train_args(setup, tmp_path / "o", 1),
            "--token_elision",
            "regate",
            "--regate_ref_cache",
            str(setup["cache"]),
            "--regate_lambda",
            "2",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert bad.returncode != 0 and "--regate_lambda" in bad.stderr
    assert not (tmp_path / "o" / "trainer_state.json").exists()


def test_without_the_flag_the_script_s_own_attention_request_stands(setup, tmp_path):
    """train.py's __main__ asks for flash_attention_2: the launcher passes that on unless told otherwise."""
    run = [str(VIDEOLLAMA2_PYTHON), "-m", "regate_plugin.launch", "videollama2", str(SCRIPT)]
    done = subprocess.run(
        [*run, *_train_args(setup, tmp_path / "o", 1)], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert done.returncode != 0 and "Flash Attention 2" in done.stderr


def test_a_cache_scored_with_other_visual_rows_fails_at_the_first_batch_naming_the_sample(setup, tmp_path):
    """The merge puts ROWS rows per placeholder; a cache scored with ROWS + 3 has the same keys but other positions."""
    wrong = tmp_path / "wrong_rows"
    _videollama2(
        *("-m", "regate_plugin.cli", "precompute", "--no-progress", "--data", str(setup["data"])),
        *("--reference", str(setup["base"]), "--template", "videollama2", "--out", str(wrong)),
        *("--visual-tokens", str(ROWS + 3), "--max-length", "256", "--mode", "pad"),
    )
    out = tmp_path / "o"
    done = subprocess.run(
        [str(VIDEOLLAMA2_PYTHON), *LAUNCH[:3], str(SCRIPT), *LAUNCH[3:], *_train_args(setup, out, 4)]
        + ["--token_elision", "regate", "--regate_ref_cache", str(wrong)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode != 0
    message = next(
        line for line in done.stderr.splitlines() if line.startswith("regate_plugin.store.errors.CacheError")
    )
    assert (
        f"merged {ROWS} visual rows" in message and f"scored with {ROWS + 3} ({ROWS + 3} per placeholder" in message
    ), message
    assert "sample " in message and not (out / "trainer_state.json").exists()


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"--model_max_length": "64"}, "made with --max-length 256, this run truncates its samples at 64 tokens"),
        (
            {"--tune_mm_mlp_adapter": "True"},
            "made with --template videollama2, this run preprocesses its samples as videollama2_plain",
        ),
    ],
)
def test_the_launcher_refuses_a_cache_for_another_run_before_step_0(setup, tmp_path, changes, named):
    """The pre-flight check reads the template off the dataset's `data_args.is_pretraining` (what its
    `__getitem__` dispatches on) and the max length off its TrainingArguments."""
    out = tmp_path / "o"
    args = _train_args(setup, out, 2)
    for flag, value in changes.items():
        args = [*args, flag, value] if flag not in args else args
        args[args.index(flag) + 1] = value
    assert_refused_before_step_0(
        [str(VIDEOLLAMA2_PYTHON), *LAUNCH[:3], str(SCRIPT), *LAUNCH[3:], *args, *_regate_flags(setup)], _env(), named
    )
    assert not (out / "trainer_state.json").exists()


_MEDIA_CHECK = """
import json, sys
import av, torch
from transformers import CLIPImageProcessor
from videollama2.mm_utils import frame_sample, process_image, process_video
processor = CLIPImageProcessor.from_pretrained(sys.argv[1])
with av.open(sys.argv[2]) as container:
    frames = [frame.to_image() for frame in container.decode(video=0)]
video = process_video(sys.argv[2], processor, num_frames=2)
print(json.dumps({
    "samples": [frame_sample(6, 2).tolist(), frame_sample(16, 8).tolist()],
    "picked": [i for i in range(len(frames)) if torch.equal(processor.preprocess(frames[i], return_tensors="pt")
        ["pixel_values"][0], video[1])],
    "image_shape": list(process_image(sys.argv[3], processor).shape),
}))
"""


def test_the_recreation_reads_media_as_upstream(setup):
    """Upstream mm_utils.py: `frame_sample`'s uniform mode takes the middle of each of `num_frames` segments of
    `duration - 1` (a 6-frame clip at 2 frames gives frames 1 and 4, not the ends), and `process_image` returns a
    one-frame stack. Checked against the real train.py on these clips: the same losses to the bit over 12 steps."""
    done = _videollama2(
        "-c", _MEDIA_CHECK, str(setup["clip"]), str(setup["media"] / "0000.mp4"), str(setup["media"] / "0000.jpg"),
        cwd=RECREATION,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["samples"] == [[1, 4], [1, 3, 5, 7, 8, 10, 12, 14]]
    assert 4 in result["picked"] and 5 not in result["picked"]
    assert result["image_shape"] == [1, 3, 28, 28]
