"""The top-level eval/, model_zoo/ and patches/ folders install inside `regate_plugin`, editable and as a wheel."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .test_environments import normalised, pins_of
from .test_templates import LLAVA_PYTHON, VIDEOLLAMA2_PYTHON

REPO = Path(__file__).resolve().parents[1]

# Imports every relocated package and reads its data the way the code does; prints where each came from.
PROBE = """
import importlib.util, json
from importlib import resources
import regate_plugin.eval, regate_plugin.eval.benchmarks, regate_plugin.model_zoo
from regate_plugin.model_zoo import entries, get_entry, verify_files
from regate_plugin.patching import PATCHES
assert importlib.util.find_spec("eval") is None and importlib.util.find_spec("model_zoo") is None
verify_files(get_entry("regate-demo-tiny-regate"))
print(json.dumps({
    "eval": regate_plugin.eval.__file__,
    "model_zoo": regate_plugin.model_zoo.__file__,
    "entries": len(entries()),
    "patches": sorted(len(p.diff_text()) > 0 for p in PATCHES.values()),
}))
"""


def _probe(tmp_path: Path, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _expected_entries() -> int:
    return len(list((REPO / "model_zoo" / "entries").glob("*.json")))


def test_the_editable_install_maps_the_top_level_folders_into_the_package(tmp_path):
    found = _probe(tmp_path)
    assert Path(found["eval"]) == REPO / "eval" / "__init__.py"
    assert Path(found["model_zoo"]) == REPO / "model_zoo" / "__init__.py"
    assert found["entries"] == _expected_entries() and found["patches"] == [True, True]


# What transformers reads from a checkpoint directory besides its weights: each directory must hold its own copy, so
# the small config and tokenizer files of checkpoints with the same tokenizer and architecture repeat (< 20 KB each).
CHECKPOINT_METADATA = {
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "processor_config.json",
}


def _duplicated_contents(wheel: Path) -> list[list[str]]:
    """Groups of files in `wheel` with the same bytes, leaving out the checkpoint metadata that must repeat."""
    by_digest: dict[str, list[str]] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.endswith("/") and Path(name).name not in CHECKPOINT_METADATA:
                by_digest.setdefault(hashlib.sha256(archive.read(name)).hexdigest(), []).append(name)
    return [sorted(names) for names in by_digest.values() if len(names) > 1]


def test_a_wheel_holds_the_folders_inside_the_package_and_runs_from_them(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("regate_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"regate_plugin", wheel.name.split("-py")[0] + ".dist-info"}, top
    for required in (
        "regate_plugin/eval/mvbench.py",
        "regate_plugin/eval/benchmarks/pope.py",
        "regate_plugin/model_zoo/entries/regate-demo-tiny-regate.json",
        "regate_plugin/model_zoo/shipped/regate-demo-tiny-regate/model.safetensors",
        "regate_plugin/patches/llava-c121f04.diff",
    ):
        assert required in names, required
    assert _duplicated_contents(wheel) == []

    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    found = _probe(tmp_path, {"PYTHONPATH": str(target)})
    assert Path(found["eval"]) == target / "regate_plugin" / "eval" / "__init__.py"
    assert Path(found["model_zoo"]) == target / "regate_plugin" / "model_zoo" / "__init__.py"
    assert found["entries"] == _expected_entries() and found["patches"] == [True, True]


def _installed(python: Path) -> dict[str, str]:
    done = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
    )
    return {normalised(row["name"]): row["version"] for row in json.loads(done.stdout)}


def test_installing_with_dependencies_changes_no_pin_of_the_training_environments(tmp_path):
    """pip's own resolution of the wheel with its dependencies (`--dry-run --report`) into the LLaVA env and the
    VideoLLaMA2-pinned env (their constraints/ pins: transformers 4.37.2; transformers 4.40.0, numpy 1.24.4, ...):
    it may add the plugin and nothing else, and every package already there stays at its version."""

    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("regate_plugin-*.whl")
    pins = {LLAVA_PYTHON: pins_of("llava"), VIDEOLLAMA2_PYTHON: pins_of("videollama2")}
    for python, pinned in pins.items():
        assert python.exists(), f"{python} is missing: run `make setup`"
        before = _installed(python)
        assert {name: before.get(name) for name in pinned} == pinned, python
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", str(wheel)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout)
        changes = {normalised(row["metadata"]["name"]): row["metadata"]["version"] for row in report["install"]}
        assert set(changes) == {"regate-plugin"}, (python, changes)
        assert _installed(python) == before
