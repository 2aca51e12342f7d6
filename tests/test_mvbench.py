"""MVBench: frame rules against hand-computed test vectors, readers against the frames we wrote, answer rules
against the spec's worked cases, aggregation, and one resumable end-to-end run with a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from regate_plugin.eval import MVBenchError, aggregate, check_ans, get_protocol, load_mvbench
from regate_plugin.eval.frames import (
    VisualSource,
    official_frame_indices,
    sample_official,
    videollama2_frame_indices,
)
from regate_plugin.eval.mvbench import Question

from regate_plugin.cli import main as regate

from .eval_fixtures import write_frame_folder, write_gif, write_mvbench, write_tiny_hf_llava, write_video
from .tokenizers_fixture import write_bpe_chat_tokenizer


def test_frame_indices_reproduce_the_spec_vectors():
    # official `get_index` (docs/EVAL.md, "The official protocol")
    assert official_frame_indices(299, 30, 16) == [
        9,
        28,
        46,
        65,
        84,
        102,
        121,
        140,
        159,
        177,
        196,
        215,
        233,
        252,
        271,
        289,
    ]
    assert official_frame_indices(299, 30, 16, (2.0, 6.5)) == [
        64,
        72,
        81,
        89,
        98,
        106,
        115,
        123,
        132,
        140,
        148,
        157,
        165,
        174,
        182,
        191,
    ]
    folder = official_frame_indices(120, 3, 16, (10.2, 25.7), first_idx=1)
    assert folder[:3] == [32, 35, 38] and folder[-2:] == [72, 75]
    # VideoLLaMA2 `frame_sample` (docs/EVAL.md, "The VideoLLaMA2 protocol")
    assert videollama2_frame_indices(300, 30, 16) == [
        9,
        28,
        47,
        65,
        84,
        103,
        121,
        140,
        159,
        178,
        196,
        215,
        234,
        252,
        271,
        290,
    ]
    assert videollama2_frame_indices(300, 30, 16, (2.0, 6.5)) == [
        63,
        72,
        80,
        89,
        97,
        105,
        114,
        122,
        131,
        139,
        148,
        156,
        164,
        173,
        181,
        190,
    ]
    positions = videollama2_frame_indices(120, 3, 16, (10.2, 25.7))
    assert positions[:2] == [30, 33] and positions[-2:] == [72, 75]
    # bound cleaning: swapped and equal bounds
    assert videollama2_frame_indices(300, 30, 4, (6.5, 2.0)) == videollama2_frame_indices(300, 30, 4, (2.0, 6.5))
    assert videollama2_frame_indices(300, 30, 4, (3.0, 3.0)) == videollama2_frame_indices(300, 30, 4, (3.0, 4.0))


def _levels(frames) -> list[float]:
    return [float(np.asarray(f).mean()) for f in frames]


def test_readers_return_the_frames_asked_for(tmp_path):
    levels = list(range(0, 240, 6))
    for source in (
        VisualSource(write_video(tmp_path / "v.mp4", levels)),
        VisualSource(write_gif(tmp_path / "g.gif", levels)),
        VisualSource(write_frame_folder(tmp_path / "f", levels)),
    ):
        count, _ = source.probe()
        assert count == len(levels), source.kind
        got = _levels(source.read([0, 7, 7, 39]))
        assert got == pytest.approx([levels[i] for i in (0, 7, 7, 39)], abs=4), source.kind
    assert VisualSource(tmp_path / "f").probe()[1] == 3.0 and VisualSource(tmp_path / "g.gif").probe()[1] == 25.0
    # official frame folders are read by 1-based file number
    frames = sample_official(VisualSource(tmp_path / "f"), 4, (1.0, 9.0))
    numbers = official_frame_indices(len(levels), 3.0, 4, (1.0, 9.0), first_idx=1)
    assert _levels(frames) == pytest.approx([levels[k - 1] for k in numbers], abs=4)


@pytest.mark.parametrize(
    ("pred", "correct"),
    [
        ("(A) Ate the medicine.", True),
        ("(A", True),
        ("(A.", True),
        ("((A)", True),
        ("(a)ate", True),
        ("(", True),
        ("(B) Ate the medicine.", False),
        ("(Answer: A", False),
    ],
)
def test_check_ans_worked_cases(pred, correct):
    assert check_ans(pred, "(A) Ate the medicine.") is correct


def _question(n: int = 4, answer: int = 0) -> Question:
    return Question("Action Count", 0, None, "How many?", tuple(f"opt{i}" for i in range(n)), answer, None)


def test_official_parse_takes_the_first_line_and_counts_empty_outputs():
    protocol = get_protocol("official")
    q = _question(answer=1)
    assert protocol.parse(q, "B) opt1\nmore")[1] is True
    assert protocol.parse(q, "A) opt0")[1] is False
    parsed, correct = protocol.parse(q, "")
    assert correct is True and parsed.fallback == "empty"  # the notebook's quirk, counted
    prompt = protocol.prompt(q)
    assert prompt.prefill == "Best option:(" and prompt.max_new_tokens == 100 and prompt.stop == ("###",)
    assert prompt.user.startswith(prompt.system) and prompt.user.endswith("(D) opt3\nOnly give the best option.\n")


@pytest.mark.parametrize(
    ("output", "letter", "fallback"),
    [
        ("(B) opt1", "B", ""),
        ("Based on the video", "B", ""),
        ("A person walks", "A", ""),
        ("The answer is C", "C", ""),
        ("A, then B", "C", "option_c"),
        ("it is opt3 for sure", "D", "substring"),
        ("no idea", "C", "option_c"),
        ("E", "C", "option_c"),
    ],
)
def test_videollama2_parse_follows_mvbench_dump(output, letter, fallback):
    parsed, correct = get_protocol("videollama2").parse(_question(answer=2), output)
    assert (parsed.letter, parsed.fallback) == (letter, fallback)
    assert correct is (letter == "C")


def test_videollama2_prompt():
    prompt = get_protocol("videollama2").prompt(_question(n=3))
    assert prompt.user == (
        "Question: How many?\nOptions:\n(A) opt0\n(B) opt1\n(C) opt2\nAnswer with the option's "
        "letter from the given choices directly and only give the best option."
    )
    assert prompt.system is None and prompt.prefill == "" and prompt.max_new_tokens == 2048
    # mm_infer: Llama-2's system turn for the Mistral/Mixtral model types only
    for model_type in ("videollama2", "videollama2_mistral", "videollama2_mixtral"):
        system = get_protocol("videollama2", model_type=model_type).prompt(_question()).system
        assert system.startswith("<<SYS>>\nYou are a helpful") and system.endswith("false information.\n<</SYS>>")
    assert get_protocol("videollama2", model_type="videollama2_qwen2").prompt(_question()).system is None


def test_aggregate_is_sample_weighted_and_labels_missing_tasks():
    records = [{"task": "Action Count", "correct": c} for c in (1, 1, 0, 0)] + [{"task": "State Change", "correct": 1}]
    result = aggregate(records)
    assert result.average == pytest.approx(60.0) and result.task_mean == pytest.approx(75.0)
    assert result.label == "2-task" and len(result.missing) == 18
    assert result.leaderboard()["Avg"] == pytest.approx(60.0)


def test_loader_checks_records_and_missing_tasks(tmp_path):
    root = write_mvbench(tmp_path / "mvbench", per_task=2)
    with pytest.raises(MVBenchError, match="--allow-missing"):
        load_mvbench(root)
    data = load_mvbench(root, allow_missing=True)
    assert data.counts == {"Action Sequence": 2, "Object Existence": 2, "Episodic Reasoning": 2}
    assert len(data.missing) == 17 and "Fine-grained Pose" in data.missing
    assert all(q.video.exists() for q in data.questions)  # including the data0613 layout
    path = root / "json" / "object_existence.json"
    records = json.loads(path.read_text())
    records[1]["answer"] = "not an option"
    path.write_text(json.dumps(records))
    with pytest.raises(MVBenchError, match=r"object_existence.json record 1: answer 'not an option'"):
        load_mvbench(root, allow_missing=True)


def test_scores_videollama2_prediction_files_like_its_eval_script(tmp_path, capsys):
    lines = [
        {"vid": f"v{i}", "task_type": "Action Count" if i < 3 else "Moving Count", "pred": i % 2, "gt": 0}
        for i in range(5)
    ]
    pred = tmp_path / "answers.json"
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert regate(["eval", "score", "mvbench", "--pred", str(pred), "--out", str(tmp_path / "m")]) == 0
    metrics = json.loads((tmp_path / "m/metrics.json").read_text())
    # eval_video_mcqa_mvbench.py: per task mean of pred == gt, overall over all lines
    assert metrics["per_task"] == {"Action Count": pytest.approx(200 / 3), "Moving Count": pytest.approx(50.0)}
    assert metrics["avg"] == pytest.approx(60.0)


def test_end_to_end_run_resumes_and_rescores(tmp_path, capsys):
    root = write_mvbench(tmp_path / "mvbench", per_task=2)
    model = write_tiny_hf_llava(tmp_path / "model", write_bpe_chat_tokenizer(tmp_path / "tok", "chatml"))
    out = tmp_path / "out"
    args = [
        "eval",
        "mvbench",
        "--model",
        str(model),
        "--data-root",
        str(root),
        "--allow-missing",
        "--num-frames",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert regate(args) == 0
    predictions = out / "predictions-official.jsonl"
    first = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(first) == 6 and {r["task"] for r in first} == {
        "Action Sequence",
        "Object Existence",
        "Episodic Reasoning",
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label"] == "3-task" and metrics["total"] == 6 and len(metrics["missing"]) == 17
    assert metrics["correct"] == sum(r["correct"] for r in first)

    # a killed run: two records lost and a torn line; the rerun completes it without duplicates
    lines = predictions.read_text().splitlines()
    predictions.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    assert regate(args) == 0
    again = [
        json.loads(line) for line in predictions.read_text().splitlines() if line.startswith("{") and line.endswith("}")
    ]
    assert sorted(r["uid"] for r in again) == sorted(r["uid"] for r in first)
    assert {r["uid"]: r["output"] for r in again} == {r["uid"]: r["output"] for r in first}  # greedy is deterministic

    assert (
        regate(
            [
                "eval",
                "score",
                "mvbench",
                "--pred",
                str(predictions),
                "--data-root",
                str(root),
                "--out",
                str(tmp_path / "rescored"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "rescored/metrics.json").read_text())["avg"] == pytest.approx(metrics["avg"])
