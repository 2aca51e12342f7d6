"""`regate eval <benchmark> --check-data --data-root D`: exit 0 on a complete data root, and on one with a file or
folder taken away, exit 1 naming exactly the paths that went missing (on the fixtures written in each official
layout)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from regate_plugin.eval.mvbench import TASKS, missing_paths

from regate_plugin.cli import main as regate

from .eval_fixtures import write_mvbench
from .image_fixtures import WRITERS

# MME's 14 subtask folders (MME_Benchmark_release_version); the fixture writes three of them
MME_SUBTASKS = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip
# per benchmark, a file or folder of its official layout that is not an image
LAYOUT_PATHS = {
    "pope": "coco/coco_pope_random.json",
    "mme": "artwork",
    "scienceqa": "pid_splits.json",
    "seed": "SEED-Bench.json",
    "vizwiz": "val.json",
    "textvqa": "TextVQA_Rosetta_OCR_v0.2_val.json",
    "gqa": "testdev_balanced_questions.json",
    "mmbench": "mmbench_dev_20230712.tsv",
}


def _check(capsys, benchmark: str, root: Path, *flags: str) -> tuple[int, list[str]]:
    """The exit status and the paths listed (the lines after the first)."""
    status = regate(["eval", benchmark, "--check-data", "--data-root", str(root), *flags])
    printed = capsys.readouterr().out.strip().splitlines()
    return status, [line.strip() for line in printed[1:]]


def _complete(benchmark: str, root: Path) -> Path:
    WRITERS[benchmark](root)
    if benchmark == "mme":  # the other 11 subtasks, as copies of one the fixture wrote
        for subtask in MME_SUBTASKS:
            if not (root / subtask).exists():
                shutil.copytree(root / "existence", root / subtask)
    return root


@pytest.mark.parametrize("benchmark", sorted(WRITERS))
def test_a_complete_root_passes_and_a_removed_file_or_folder_is_named(tmp_path, capsys, benchmark):
    root = _complete(benchmark, tmp_path / benchmark)
    assert _check(capsys, benchmark, root) == (0, [])

    removed = root / LAYOUT_PATHS[benchmark]
    shutil.rmtree(removed) if removed.is_dir() else removed.unlink()
    assert _check(capsys, benchmark, root) == (1, [str(removed)])


@pytest.mark.parametrize("benchmark", sorted(set(WRITERS) - {"mme", "mmbench"}))  # no image files of their own
def test_a_removed_image_is_named_by_its_path(tmp_path, capsys, benchmark):
    root = _complete(benchmark, tmp_path / benchmark)
    images = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".png"))
    images[-1].unlink()
    assert _check(capsys, benchmark, root) == (1, [str(images[-1])])


def test_mme_names_the_subtask_folders_it_lacks(tmp_path, capsys):
    root = WRITERS["mme"](tmp_path / "mme")
    absent = [str(root / s) for s in MME_SUBTASKS if s not in ("existence", "artwork", "code_reasoning")]
    assert _check(capsys, "mme", root) == (1, absent)


MVBENCH_PRESENT = ["Object Existence", "Action Sequence", "Episodic Reasoning"]  # what write_mvbench writes


def test_mvbench_names_missing_task_files_videos_and_frame_folders(tmp_path, capsys):
    root = write_mvbench(tmp_path / "mvbench")
    assert _check(capsys, "mvbench", root, "--tasks", *MVBENCH_PRESENT) == (0, [])

    absent = [str(root / "json" / t.json_file) for t in TASKS if t.name not in MVBENCH_PRESENT]
    absent += [
        str(root / "video" / folder)
        for folder in (
            "ssv2_video",
            "Moments_in_Time_Raw/videos",
            "FunQA_test/test",
            "perception/videos",
            "sta/sta_video",
            "scene_qa/video",
            "nturgbd",
            "vlnqa",
        )
    ]
    assert sorted(map(str, missing_paths(root))) == sorted(absent)
    status, listed = _check(capsys, "mvbench", root)  # the first 20, then how many more
    assert status == 1 and set(listed[:20]) < set(absent) and listed[20] == f"... and {len(absent) - 20} more"

    video = root / "video" / "clevrer" / "video_validation" / "clip1.mp4"  # Object Existence
    frames = root / "video" / "tvqa" / "frames_fps3_hq" / "ep2"  # Episodic Reasoning
    video.unlink()
    shutil.rmtree(frames)
    assert _check(capsys, "mvbench", root, "--tasks", *MVBENCH_PRESENT) == (1, [str(video), str(frames)])


@pytest.mark.parametrize("flags", [[], ["--model", "m", "--check-data"]])
def test_check_data_replaces_the_model(tmp_path, flags):
    with pytest.raises(SystemExit) as exited:
        regate(["eval", "pope", "--data-root", str(tmp_path), *flags])
    assert exited.value.code == 2
