"""`regate precompute` and `regate cache`: values against an unbatched reference forward, kill-and-resume and
two-process runs against an uninterrupted single process, keys against the real upstream LLaVA preprocessing,
and each kind of bad input."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from regate_plugin.cli import main as regate
from regate_plugin.core import IGNORE_INDEX, sample_key
from regate_plugin.data import get_template, iter_conversations
from regate_plugin.data.templates import PLACEHOLDER_IDS
from regate_plugin.store import MANIFEST_NAME, ReferenceLossCache

from .llava_data import conversation_samples, write_json, write_tiny_reference
from .ranks import OBSERVER, assert_every_rank_closed_its_process_group, free_port
from .test_templates import LLAVA_PYTHON, REPO, VIDEOLLAMA2_PYTHON, _images, _upstream_llava
from .tokenizers_fixture import write_sentencepiece_llama

ROWS = 16  # visual rows per placeholder
MAX_LEN = 160


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    tokenizer = write_sentencepiece_llama(root / "tok")
    reference = write_tiny_reference(root / "reference", tokenizer)
    data = write_json(root / "train.json", conversation_samples(48, seed=5, long_every=11))
    return root, reference, data


def _run(*args: str) -> int:
    return regate(["precompute", "--no-progress", "--dtype", "float32", *map(str, args)])


def _cache_dict(path: Path) -> dict[bytes, torch.Tensor]:
    cache = ReferenceLossCache(path)
    return {key: cache[key] for key in cache.keys()}


def encoded_samples(reference: Path, data: Path):
    """(sample, key, ids, labels) of each sample: the `v1` template, truncated at MAX_LEN, keyed."""
    tokenizer = AutoTokenizer.from_pretrained(reference)
    template = get_template("v1")
    for sample in iter_conversations(data):
        encoded = template.encode(sample, tokenizer, MAX_LEN)
        ids, labels = encoded.input_ids[:MAX_LEN], encoded.labels[:MAX_LEN]
        yield sample, sample_key(ids, [x != IGNORE_INDEX for x in labels]), ids, labels


def _brute_force(reference: Path, data: Path, mode: str, image_rows=None) -> dict[bytes, torch.Tensor]:
    """Each sample alone through the reference's own forward: expanded ids (pad) or text ids at merged positions
    (gap). `image_rows(sample)`: the rows of each of its placeholders, in order (default: ROWS each)."""
    model = AutoModelForCausalLM.from_pretrained(reference).eval()
    tokenizer = AutoTokenizer.from_pretrained(reference)
    expected = {}
    for sample, key, ids, labels in encoded_samples(reference, data):
        merged_ids, merged_labels, positions = [], [], []
        per_placeholder = iter(image_rows(sample)) if image_rows else itertools.repeat(ROWS)
        for token, label in zip(ids, labels):
            rows = next(per_placeholder) if token in PLACEHOLDER_IDS else 1
            start = len(positions)
            positions += range(start, start + rows)
            merged_ids += [token] * rows
            merged_labels += [label] * rows
        merged_ids, merged_labels, positions = merged_ids[:MAX_LEN], merged_labels[:MAX_LEN], positions[:MAX_LEN]
        if mode == "gap":
            keep = [t not in PLACEHOLDER_IDS for t in merged_ids]
        else:
            keep = [True] * len(merged_ids)
            merged_ids = [tokenizer.unk_token_id if t in PLACEHOLDER_IDS else t for t in merged_ids]
        x = torch.tensor([t for t, k in zip(merged_ids, keep) if k])
        y = torch.tensor([t for t, k in zip(merged_labels, keep) if k])
        pos = torch.tensor([p for p, k in zip(positions, keep) if k])
        with torch.no_grad():
            logits = model(input_ids=x[None], position_ids=pos[None]).logits[0].float()
        targets = y[1:]
        sel = targets != IGNORE_INDEX
        expected[key] = F.cross_entropy(logits[:-1][sel], targets[sel], reduction="none")
    return expected


@pytest.mark.parametrize("mode", ["gap", "pad"])
def test_losses_equal_the_unbatched_reference(setup, tmp_path, mode):
    root, reference, data = setup
    out = tmp_path / "cache"
    code = _run(
        "--data",
        data,
        "--reference",
        reference,
        "--template",
        "v1",
        "--out",
        out,
        "--visual-tokens",
        ROWS,
        "--max-length",
        MAX_LEN,
        "--mode",
        mode,
        "--batch-tokens",
        700,
    )
    assert code == 0
    got, want = _cache_dict(out), _brute_force(reference, data, mode)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-5)
    summary = json.loads((out / "precompute_summary.json").read_text())
    assert summary["answer_tokens"] == sum(v.numel() for v in want.values())
    assert summary["empty"] == sum(v.numel() == 0 for v in want.values())
    assert summary["truncated"] > 0 and not (out / "parts").exists()
    assert regate(["cache", "verify", str(out)]) == 0


def _uninterrupted(setup, tmp_path_factory) -> dict[bytes, torch.Tensor]:
    root, reference, data = setup
    out = root / "reference_cache"
    if not (out / MANIFEST_NAME).exists():  # one thread, as each torchrun rank has: CPU sums depend on it
        subprocess.run(
            _cli(*_windowed_args(data, reference, out)),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            check=True,
            timeout=600,
        )
    return _cache_dict(out)


PRECOMPUTE = ["precompute", "--no-progress", "--dtype", "float32"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "regate_plugin.cli", *PRECOMPUTE, *map(str, args)]


def _windowed_args(data, reference, out) -> list:
    """The small-window, small-batch run that the uninterrupted and the torchrun caches are both built with."""
    return [
        *("--data", data, "--reference", reference, "--template", "v1", "--out", out),
        *("--visual-tokens", ROWS, "--max-length", MAX_LEN, "--window", 4, "--batch-tokens", 400),
    ]


def test_killed_run_resumes_to_identical_losses(setup, tmp_path, tmp_path_factory):
    root, _, data = setup
    # A larger reference so the run is still going when it is killed.
    reference = write_tiny_reference(tmp_path / "reference", root / "tok", hidden=256, layers=6)
    big = write_json(tmp_path / "train.json", conversation_samples(160, seed=6, long_every=11))
    args = [
        "--data",
        big,
        "--reference",
        reference,
        "--template",
        "v1",
        "--visual-tokens",
        ROWS,
        "--max-length",
        MAX_LEN,
        "--window",
        4,
        "--batch-tokens",
        400,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(_cli(*args, "--out", uninterrupted), env=env, check=True, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", out), env=env)
    part_manifest = out / "parts" / "rank-00000" / MANIFEST_NAME
    deadline = time.time() + 300
    while time.time() < deadline:
        if part_manifest.exists() and len(json.loads(part_manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(json.loads(part_manifest.read_text())["shards"])
    assert 3 <= committed < 40, "the run must be killed part-way"
    again = subprocess.run(_cli(*args, "--out", out), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    subprocess.run(_cli(*args, "--out", out, "--resume"), env=env, check=True, timeout=600)
    summary = json.loads((out / "precompute_summary.json").read_text())
    assert summary["already_done"] >= committed * 4 - 4 and summary["scored"] + summary["already_done"] == 160
    want, got = _cache_dict(uninterrupted), _cache_dict(out)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_two_processes_equal_one(setup, tmp_path, tmp_path_factory):
    root, reference, data = setup
    want = _uninterrupted(setup, tmp_path_factory)
    out = tmp_path / "two"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "regate_plugin.cli",
    ]
    args = [*PRECOMPUTE, *_windowed_args(data, reference, out)]
    exits = tmp_path / "exits"
    exits.mkdir()
    done = subprocess.run(
        [*torchrun, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(OBSERVER), "REGATE_RANK_EXIT_DIR": str(exits)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_every_rank_closed_its_process_group(exits, 2)
    got = _cache_dict(out)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["samples"] == len(want) and not (out / "parts").exists()
    assert json.loads((out / "precompute_summary.json").read_text())["scored"] == len(want)


def test_bad_inputs_are_named_and_nothing_wrong_is_written(setup, tmp_path, capsys):
    root, reference, data = setup
    samples = conversation_samples(6, seed=7)
    samples[3] = {"id": "broken", "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}
    bad = write_json(tmp_path / "bad.json", samples)
    out = tmp_path / "cache"
    common = ["--reference", reference, "--template", "v1", "--visual-tokens", ROWS, "--max-length", MAX_LEN]
    assert _run("--data", bad, "--out", out, *common) == 2
    err = capsys.readouterr().err
    assert "bad.json:" in err and "'broken'" in err and "turn 1" in err
    assert not (out / MANIFEST_NAME).exists() or ReferenceLossCache(out).manifest.samples == 0
    assert _run("--data", bad, "--out", out, "--skip-bad", "--overwrite", *common) == 0
    summary = json.loads((out / "precompute_summary.json").read_text())
    assert len(summary["bad"]) == 1 and summary["samples"] == 5 and len(ReferenceLossCache(out)) == 5
    # A sample with a placeholder but no visual row count.
    assert _run("--data", data, "--out", tmp_path / "c2", "--reference", reference, "--template", "v1") == 2
    assert "--visual-tokens" in capsys.readouterr().err
    # Another reference (or tokenizer) into the same directory is refused unless --overwrite.
    other = write_tiny_reference(tmp_path / "other", root / "tok", seed=1)
    assert _run("--data", bad, "--out", out, "--skip-bad", "--resume", *common[:1], other, *common[2:]) == 2
    assert "made differently" in capsys.readouterr().err
    assert _run("--data", bad, "--out", out, "--skip-bad", "--overwrite", *common[:1], other, *common[2:]) == 0
    assert ReferenceLossCache(out).manifest.reference == str(other)


def test_cache_verify_and_stats(setup, tmp_path, tmp_path_factory, capsys):
    root = setup[0]
    _uninterrupted(setup, tmp_path_factory)
    cache = root / "reference_cache"
    assert regate(["cache", "stats", str(cache), "--plot", str(tmp_path / "h.png")]) == 0
    printed = capsys.readouterr().out
    assert "loss p50" in printed and (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in cache.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    shard = sorted(copy.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert regate(["cache", "verify", str(copy)]) == 1
    assert shard.name in capsys.readouterr().out


def test_precompute_in_upstream_env_matches_upstream_keys(tmp_path):
    """LLaVA trains on transformers 4.37: run precompute there, and its keys must be those of the real upstream
    dataset + collator, with one loss per target the merged (and truncated) sequence supervises."""
    tokenizer = write_sentencepiece_llama(tmp_path / "tok")
    data = write_json(tmp_path / "train.json", conversation_samples(30, seed=8, long_every=7))
    upstream = _upstream_llava(tokenizer, data, _images(tmp_path / "img", 30), "v1", MAX_LEN)["upstream"]
    reference = tmp_path / "reference"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [str(LLAVA_PYTHON), str(REPO / "tests/upstream_llava/make_reference.py"), str(tokenizer), str(reference)],
        check=True,
        env=env,
        capture_output=True,
    )
    out = tmp_path / "cache"
    done = subprocess.run(
        [
            str(LLAVA_PYTHON),
            "-m",
            "regate_plugin.cli",
            "precompute",
            "--no-progress",
            "--data",
            str(data),
            "--reference",
            str(reference),
            "--template",
            "v1",
            "--out",
            str(out),
            "--visual-tokens",
            str(ROWS),
            "--max-length",
            str(MAX_LEN),
            "--mode",
            "pad",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cache = ReferenceLossCache(out)
    assert len(cache) == len(upstream)
    for row in upstream:
        key = sample_key(row["input_ids"], [x != IGNORE_INDEX for x in row["labels"]])
        merged = [
            x for t, x in zip(row["input_ids"], row["labels"]) for _ in range(ROWS if t in PLACEHOLDER_IDS else 1)
        ]
        targets = sum(x != IGNORE_INDEX for x in merged[:MAX_LEN][1:])
        assert cache[key].numel() == targets


@pytest.mark.parametrize(
    "python",
    [sys.executable, LLAVA_PYTHON, VIDEOLLAMA2_PYTHON],
    ids=["transformers-5", "llava-4.37", "videollama2-4.40"],
)
def test_gap_mode_equals_an_independent_cross_entropy_on_every_pinned_transformers(setup, tmp_path, python):
    """Llama, Mistral and Qwen2 reference LLMs on each transformers the supported codebases pin (4.37 and 4.40 slice
    Mistral's and Qwen2's RoPE table to the sequence length; 4.37 Llama's too)."""
    assert Path(python).exists(), f"{python} is missing: run `make setup`"
    root, _, data = setup
    done = subprocess.run(
        [str(python), str(REPO / "tests" / "gap_reference_check.py"), str(root / "tok"), str(data), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    refused = errors.pop("refused_unwidenable")
    assert sorted(errors) == ["llama", "mistral", "qwen2"]
    assert max(errors.values()) < 1e-4, errors
    # A table that cannot be widened is refused before anything is written (4.37 and 4.40 only: 5.x never slices).
    assert refused is (None if python == sys.executable else True)
