"""VideoChat2 (`VideoChat2_it_mistral`, LoRA on a Mistral LLM) under token elision, against the re-creation in
tests/videochat2_recreation (VideoChat2 is not installable; its README traces what is reproduced): at keep ratio 1
the loss and every trainable gradient equal the model's own forward; sparse, the loss equals a brute-force run of
the decoder on the kept rows at their original positions; the sample keys are the pre-merge samples that the
fixtures build on their own from the prompts (the reference cache is keyed by them; a key that differs is refused).
The same checks run in VideoChat2's pinned stack (transformers 4.40, peft 0.4.0)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import regate_plugin as rg
from regate_plugin.core.errors import UserError

from .llava_data import write_tiny_reference
from .test_templates import REPO, VIDEOLLAMA2_PYTHON
from .tokenizers_fixture import write_sentencepiece_llama
from .videochat2_recreation.fixtures import (
    CONVERSATIONS,
    QUERIES,
    batch,
    brute_force_loss,
    grads,
    reference_cache,
    tiny_student,
)
from .videochat2_recreation.videochat2 import IGNORE, process_qa

RECREATION = REPO / "tests" / "videochat2_recreation"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videochat2")
    write_sentencepiece_llama(root / "tok")  # Mistral's tokenizer is a Llama sentencepiece one
    return write_tiny_reference(root / "mistral", root / "tok", arch="mistral")


@pytest.mark.parametrize("frames", [4, 1])
@pytest.mark.parametrize("max_txt_len", [128, 58])  # 58: VideoChat2 cuts the longest samples in their answers
def test_keep_one_equals_the_models_own_forward(base, tmp_path, frames, max_txt_len):
    model = tiny_student(base, max_txt_len)
    images, prompts, instructions = batch(frames)
    llm_inputs: dict = {}
    model.mistral_model.register_forward_pre_hook(lambda m, a, kw: llm_inputs.update(kw), with_kwargs=True)
    expected = model(images, prompts, instructions)["loss"]
    expected.backward()
    assert (llm_inputs["attention_mask"].shape[1] == max_txt_len + QUERIES) == (max_txt_len == 58)  # the cut
    expected_grads = grads(model)
    assert any("lora_B" in n for n in expected_grads) and "mistral_proj.weight" in expected_grads
    model.zero_grad(set_to_none=True)

    cfg = rg.ReGATEConfig(keep_ratio=1.0, warmup_steps=0, dense_steps=0)
    reference = reference_cache(model, prompts, frames, tmp_path / "cache")
    rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=reference))
    loss = model(images, prompts, instructions)["loss"]
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    elided_grads = grads(model)
    assert elided_grads.keys() == expected_grads.keys()
    for name, grad in elided_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)

    model.eval()  # outside training the model's own forward runs
    with torch.no_grad():
        torch.testing.assert_close(model(images, prompts, instructions)["loss"], expected.detach())


def test_sparse_step_is_the_decoder_on_the_kept_rows(base, tmp_path):
    model = tiny_student(base)
    images, prompts, instructions = batch(4)
    cfg = rg.ReGATEConfig(keep_ratio=0.5, warmup_steps=0, dense_steps=0)
    elision = rg.build_token_elision("regate", cfg, reference=reference_cache(model, prompts, 4, tmp_path / "cache"))
    rg.enable_token_elision(model, elision)
    seen: dict = {}
    model.mistral_model.register_forward_pre_hook(lambda m, a, kw: seen.update(inputs=kw), with_kwargs=True)
    model.mistral_model.register_forward_hook(lambda m, a, out: seen.update(report=out.token_elision))
    loss = model(images, prompts, instructions)["loss"]

    mask, labels = seen["inputs"]["attention_mask"].bool(), seen["inputs"]["labels"]
    kept = seen["report"]["kept_mask"]
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    candidates = (labels != IGNORE) & (targets != IGNORE) & mask
    for b in range(labels.shape[0]):  # every non-candidate stays; ceil(p * candidates) candidates stay
        assert bool(kept[b][mask[b] & ~candidates[b]].all())
        assert int((kept[b] & candidates[b]).sum()) == math.ceil(0.5 * int(candidates[b].sum()))
    assert seen["report"]["kept"] < seen["report"]["candidates"]
    assert loss.item() == pytest.approx(brute_force_loss(model, seen["inputs"], kept), rel=1e-5)


def test_a_cache_scored_with_other_visual_rows_is_refused(base, tmp_path):
    model = tiny_student(base)
    images, prompts, instructions = batch(4)
    reference = reference_cache(model, prompts, 4, tmp_path / "cache", rows=QUERIES + 1)
    rg.enable_token_elision(model, rg.build_token_elision("regate", rg.ReGATEConfig(), reference=reference))
    with pytest.raises(UserError, match=f"merged {QUERIES} visual rows"):
        model(images, prompts, instructions)


def test_in_videochat2s_pinned_stack(tmp_path):
    """transformers 4.40 and peft 0.4.0 (VideoChat2 pins 4.40.1 and 0.4.0; the VideoLLaMA2 env has them), where
    Mistral slices its RoPE table to the sequence length."""
    assert VIDEOLLAMA2_PYTHON.exists(), f"{VIDEOLLAMA2_PYTHON} is missing: run `make setup`"
    done = subprocess.run(
        [str(VIDEOLLAMA2_PYTHON), str(RECREATION / "check_adapter.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["transformers"].startswith("4.40") and result["peft"] == "0.4.0"
    assert result["loss"] == pytest.approx(result["expected_loss"], rel=1e-6)
    assert result["grad_error"] < 1e-6
    assert result["sparse_loss"] == pytest.approx(result["brute_force_loss"], rel=1e-5)
    assert result["kept"] < result["candidates"]


# The launcher, against the re-created tasks/train_it.py (run from the re-creation's folder, as VideoChat2 runs
# from video_chat2/), in the main env.
ANNOTATIONS = [{"video": f"clip{i}.mp4", "QA": qa} for i, qa in enumerate(CONVERSATIONS * 2)]
LAUNCH = ["-m", "regate_plugin.launch", "videochat2", "tasks/train_it.py"]


@pytest.fixture(scope="module")
def run_setup(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videochat2_run")
    (root / "train.json").write_text(json.dumps(ANNOTATIONS))
    config = f"""import torch
