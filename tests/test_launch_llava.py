"""The real upstream LLaVA `train.py` (llava-torch 1.2.2.post1, transformers 4.37.2, the upstream-LLaVA env) run
through `python -m regate_plugin.launch llava` on a tiny LLaVA: local tiny Llama with a sentencepiece tokenizer,
local tiny CLIP tower, generated images, a reference cache made by `regate precompute` in the same env."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from regate_plugin.patching import apply_patch
from regate_plugin.training import STATE_FILE

from .llava_data import conversation_samples, write_json
from .ranks import OBSERVER, assert_every_rank_closed_its_process_group, free_port
from .test_templates import LLAVA_PYTHON, REPO, _images
from .tokenizers_fixture import write_sentencepiece_llama
from .trainer_helpers import assert_refused_before_step_0

ROWS = 4  # (28 / 14) ** 2 patches of the tiny CLIP tower
MAX_LEN = 256
SCHEDULE = {"warmup": 4, "cycle": 6, "dense": 2}


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
        # transformers 4.37 resumes with torch.load's pre-2.6 default; this env has torch 2.13, not the pinned 2.1.2
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
    }


def _llava(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert LLAVA_PYTHON.exists(), f"{LLAVA_PYTHON} is missing: run `make setup` (scripts/setup_llava_env.sh)"
    done = subprocess.run([str(LLAVA_PYTHON), *args], capture_output=True, text=True, env=_env(), timeout=600, cwd=cwd)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def _llava_command(launcher: list[str], args: list[str], rank_states: Path) -> None:
    """A launcher of the upstream-LLaVA env (torchrun, deepspeed) starting `regate_plugin.launch` on two CPU ranks;
    each rank leaves the elision state it ends with, and whether it exited with its process group closed, in
    `rank_states` (tests/rank_observer)."""
    rank_states.mkdir()
    env = {
        **_env(),
        "PYTHONPATH": f"{OBSERVER}:{REPO}",
        "REGATE_RANK_STATE_DIR": str(rank_states),
        "REGATE_RANK_EXIT_DIR": str(rank_states),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:  # whole, in the failed test's captured output: the assertion's repr is cut short
        print(done.stdout, done.stderr, sep="\n--- stderr ---\n")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava_e2e")
    tokenizer = write_sentencepiece_llama(root / "tok")
    paths = {
        "base": root / "vicuna-tiny",
        "clip": root / "clip-tiny",
        "projector": root / "mm_projector.bin",
        "images": _images(root / "img", 48),
    }
    _llava(
        str(REPO / "tests/upstream_llava/make_student.py"),
        str(tokenizer),
        str(paths["base"]),
        str(paths["clip"]),
        str(paths["projector"]),
    )
    paths["data"] = write_json(root / "train.json", conversation_samples(48, seed=3))
    paths["cache"] = root / "ref_cache"
    _llava(
        "-m",
        "regate_plugin.cli",
        "precompute",
        "--no-progress",
        "--data",
        str(paths["data"]),
        "--reference",
        str(paths["base"]),
        "--template",
        "v1",
        "--out",
        str(paths["cache"]),
        "--visual-tokens",
        str(ROWS),
        "--max-length",
        str(MAX_LEN),
        "--mode",
        "pad",
    )
    return paths


def _train_args(setup: dict[str, Path], output_dir: Path, max_steps: int, save_steps: int = 0) -> list[str]:
    """The LLaVA-1.5 fine-tuning flags (scripts/v1_5/finetune.sh), scaled down to CPU."""
    return [
        "--model_name_or_path",
        str(setup["base"]),
        "--version",
        "v1",
        "--data_path",
        str(setup["data"]),
        "--image_folder",
        str(setup["images"]),
        "--vision_tower",
        str(setup["clip"]),
        "--pretrain_mm_mlp_adapter",
        str(setup["projector"]),
        "--mm_projector_type",
        "mlp2x_gelu",
        "--mm_vision_select_layer",
        "-2",
        "--mm_use_im_start_end",
        "False",
        "--mm_use_im_patch_token",
        "False",
        "--image_aspect_ratio",
        "pad",
        "--group_by_modality_length",
        "True",
        "--bf16",
        "False",
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--evaluation_strategy",
        "no",
        "--save_strategy",
        "steps" if save_steps else "no",
        "--save_steps",
        str(save_steps or 1000),
        "--learning_rate",
        "2e-3",
        "--weight_decay",
        "0.",
        "--warmup_ratio",
        "0.",
        "--lr_scheduler_type",
        "constant",
        "--logging_steps",
        "1",
        "--model_max_length",
        str(MAX_LEN),
        "--gradient_checkpointing",
        "True",
        "--dataloader_num_workers",
        "0",
        "--lazy_preprocess",
        "True",
        "--report_to",
        "none",
        "--use_cpu",
        "True",
        "--seed",
        "0",
    ]


def _regate_flags(setup: dict[str, Path]) -> list[str]:
    return [
        "--token_elision",
        "regate",
        "--regate_ref_cache",
        str(setup["cache"]),
        "--regate_warmup_steps",
        str(SCHEDULE["warmup"]),
        "--regate_cycle_steps",
        str(SCHEDULE["cycle"]),
        "--regate_dense_steps",
        str(SCHEDULE["dense"]),
        "--regate_keep_ratio",
        "0.5",
    ]


def _log(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def _dense_by_rule(step: int) -> bool:
    """The dual-cycle rule (docs/METHOD.md) written out for the test schedule."""
    return step < SCHEDULE["warmup"] or (step - SCHEDULE["warmup"]) % SCHEDULE["cycle"] < SCHEDULE["dense"]


@pytest.fixture(scope="module")
def regate_run(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "llava-tiny-regate"
    _llava("-m", "regate_plugin.launch", "llava", *_train_args(setup, out, 24, save_steps=12), *_regate_flags(setup))
    return out


def test_regate_trains_and_logs_the_schedule(regate_run):
    log = _log(regate_run)
    assert [e["step"] for e in log] == list(range(1, 25))
    losses = [e["loss"] for e in log]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.5, losses
    for entry in log:
        step = entry["step"] - 1
        if _dense_by_rule(step):
            assert entry["regate/kept_fraction"] == 1.0, entry
        else:  # k = ceil(p * n) per row, four rows per batch
            assert entry["regate/candidates"] / 2 <= entry["regate/kept"] < entry["regate/candidates"] / 2 + 4, entry
    assert 0.5 < log[-1]["regate/answer_tokens_processed"] < 1.0
    saved = torch.load(regate_run / "checkpoint-12" / STATE_FILE, weights_only=True)
    assert saved["name"] == "regate" and saved["step"] == 12 and (~torch.isnan(saved["ema"]["values"])).sum() > 0
    assert (regate_run / "config.json").exists()  # upstream's own final save ran


def test_resumed_run_continues_schedule_and_ema(setup, regate_run, tmp_path):
    out = tmp_path / "llava-tiny-regate"
    out.mkdir()
    shutil.copytree(regate_run / "checkpoint-12", out / "checkpoint-12")
    # upstream train() resumes by itself when output_dir holds a checkpoint-*
    _llava("-m", "regate_plugin.launch", "llava", *_train_args(setup, out, 24, save_steps=12), *_regate_flags(setup))
    straight = torch.load(regate_run / "checkpoint-24" / STATE_FILE, weights_only=True)
    resumed = torch.load(out / "checkpoint-24" / STATE_FILE, weights_only=True)
    assert resumed["step"] == straight["step"] == 24
    assert resumed["stats"] == straight["stats"]
    for table in ("values", "per_token"):
        torch.testing.assert_close(resumed["ema"][table], straight["ema"][table], equal_nan=True, rtol=1e-4, atol=1e-5)
    after = [e for e in _log(out) if e["step"] > 12]
    expected = [e for e in _log(regate_run) if e["step"] > 12]
    assert [e["regate/kept"] for e in after] == [e["regate/kept"] for e in expected]
    assert [e["loss"] for e in after] == pytest.approx([e["loss"] for e in expected], rel=1e-4)


def test_none_matches_upstream_loss_at_step_one(setup, tmp_path):
    ours = tmp_path / "llava-tiny-none"
    _llava("-m", "regate_plugin.launch", "llava", *_train_args(setup, ours, 1), "--token_elision", "none")
    upstream = tmp_path / "llava-tiny-upstream"
    _llava("-m", "llava.train.train", *_train_args(setup, upstream, 1))
    (ours_log,), (upstream_log,) = _log(ours), _log(upstream)
    assert ours_log["loss"] == pytest.approx(upstream_log["loss"], rel=1e-5)
    assert ours_log["regate/kept"] == ours_log["regate/candidates"] > 0


def test_patched_train_py_takes_the_flags(setup, tmp_path):
    """`regate patch apply llava` on upstream's train.py (the installed file is c121f04's), then that file runs as
    a fork's would, with the flags on its command line."""
    installed = _llava("-c", "import llava.train.train as t; print(t.__file__)").stdout.strip().splitlines()[-1]
    fork = tmp_path / "LLaVA"
    (fork / "llava/train").mkdir(parents=True)
    shutil.copy(installed, fork / "llava/train/train.py")
    assert "patched" in apply_patch("llava", fork)
    out = tmp_path / "llava-tiny-fork"
    flags = [
        "--token_elision",
        "regate",
        "--regate_ref_cache",
        str(setup["cache"]),
        "--regate_warmup_steps",
        "0",
        "--regate_dense_steps",
        "0",
    ]
    _llava(str(fork / "llava/train/train.py"), *_train_args(setup, out, 2), *flags)
    log = _log(out)
    assert all(0 < e["regate/kept"] < e["regate/candidates"] for e in log), log


