"""The benchmark scripts still run (at a tiny size) and report what their docs say; no timing is asserted."""

import json
import subprocess
import sys

from .test_templates import REPO


def _run(script: str, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


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
