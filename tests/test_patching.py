"""`regate patch apply`: the shipped diffs add lines only, land on the pinned upstream file, and are refused
elsewhere. The LLaVA diff is applied to the real upstream train.py installed in the upstream-LLaVA env."""

from __future__ import annotations

import ast
import hashlib
import shutil
import subprocess

import pytest

from regate_plugin.cli import main as regate
from regate_plugin.patching import PATCHES, PatchError, apply_patch, apply_unified_diff

from .test_templates import LLAVA_PYTHON, REPO


def test_unified_diff_inserts_lines_between_matching_context():
    original = "a\nb\nc\nd\n"
    diff = "--- a/f\n+++ b/f\n@@ -1,3 +1,5 @@\n a\n b\n+x\n+y\n c\n"
    assert apply_unified_diff(original, diff) == "a\nb\nx\ny\nc\nd\n"
    with pytest.raises(PatchError, match="context line 2"):
        apply_unified_diff("a\nB\nc\n", diff)
    with pytest.raises(PatchError, match="only add lines"):
        apply_unified_diff(original, "@@ -1,2 +1,1 @@\n a\n-b\n")


@pytest.mark.parametrize("codebase", sorted(PATCHES))
def test_shipped_diffs_add_lines_only_and_name_the_plugin(codebase):
    diff = PATCHES[codebase].diff_text()
    body = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert body and all(line.startswith("+") for line in body)
    assert all("regate-plugin" in line or not line[1:].strip() for line in body)
    assert (REPO / "patches" / PATCHES[codebase].diff_name).read_text() == diff  # patches/ is the shipped folder


@pytest.fixture()
def llava_checkout(tmp_path):
    installed = subprocess.run(
        [str(LLAVA_PYTHON), "-c", "import llava.train.train as t; print(t.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    checkout = tmp_path / "LLaVA"
    (checkout / "llava/train").mkdir(parents=True)
    shutil.copy(installed, checkout / "llava/train/train.py")
    return checkout


def test_llava_diff_applies_to_the_pinned_file_once(llava_checkout, capsys):
    target = llava_checkout / "llava/train/train.py"
    before = target.read_text()
    assert hashlib.sha256(before.encode()).hexdigest() == PATCHES["llava"].original_sha256
    assert regate(["patch", "apply", "llava", "--repo", str(llava_checkout)]) == 0
    after = target.read_text()
    ast.parse(after)
    added = [line for line in after.splitlines() if line not in before.splitlines()]
    assert len(added) == 3 and all("regate-plugin" in line for line in added)
    assert "already has" in apply_patch("llava", llava_checkout)
    assert target.read_text() == after


def test_a_file_from_another_commit_is_refused_and_left_alone(llava_checkout, capsys):
    target = llava_checkout / "llava/train/train.py"
    changed = target.read_text().replace("lora_r: int = 64", "lora_r: int = 128")
    target.write_text(changed)
    assert regate(["patch", "apply", "llava", "--repo", str(llava_checkout)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "haotian-liu/LLaVA@c121f04" in err and "regate_plugin.launch llava" in err
    assert target.read_text() == changed
    recreation = REPO / "tests/videollama2_recreation"
    with pytest.raises(PatchError, match="DAMO-NLP-SG/VideoLLaMA2@c0bb03a"):
        apply_patch("videollama2", recreation)
    with pytest.raises(PatchError, match="not found"):
        apply_patch("llava", llava_checkout / "nowhere")