model = dict(model_cls="VideoChat2_it_mistral", mistral_model_path={str(base)!r}, vision_width=16, num_query_token=3,
             extra_num_query_token=2, use_lora=True, lora_dropout=0.0, torch_dtype=torch.float32, max_txt_len=128)
optimizer = dict(lr=1e-3, max_grad_norm=-1)
train_file = {str(root / "train.json")!r}
num_frames = 4
system = "you are helpful "
batch_size = 2
epochs = 1
seed = 42
fp16 = False
auto_resume = True
output_dir = "unset"
"""
    (root / "config.py").write_text(config)
    prompts = [process_qa(qa, "you are helpful ")[0] for qa in CONVERSATIONS]
    return {"root": root, "cache": reference_cache(tiny_student(base), prompts, 4, root / "cache")}


def _train_it(run_setup: dict[str, Path], output: str, *args: str, launcher: bool = True) -> list[float]:
    entry = LAUNCH if launcher else ["tasks/train_it.py"]
    argv = [*entry, str(run_setup["root"] / "config.py"), "output_dir", str(run_setup["root"] / output), *args]
    env = {**os.environ, "PYTHONPATH": f"{RECREATION}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=RECREATION, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = (run_setup["root"] / output / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["video-loss"] for line in lines]


@pytest.fixture(scope="module")
def plain(run_setup) -> list[float]:
    """The re-created train_it.py's own losses, one per step."""
    return _train_it(run_setup, "plain", launcher=False)


def test_launcher_at_keep_one_trains_as_train_it_does(run_setup, plain):
    flags = ["--regate_ref_cache", str(run_setup["cache"]), "--regate_keep_ratio", "1.0", "--regate_warmup_steps", "0"]
    elided = _train_it(run_setup, "keep1", "--token_elision", "regate", *flags, "--regate_dense_steps", "0")
    assert len(plain) == len(ANNOTATIONS) // 2
    assert elided == pytest.approx(plain, rel=1e-5)


def test_launcher_sets_the_step_of_each_batch(run_setup, plain):
    """Warm-up 1, cycles of 3 with 1 dense step: steps 0 and 1 are dense, so the run matches train_it.py's own
    until step 2, the first sparse one, computed on the same weights as train_it.py's step 2 and losing other
    terms."""
    common = ["--token_elision", "regate", "--regate_ref_cache", str(run_setup["cache"]), "--regate_keep_ratio"]
    schedule = ["--regate_warmup_steps", "1", "--regate_cycle_steps", "3", "--regate_dense_steps", "1"]
    sparse = _train_it(run_setup, "sparse", *common, "0.5", *schedule)
    assert sparse[:2] == pytest.approx(plain[:2], rel=1e-5)
    assert sparse[2] != pytest.approx(plain[2], rel=1e-4)


def test_launcher_resumes_only_with_a_fresh_ema(run_setup):
    """VideoChat2's checkpoints do not hold the EMA: its auto-resume stops, naming the flag, unless told to
    continue with an empty one."""
    common = ["--token_elision", "regate", "--regate_ref_cache", str(run_setup["cache"])]
    _train_it(run_setup, "resumed", *common)
    argv = [*LAUNCH, str(run_setup["root"] / "config.py"), "output_dir", str(run_setup["root"] / "resumed"), "epochs"]
    env = {**os.environ, "PYTHONPATH": f"{RECREATION}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, *argv, "2", *common], capture_output=True, text=True, cwd=RECREATION, env=env, timeout=600
    )
    assert done.returncode != 0
    assert "ResumeStateError: VideoChat2 resumes at step 4" in done.stderr
    assert "--regate_resume_without_state fresh" in done.stderr.splitlines()[-1]
    fresh = [*common, "--regate_resume_without_state", "fresh"]
    losses = _train_it(run_setup, "resumed", "epochs", "2", *fresh)
    assert len(losses) == 2 * len(ANNOTATIONS) // 2  # the first epoch's four steps, then the resumed epoch's
