"""VideoLLaMA2 through `python -m regate_plugin.launch videollama2`, against the re-creation in
tests/videollama2_recreation (VideoLLaMA2 is not installable; the README there lists what it reproduces), in the
upstream env (transformers 4.37), with real mp4 videos (PyAV) and a cache made by `regate precompute`."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from regate_plugin.training import STATE_FILE

from .llava_data import conversation_samples, write_json, write_videos
from .test_launch_llava import _env, _llava, _log
from .test_templates import LLAVA_PYTHON, REPO, _images

RECREATION = REPO / "tests" / "videollama2_recreation"
SCRIPT = RECREATION / "videollama2" / "train.py"
ROWS = 4  # 2x2 patches of the tiny CLIP tower, mean-pooled over frames by mlp2x_gelu


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videollama2")
    paths = {"base": root / "mistral-tiny", "clip": root / "clip-tiny", "media": root / "media"}
    _llava(str(RECREATION / "make_student.py"), str(root / "tok"), str(paths["base"]), str(paths["clip"]))
    write_videos(paths["media"], 24)
    _images(paths["media"], 24)
    samples = conversation_samples(24, seed=5, modality="video") + conversation_samples(24, seed=6, modality="image")
    paths["data"] = write_json(root / "train.json", samples)
    paths["cache"] = root / "ref_cache"
    _llava(
        "-m",
        "regate_plugin.cli",
        "precompute",
        "--no-progress",
        "--data",
        str(paths["data"]),
        "--teacher",
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


def test_launcher_trains_with_regate(setup, tmp_path):
    out = tmp_path / "videollama2-tiny-regate"
    flags = [
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
    _llava("-m", "regate_plugin.launch", "videollama2", str(SCRIPT), *_train_args(setup, out, 12, save_steps=6), *flags)
    log = _log(out)
    assert [e["step"] for e in log] == list(range(1, 13))
    losses = [e["loss"] for e in log]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-4:]) < sum(losses[:4]), losses
    for entry in log:
        step = entry["step"] - 1
        dense = step < 2 or (step - 2) % 4 < 1
        assert (entry["regate/kept"] == entry["regate/candidates"]) == dense, entry
    saved = torch.load(out / "checkpoint-6" / STATE_FILE, weights_only=True)
    assert saved["step"] == 6 and (~torch.isnan(saved["ema"]["values"])).sum() > 0


def test_none_matches_the_upstream_script_at_step_one(setup, tmp_path):
    """Both from the checkout root, as `torchrun videollama2/train.py` is run (the launcher's default script)."""
    ours = tmp_path / "ours"
    _llava(
        "-m",
        "regate_plugin.launch",
        "videollama2",
        *_train_args(setup, ours, 1),
        "--token_elision",
        "none",
        cwd=RECREATION,
    )
    upstream = tmp_path / "upstream"
    _llava("videollama2/train.py", *_train_args(setup, upstream, 1), cwd=RECREATION)
    (ours_log,), (upstream_log,) = _log(ours), _log(upstream)
    assert ours_log["loss"] == pytest.approx(upstream_log["loss"], rel=1e-5)


def test_adapter_keeps_original_positions_and_equals_upstream_at_keep_ratio_one(setup):
    done = _llava(
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
    run = [str(LLAVA_PYTHON), "-m", "regate_plugin.launch", "videollama2"]
    missing = subprocess.run([*run, str(tmp_path / "nope/train.py")], capture_output=True, text=True, env=_env())
    assert missing.returncode != 0 and "nope/train.py not found" in missing.stderr
    bad = subprocess.run(
        [
            *run,
            str(SCRIPT),
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