def test_bad_flags_fail_before_training(setup, tmp_path):
    def launch(*flags: str) -> subprocess.CompletedProcess:
        out = tmp_path / "llava-tiny-bad"
        return subprocess.run(
            [str(LLAVA_PYTHON), "-m", "regate_plugin.launch", "llava", *_train_args(setup, out, 2), *flags],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=600,
        )

    no_cache = launch("--token_elision", "regate")
    assert no_cache.returncode != 0 and "--regate_ref_cache" in no_cache.stderr
    zero = launch("--token_elision", "regate", "--regate_ref_cache", str(setup["cache"]), "--regate_keep_ratio", "0")
    assert zero.returncode != 0 and "--regate_keep_ratio" in zero.stderr
    assert not (tmp_path / "llava-tiny-bad" / "trainer_state.json").exists()


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"--model_max_length": "64"}, "made with --max-length 256, this run truncates its samples at 64 tokens"),
        ({"--version": "plain"}, "made with --template v1, this run preprocesses its samples as plain"),
    ],
)
def test_the_launcher_refuses_a_cache_for_another_run_before_step_0(setup, tmp_path, changes, named):
    """The pre-flight check (training/preflight.py) reads the template off LLaVA's chosen conversation and the max
    length off its TrainingArguments, and compares them with the cache's manifest."""
    out = tmp_path / "run"
    args = _train_args(setup, out, 2)
    for flag, value in changes.items():
        args[args.index(flag) + 1] = value
    assert_refused_before_step_0(
        [str(LLAVA_PYTHON), "-m", "regate_plugin.launch", "llava", *args, *_regate_flags(setup)], _env(), named
    )
    assert not (out / "trainer_state.json").exists() and not list(out.glob("checkpoint-*"))


