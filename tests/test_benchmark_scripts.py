"""The benchmark scripts still run (at a tiny size) and report what their docs say; no timing is asserted."""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import torch

from regate_plugin.store import ReferenceLossCacheWriter

from .test_templates import REPO


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_state_scale_reports_the_state_sizes(tmp_path):
    _run(
        "state_scale.py",
        "--samples",
        "3000",
        "--tokens",
        "10",
        "--repeats",
        "1",
        "--clock",
        "cpu",
        "--out",
        str(tmp_path),
    )
    result = json.loads((tmp_path / "state_scale.json").read_text())
    assert result["samples"] == 3000 and result["extrapolated"] and result["clock"] == "cpu"
    assert result["ema_bytes_per_answer_token"] == 4.0 and result["ema_fp16_bytes_per_answer_token"] == 2.0
    assert result["get_per_s"] > 0 and result["locate_per_s"] > 0


def test_step_speed_reports_every_mode_against_its_limit(tmp_path):
    _run(
        "step_speed.py", "--hidden", "64", "--layers", "1", "--shapes", "demo", "--repeats", "1", "--clock", "cpu",
        "--threads", "1", "--out", str(tmp_path),
    )  # fmt: skip
    report = json.loads((tmp_path / "step_speed_cpu.json").read_text())
    modes = report["results"]["demo"]
    assert {"labels_only", "none", "regate dense", "regate@0.5", "kept alone@0.5", "labels_only+mask@0.5"} == set(modes)
    assert report["clock"] == "cpu" and all(len(m["repeats"]) == 1 for m in modes.values())


def _budget_by_hand(rows: list[list[float]], threshold: float) -> tuple[float, float]:
    """Loops: candidates are ordinals 1..n-1; a high one adds itself and the next ordinal of its row."""
    candidates = high = kept = 0
    for losses in rows:
        chosen = set()
        for i in range(1, len(losses)):
            candidates += 1
            if losses[i] > threshold:
                high += 1
                chosen.update(j for j in (i, i + 1) if j < len(losses))
        kept += len(chosen)
    return high / candidates, kept / candidates


def test_reference_budget_counts_as_loops_do_on_a_written_cache(tmp_path):
    spec = importlib.util.spec_from_file_location("reference_budget", REPO / "benchmarks" / "reference_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(3)
    rows = [rng.choice([0.0, 0.05, 0.5, 1.4], size=n).tolist() for n in (1, 2, 5, 9, 9, 14)]
    width = max(map(len, rows))
    block = np.array([r + [math.nan] * (width - len(r)) for r in rows])
    lengths = np.array([len(r) for r in rows])
    for threshold in (0.1, 0.5, 1.0):
        assert module.budget_shares(block, lengths, threshold) == _budget_by_hand(rows, threshold)
    with ReferenceLossCacheWriter(
        tmp_path / "cache", reference="hand-built", tokenizer_fingerprint="none", reference_mode="gap", dtype="float32"
    ) as writer:
        for i, losses in enumerate(rows):
            writer.add(bytes([i]) * 16, torch.tensor(losses, dtype=torch.float32))
    done = _run("reference_budget.py", str(tmp_path / "cache"), "--thresholds", "0.1")
    high, kept = _budget_by_hand(rows, 0.1)
    assert done.stdout.splitlines()[-1].endswith(f"| {len(rows)} | {lengths.mean():.1f} | {high:.2f} / {kept:.2f}")


def test_sample_efficiency_report_names_the_missing_records(tmp_path):
    for flag in ("--suite", "--report"):
        done = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "sample_efficiency.py"), flag, "--out", str(tmp_path / "none")],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 1 and f"{tmp_path / 'none' / 'evidence.json'} does not exist" in done.stderr
        assert not (tmp_path / "none").exists()  # nothing written where nothing was read