TWO_RANK_STEPS = 6  # warmup 2, then a cycle of 4 with 1 dense step: steps 3-5 (1-based 4-6) are sparse


def _two_rank_flags(setup: dict[str, Path], out: Path) -> list[str]:
    flags = _train_args(setup, out, TWO_RANK_STEPS, save_steps=TWO_RANK_STEPS) + _regate_flags(setup)
    schedule = {"--regate_warmup_steps": "2", "--regate_cycle_steps": "4", "--regate_dense_steps": "1"}
    for flag, value in schedule.items():
        flags[flags.index(flag) + 1] = value
    return [*flags, "--ddp_backend", "gloo", "--per_device_train_batch_size", "2"]


def _assert_ranks_hold_one_state(out: Path, rank_states: Path) -> None:
    """Both ranks end with the same elision state (EMA, step), and the run logged the schedule."""
    first, second = (torch.load(rank_states / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert first["step"] == second["step"] == TWO_RANK_STEPS
    assert bool((~first["ema"]["values"].isnan()).any())
    torch.testing.assert_close(_ema_by_key(second["ema"]), _ema_by_key(first["ema"]), rtol=0, atol=0, equal_nan=True)
    assert (out / f"checkpoint-{TWO_RANK_STEPS}" / STATE_FILE).exists()
    log = _log(out)
    assert [e["step"] for e in log] == list(range(1, TWO_RANK_STEPS + 1))
    assert all(e["regate/kept"] < e["regate/candidates"] for e in log if not _dense_two_rank(e["step"] - 1)), log


def _ema_by_key(ema: dict) -> dict:
    """A saved EMA with its per-sample rows keyed by sample key, so that the order ranks first met them in is moot."""
    if "lengths" not in ema:  # flat arrays in a fixed layout: compared as they are
        return ema
    rows = torch.split(ema["values"], ema["lengths"].tolist())
    by_key = {bytes(key.tolist()): row for key, row in zip(ema["keys"], rows)}
    rest = {name: value for name, value in ema.items() if name not in ("keys", "lengths", "values")}
    return {**rest, "per_sample": dict(sorted(by_key.items()))}


def _dense_two_rank(step: int) -> bool:
    return step < 2 or (step - 2) % 4 < 1


TWO_RANK_LAUNCHERS = {  # how each starts `regate_plugin.launch llava` on two ranks
    "torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port", "{port}", "-m"],
    # the README's command: each rank starts as `python -u -m regate_plugin.launch --local_rank=N llava ...`
    "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", "{port}", "--module"],
}


@pytest.mark.parametrize("launcher", sorted(TWO_RANK_LAUNCHERS))
def test_two_ranks_end_with_one_ema(setup, tmp_path, launcher):
    """Upstream LLaVA on two ranks (DDP, gloo) through torchrun and through `deepspeed --module
    regate_plugin.launch llava`. Without a ZeRO config: accelerate 0.26 (this env) opens DeepSpeed's process group
    on nccl, which a CPU build of torch does not have."""
    out = tmp_path / f"llava-tiny-{launcher}"
    port = str(free_port())
    program, *options = [part.format(port=port) for part in TWO_RANK_LAUNCHERS[launcher]]
    _llava_command(
        [str(LLAVA_PYTHON.parent / program), *options, "regate_plugin.launch", "llava"],
        _two_rank_flags(setup, out),
        tmp_path / "rank_states",
    )
    _assert_ranks_hold_one_state(out, tmp_path / "rank_states")
    assert_every_rank_closed_its_process_group(tmp_path / "rank_states", 2)
