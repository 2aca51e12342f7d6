"""Damaged answer and prediction files (docs/RELIABILITY.md): answers pair with questions by id, never by position;
a line that does not parse is named and its question counts as unanswered, scored by each benchmark's own rule."""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import shutil
from pathlib import Path

import pytest
from regate_plugin.eval import BENCHMARKS, BenchmarkError, get_benchmark, get_protocol, load_mvbench
from regate_plugin.eval.mvbench import prediction_record

from regate_plugin.cli import main as regate

from .eval_fixtures import write_mvbench, write_tiny_hf_llava
from .image_fixtures import WRITERS, write_pope
from .test_image_benchmarks import VARIED, parse_eval_pope
from .test_launch_llava import _llava
from .tokenizers_fixture import write_bpe_chat_tokenizer


def _lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _tear(path: Path, line: int) -> str:
    """Cut line `line` (1-based) of `path` to its first half, as a write that died part-way leaves it."""
    lines = path.read_text().splitlines(keepends=True)
    torn = lines[line - 1]
    lines[line - 1] = torn[: len(torn) // 2] + ("\n" if line < len(lines) else "")
    path.write_text("".join(lines))
    return torn


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


EVAL_POPE = r"""
import contextlib, io, sys
from llava.eval import eval_pope
work = sys.argv[1]
sys.argv = ["eval_pope.py", "--annotation-dir", work + "/labels", "--question-file", work + "/questions.jsonl",
            "--result-file", work + "/answers.jsonl"]
buffer = io.StringIO()
with contextlib.redirect_stdout(buffer):
    exec(open(eval_pope.__file__).read(), {"__name__": "__main__"})
print(buffer.getvalue())
"""


def _upstream_pope(work: Path, label_dir: Path, questions: list[dict], answers: list[dict]) -> dict:
    """llava-torch's own `eval_pope.py` (positional pairing) on files where position and id agree."""
    work.mkdir()
    shutil.copytree(label_dir, work / "labels")
    _lines(work / "questions.jsonl", questions)
    _lines(work / "answers.jsonl", answers)
    (work / "eval_pope_run.py").write_text(EVAL_POPE)
    return parse_eval_pope(_llava(str(work / "eval_pope_run.py"), str(work)).stdout)


def test_pope_torn_line_in_the_middle_scores_the_intact_lines_as_eval_pope(tmp_path):
    root = write_pope(tmp_path / "pope", per_category=6)
    pope = get_benchmark("pope", root)
    questions = pope.load()
    answers = [
        {"question_id": q.question_id, "prompt": q.text, "text": VARIED[(i * 5) % 7], "metadata": {}}
        for i, q in enumerate(questions)
    ]
    pred = _lines(tmp_path / "answers.jsonl", answers)
    torn_line = 9  # popular/3: the third question of the second split
    _tear(pred, torn_line)
    assert (
        regate(["eval", "score", "pope", "--pred", str(pred), "--data-root", str(root), "--out", str(tmp_path / "m")])
        == 0
    )
    ours = _metrics(tmp_path / "m")

    # the reference: eval_pope.py on the intact lines, with the torn question's label line left out of its split
    torn = questions[torn_line - 1]
    assert torn.question_id == "popular/3"
    labels = tmp_path / "labels"
    shutil.copytree(root / "coco", labels)
    kept = [
        line for line in (labels / "coco_pope_popular.json").read_text().splitlines() if '"question_id": 3,' not in line
    ]
    assert len(kept) == 5
    (labels / "coco_pope_popular.json").write_text("\n".join(kept) + "\n")
    official = _upstream_pope(
        tmp_path / "upstream",
        labels,
        [
            {"question_id": q.question_id, "image": q.image.name, "text": q.text, "category": q.meta["category"]}
            for q in questions
        ],
        [a for a in answers if a["question_id"] != torn.question_id],
    )
    assert ours["groups"] == official and set(official) == {"adversarial", "popular", "random"}
    assert ours["counts"] == {"adversarial": 6, "popular": 5, "random": 6}
    assert ours["unanswered"] == 1
    assert len(ours["unreadable"]) == 1 and f"{pred} line {torn_line}: not valid JSON" in ours["unreadable"][0]


def test_pope_all_correct_file_with_a_torn_line_scores_100_on_every_split(tmp_path, capsys):
    """Re-paired by position, the answers after the torn line met the next question's label (66.67 on a split)."""
    root = write_pope(tmp_path / "pope", per_category=6)
    questions = get_benchmark("pope", root).load()
    pred = _lines(
        tmp_path / "answers.jsonl",
        [{"question_id": q.question_id, "prompt": q.text, "text": q.answer.capitalize()} for q in questions],
    )
    _tear(pred, 3)
    assert (
        regate(["eval", "score", "pope", "--pred", str(pred), "--data-root", str(root), "--out", str(tmp_path / "m")])
        == 0
    )
    metrics = _metrics(tmp_path / "m")
    assert {split: (m["acc"], m["f1"]) for split, m in metrics["groups"].items()} == {
        split: (100.0, 100.0) for split in ("adversarial", "popular", "random")
    }
    printed = capsys.readouterr().out
    assert "unanswered: 1" in printed and f"{pred} line 3: not valid JSON" in printed


def test_pope_llava_answer_file_pairs_by_id_in_any_order(tmp_path):
    """LLaVA's global question ids go through --question-file; the answers' order does not matter."""
    root = write_pope(tmp_path / "pope", per_category=6)
    questions = get_benchmark("pope", root).load()
    question_file = _lines(
        tmp_path / "llava_pope_test.jsonl",
        [
            {"question_id": n, "image": q.image.name, "text": q.text, "category": q.meta["category"]}
            for n, q in enumerate(questions)
        ],
    )
    answers = [{"question_id": n, "prompt": q.text, "text": VARIED[n % 6]} for n, q in enumerate(questions)]
    in_order = _lines(tmp_path / "in_order.jsonl", answers)
    shuffled = _lines(tmp_path / "shuffled.jsonl", answers[1::2] + answers[::2])
    flags = ["--data-root", str(root), "--question-file", str(question_file)]
    assert regate(["eval", "score", "pope", "--pred", str(shuffled), *flags, "--out", str(tmp_path / "s")]) == 0
    official = _upstream_pope(
        tmp_path / "upstream", root / "coco", [json.loads(x) for x in question_file.read_text().splitlines()], answers
    )
    assert _metrics(tmp_path / "s")["groups"] == official
    assert regate(["eval", "score", "pope", "--pred", str(in_order), *flags, "--out", str(tmp_path / "o")]) == 0
    assert _metrics(tmp_path / "o")["groups"] == official


def test_pope_question_file_of_another_release_is_refused(tmp_path):
    root = write_pope(tmp_path / "pope", per_category=3)
    questions = get_benchmark("pope", root).load()
    records = [
        {"question_id": n, "image": q.image.name, "text": q.text, "category": q.meta["category"]}
        for n, q in enumerate(questions)
    ]
    records[4]["image"] = "COCO_val2014_000000999999.jpg"  # popular's second question is about another image
    question_file = _lines(tmp_path / "llava_pope_test.jsonl", records)
    pope = get_benchmark("pope", root, question_file=str(question_file))
    with pytest.raises(BenchmarkError, match=r"llava_pope_test.jsonl line 5: .* another POPE release"):
        pope.score(questions, [{"question_id": 0, "prompt": "", "text": "Yes"}])


@pytest.mark.parametrize("name", BENCHMARKS.names())
def test_a_torn_answer_line_is_named_and_its_question_unanswered(tmp_path, name):
    """For every image benchmark: a torn line in the middle scores as if that answer were absent."""
    root = WRITERS[name](tmp_path / "data")
    benchmark = get_benchmark(name, root)
    questions = benchmark.load()
    records = [  # the gold answer where it is a string, so that some are right
        {
            "question_id": q.question_id,
            "prompt": q.prompt_field,
            "text": q.answer if isinstance(q.answer, str) and i % 3 else "A",
        }
        for i, q in enumerate(questions)
    ]
    middle = len(records) // 2
    pred = _lines(tmp_path / "answers.jsonl", records)
    _tear(pred, middle + 1)
    assert (
        regate(["eval", "score", name, "--pred", str(pred), "--data-root", str(root), "--out", str(tmp_path / "m")])
        == 0
    )
    torn = _metrics(tmp_path / "m")

    without = benchmark.score(questions, records[:middle] + records[middle + 1 :])
    complete = benchmark.score(questions, records)
    expected = json.loads(json.dumps(without.to_dict()))  # as metrics.json holds it (NaN included)
    assert [json.dumps(torn[k], sort_keys=True) for k in ("metrics", "groups", "counts")] == [
        json.dumps(expected[k], sort_keys=True) for k in ("metrics", "groups", "counts")
    ]
    assert torn["unanswered"] == complete.unanswered + 1
    assert len(torn["unreadable"]) == 1 and f"{pred} line {middle + 1}: not valid JSON" in torn["unreadable"][0]


def _mvbench_predictions(root: Path) -> tuple[list, list[dict]]:
    """One official-protocol record per question: the right option for even positions, another one for odd."""
    data = load_mvbench(root, allow_missing=True)
    protocol = get_protocol("official")
    records = []
    for i, q in enumerate(data.questions):
        pick = q.answer_index if i % 2 == 0 else (q.answer_index + 1) % len(q.candidates)
        records.append(prediction_record(q, protocol, f"{q.letters[pick]}) {q.candidates[pick]}"))
    return data.questions, records


def test_mvbench_torn_last_line_is_an_unanswered_wrong_question(tmp_path, capsys):
    root = write_mvbench(tmp_path / "mvbench", per_task=2)
    questions, records = _mvbench_predictions(root)
    assert [r["correct"] for r in records] == [i % 2 == 0 for i in range(len(records))]  # as constructed
    pred = _lines(tmp_path / "predictions-official.jsonl", records)
    _tear(pred, len(records))
    out = tmp_path / "m"
    assert regate(["eval", "score", "mvbench", "--pred", str(pred), "--data-root", str(root), "--out", str(out)]) == 0
    metrics = _metrics(out)

    # the official rule: every question is in the denominator, one without a parseable answer is wrong
    lost = questions[-1]
    assert metrics["total"] == len(questions) == 6 and metrics["unanswered"] == 1
    assert metrics["correct"] == sum(i % 2 == 0 for i in range(len(questions) - 1))
    assert metrics["avg"] == pytest.approx(100 * metrics["correct"] / 6)
    in_task = [i for i, q in enumerate(questions) if q.task == lost.task]
    right = sum(i % 2 == 0 for i in in_task if i != len(questions) - 1)
    assert metrics["per_task"][lost.task] == pytest.approx(100 * right / len(in_task))
    assert metrics["counts"][lost.task] == len(in_task)
    assert f"{pred} line 6: not valid JSON" in metrics["unreadable"][0]
    printed = capsys.readouterr().out
    assert "unanswered: 1" in printed and "line 6: not valid JSON" in printed


def test_mvbench_videollama2_file_with_a_torn_line(tmp_path, capsys):
    """VideoLLaMA2's {vid, task_type, pred, gt} lines: with --data-root the lost question is counted as wrong;
    without it, the line is still named."""
    root = write_mvbench(tmp_path / "mvbench", per_task=2)
    questions = load_mvbench(root, allow_missing=True).questions
    lines = [{"vid": q.video.name, "task_type": q.task, "pred": 0, "gt": 0} for q in questions]
    pred = _lines(tmp_path / "answers.json", lines)
    _tear(pred, 3)
    assert (
        regate(
            ["eval", "score", "mvbench", "--pred", str(pred), "--data-root", str(root), "--out", str(tmp_path / "a")]
        )
        == 0
    )
    metrics = _metrics(tmp_path / "a")
    assert metrics["unanswered"] == 1 and metrics["total"] == 6 and metrics["correct"] == 5
    assert metrics["per_task"][questions[2].task] == pytest.approx(50.0)

    assert regate(["eval", "score", "mvbench", "--pred", str(pred), "--out", str(tmp_path / "b")]) == 0
    assert "line 3: not valid JSON" in _metrics(tmp_path / "b")["unreadable"][0]
    assert "pass --data-root" in capsys.readouterr().out


class _EchoRunner:
    """A runner that answers each request with its prompt's user text (a real `ModelRunner`, no model)."""

    def generate(self, requests):
        return [r.prompt.user for r in requests]


def _resume(out: Path, items: list[str]) -> list[dict]:
    from regate_plugin.eval.base import PredictionFile, Prompt, Request, run_resumable

    done = [r["id"] for r in PredictionFile.read(out, missing_ok=True).records]
    request = lambda item: Request((), Prompt(item))  # noqa: E731
    return list(
        run_resumable(
            items, str, done, request, lambda i, o: {"id": i, "out": o}, _EchoRunner(), out, 2, progress=False
        )
    )


def test_resume_cuts_a_torn_last_line_off_and_answers_its_question_again(tmp_path):
    out = tmp_path / "predictions.jsonl"
    items = [f"q{i}" for i in range(5)]
    _resume(out, items)
    complete = out.read_text()
    out.write_text(complete[: complete.index('{"id": "q3"') + 12])  # killed while writing q3
    assert [r["id"] for r in _resume(out, items)] == ["q3", "q4"]
    assert out.read_text() == complete  # nothing torn is left behind, nothing is answered twice

    out.write_text(complete.rstrip("\n"))  # killed after the last record, before its newline: kept
    assert _resume(out, items) == [] and out.read_text() == complete


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny LLaVA checkpoints of the same architecture and shapes: B is A with its weights perturbed."""
    import torch
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("models")
    a = write_tiny_hf_llava(root / "a" / "model-a", write_bpe_chat_tokenizer(root / "tok", "chatml"))
    b = root / "b" / "model-b"
    shutil.copytree(a, b)
    model = LlavaForConditionalGeneration.from_pretrained(a)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(b)
    return a, b


def _eval_pope(model: Path, root: Path, *flags: str) -> int:
    return regate(["eval", "pope", "--model", str(model), "--data-root", str(root), "--no-progress", *flags])


def _runs(answers: Path) -> list[dict]:
    return [json.loads(line)["metadata"]["run"] for line in answers.read_text().splitlines()]


def test_a_rerun_with_another_model_is_refused_and_overwrite_answers_again(tmp_path, two_models, capsys):
    """B resumed into A's answer file was scored on A's answers (exit 0). Now it is refused naming both models'
    weights; --overwrite answers every question again, and the result equals B's run into an empty directory."""
    from regate_plugin.eval.provenance import weights_fingerprint

    a, b = two_models
    root = write_pope(tmp_path / "pope", per_category=2)
    out = tmp_path / "x"
    assert _eval_pope(a, root, "--out", str(out)) == 0
    answers = out / "answers.jsonl"
    assert {r["weights"] for r in _runs(answers)} == {weights_fingerprint(a)}
    assert {r["model"] for r in _runs(answers)} == {str(a)}
    first = answers.read_text()
    capsys.readouterr()

    assert _eval_pope(b, root, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(answers) in err and "--overwrite" in err
    assert weights_fingerprint(a) in err and weights_fingerprint(b) in err
    assert answers.read_text() == first  # nothing written

    assert _eval_pope(b, root, "--out", str(tmp_path / "fresh-b")) == 0
    assert _eval_pope(b, root, "--out", str(out), "--overwrite") == 0
    assert {r["weights"] for r in _runs(answers)} == {weights_fingerprint(b)}
    assert _metrics(out) == _metrics(tmp_path / "fresh-b")
    assert [json.loads(x)["text"] for x in answers.read_text().splitlines()] == [
        json.loads(x)["text"] for x in (tmp_path / "fresh-b" / "answers.jsonl").read_text().splitlines()
    ]


def test_the_default_out_is_per_model(tmp_path, two_models, monkeypatch):
    a, b = two_models
    root = write_pope(tmp_path / "pope", per_category=2)
    monkeypatch.chdir(tmp_path)
    assert _eval_pope(a, root) == 0 and _eval_pope(b, root) == 0
    for model in (a, b):
        runs = _runs(tmp_path / "eval_out" / model.name / "pope" / "answers.jsonl")
        assert {r["model"] for r in runs} == {str(model)}


def test_a_rerun_with_other_settings_or_into_a_file_that_records_no_model_is_refused(tmp_path, two_models, capsys):
    a, _ = two_models
    root = write_pope(tmp_path / "pope", per_category=2)
    out = tmp_path / "x"
    assert _eval_pope(a, root, "--out", str(out), "--limit", "2") == 0
    capsys.readouterr()
    assert _eval_pope(a, root, "--out", str(out), "--dtype", "float32") == 2
    assert "dtype 'auto', this run's is 'float32'" in capsys.readouterr().err
    assert _eval_pope(a, root, "--out", str(out), "--image-dir", str(root / "val2014")) == 0  # a location only

    llava = tmp_path / "llava" / "answers.jsonl"  # an answer file of LLaVA's own scripts
    llava.parent.mkdir()
    llava.write_text(json.dumps({"question_id": "random/1", "prompt": "", "text": "Yes", "metadata": {}}) + "\n")
    assert _eval_pope(a, root, "--out", str(llava.parent)) == 2
    assert "does not record the model and settings" in capsys.readouterr().err


def test_mvbench_predictions_record_the_model_and_refuse_another(tmp_path, two_models, capsys):
    from regate_plugin.eval.provenance import weights_fingerprint

    a, b = two_models
    root = write_mvbench(tmp_path / "mvbench", per_task=1)
    out = tmp_path / "m"
    flags = ["--data-root", str(root), "--allow-missing", "--num-frames", "2", "--out", str(out), "--no-progress"]
    assert regate(["eval", "mvbench", "--model", str(a), *flags]) == 0
    predictions = out / "predictions-official.jsonl"
    runs = _runs(predictions)
    assert len(runs) == 3 and {r["weights"] for r in runs} == {weights_fingerprint(a)}
    assert runs[0]["settings"]["protocol"] == "official" and runs[0]["settings"]["num_frames"] == 2
    capsys.readouterr()
    assert regate(["eval", "mvbench", "--model", str(b), *flags]) == 2
    assert str(predictions) in capsys.readouterr().err
    flags[flags.index("--num-frames") + 1] = "4"
    assert regate(["eval", "mvbench", "--model", str(a), *flags]) == 2
    assert "num_frames 2, this run's is 4" in capsys.readouterr().err


def test_the_weights_fingerprint_tells_checkpoints_apart_from_sampled_bytes(tmp_path, two_models):
    from regate_plugin.eval.provenance import BLOCK_BYTES, SAMPLED_BLOCKS, weights_fingerprint

    a, b = two_models
    assert weights_fingerprint(a) != weights_fingerprint(b)
    moved = tmp_path / "elsewhere"
    shutil.copytree(a, moved)
    assert weights_fingerprint(moved) == weights_fingerprint(a)  # the same weights, wherever they are
    big = tmp_path / "big"
    big.mkdir()
    data = bytearray(range(256)) * (4 * SAMPLED_BLOCKS * BLOCK_BYTES // 256)
    (big / "model.safetensors").write_bytes(data)
    before = weights_fingerprint(big)
    data[10] ^= 1  # inside the first sampled block
    (big / "model.safetensors").write_bytes(data)
    assert weights_fingerprint(big) != before


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_two_answers_to_one_question_are_refused_naming_the_file_and_the_question(tmp_path, name, capsys):
    """The last one won, silently; which of the two was meant cannot be known."""
    root = WRITERS[name](tmp_path / "data")
    questions = get_benchmark(name, root).load()
    records = [{"question_id": q.question_id, "prompt": q.prompt_field, "text": "A"} for q in questions]
    pred = _lines(tmp_path / "answers.jsonl", [*records, {**records[1], "text": "B"}])
    assert regate(["eval", "score", name, "--pred", str(pred), "--data-root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(pred) in err and "answered twice" in err
    assert repr(str(questions[1].question_id)) in err and f"records 2 and {len(records) + 1}" in err


def test_two_mvbench_predictions_for_one_question_are_refused(tmp_path, capsys):
    root = write_mvbench(tmp_path / "mvbench", per_task=2)
    _, records = _mvbench_predictions(root)
    pred = _lines(tmp_path / "predictions-official.jsonl", [*records, records[0]])
    for flags in ([], ["--data-root", str(root)]):
        assert regate(["eval", "score", "mvbench", "--pred", str(pred), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(pred) in err and repr(records[0]["uid"]) in err and "twice" in err


def _spoil(path: Path, line: int, how: str) -> None:
    """Line `line` (1-based) of `path` made unreadable: latin-1 bytes in its text, or an answer of 3 MiB."""
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[line - 1])
    if how == "latin-1":
        lines[line - 1] = json.dumps({**record, "text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n"
    else:
        lines[line - 1] = json.dumps({**record, "text": "yes " * (3 << 18)}).encode() + b"\n"
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("how", ["latin-1", "huge"])
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_a_non_utf8_or_huge_answer_line_is_named_and_its_question_unanswered(tmp_path, name, how, capsys):
    """Such a line was a UnicodeDecodeError traceback (non-UTF-8), or read and tokenized whole (a 1 GB answer
    aborted the process); now it scores as if that answer were absent, as a torn line does."""
    root = WRITERS[name](tmp_path / "data")
    benchmark = get_benchmark(name, root)
    questions = benchmark.load()
    records = [
        {"question_id": q.question_id, "prompt": q.prompt_field, "text": q.answer if isinstance(q.answer, str) else "A"}
        for q in questions
    ]
    middle = len(records) // 2
    pred = _lines(tmp_path / "answers.jsonl", records)
    _spoil(pred, middle + 1, how)
    out = tmp_path / "m"
    assert regate(["eval", "score", name, "--pred", str(pred), "--data-root", str(root), "--out", str(out)]) == 0
    spoiled = _metrics(out)
    expected = json.loads(json.dumps(benchmark.score(questions, records[:middle] + records[middle + 1 :]).to_dict()))
    assert [json.dumps(spoiled[k], sort_keys=True) for k in ("metrics", "groups", "counts")] == [
        json.dumps(expected[k], sort_keys=True) for k in ("metrics", "groups", "counts")
    ]
    assert spoiled["unanswered"] == benchmark.score(questions, records).unanswered + 1
    problem = "not UTF-8 text" if how == "latin-1" else "too long (3145"
    assert len(spoiled["unreadable"]) == 1 and f"{pred} line {middle + 1}: {problem}" in spoiled["unreadable"][0]
    assert f"{pred} line {middle + 1}: {problem}" in capsys.readouterr().out


def test_an_mvbench_prediction_line_that_is_not_utf8_counts_as_unanswered(tmp_path):
    root = write_mvbench(tmp_path / "mvbench", per_task=2)
    questions, records = _mvbench_predictions(root)
    pred = _lines(tmp_path / "predictions-official.jsonl", records)
    _spoil(pred, 2, "latin-1")
    out = tmp_path / "m"
    assert regate(["eval", "score", "mvbench", "--pred", str(pred), "--data-root", str(root), "--out", str(out)]) == 0
    metrics = _metrics(out)
    assert metrics["unanswered"] == 1 and metrics["total"] == len(questions)
    assert metrics["correct"] == sum(r["correct"] for i, r in enumerate(records) if i != 1)
    assert f"{pred} line 2: not UTF-8 text" in metrics["unreadable"][0]


def test_a_huge_line_is_never_held_in_memory_whole(tmp_path):
    """Reading a file with a 64 MiB line allocates about one line's cap (1 MiB), not the line; a resume cuts such
    a line off when it is the torn last one."""
    import tracemalloc

    from regate_plugin.eval.image import read_answers

    pred = tmp_path / "answers.jsonl"
    head = json.dumps({"question_id": 1, "prompt": "", "text": "yes"}) + "\n"
    pred.write_text(head + '{"question_id": 2, "prompt": "", "text": "' + "y" * (64 << 20) + '"}\n' + head)
    tracemalloc.start()
    answers = read_answers(pred)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(answers.records) == 2 and len(answers.unreadable) == 1 and peak < 8 << 20

    done = json.dumps({"id": "q1", "out": "q1"}) + "\n"
    pred.write_text(done + '{"id": "q2", "out": "' + "y" * (4 << 20))  # torn while writing, no newline
    assert _resume(pred, ["q1", "q2"]) == [{"id": "q2", "out": "q2"}]
    assert pred.read_text() == done + json.dumps({"id": "q2", "out": "q2"}) + "\n"


def test_an_image_bomb_or_an_empty_video_is_one_line_naming_the_file(tmp_path, two_models, capsys):
    """PIL's DecompressionBombError and PyAV's InvalidDataError were tracebacks."""
    from .test_data_faults import write_bomb_png

    a, _ = two_models
    root = write_pope(tmp_path / "pope", per_category=2)
    bomb = get_benchmark("pope", root).load()[1].image
    write_bomb_png(bomb)
    assert _eval_pope(a, root, "--out", str(tmp_path / "p")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("regate eval: error: ") and str(bomb) in err and "decompression bomb" in err

    root = write_mvbench(tmp_path / "mvbench", per_task=1)
    videos = [q.video for q in load_mvbench(root, allow_missing=True).questions if q.video.is_file()]
    videos[0].write_bytes(b"")
    flags = ["--data-root", str(root), "--allow-missing", "--num-frames", "2", "--out", str(tmp_path / "m")]
    assert regate(["eval", "mvbench", "--model", str(a), *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"regate eval: error: {videos[0]}: the video file is empty (0 bytes); download or extract it again"


class _FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: a write past them writes what fits, then fails with ENOSPC, as
    write(2) does."""

    room = 0

    def write(self, data) -> int:
        data = data.encode() if isinstance(data, str) else data
        if _FullDisk.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), _FullDisk.room)
        _FullDisk.room -= n
        return super().write(bytes(data[:n]))


def test_a_full_disk_while_eval_writes_is_named_and_the_rerun_completes_the_file(
    tmp_path, two_models, monkeypatch, capsys
):
    a, _ = two_models
    root = write_pope(tmp_path / "pope", per_category=2)
    assert _eval_pope(a, root, "--out", str(tmp_path / "clean"), "--batch-size", "2") == 0
    clean = (tmp_path / "clean" / "answers.jsonl").read_text().splitlines(keepends=True)

    out = tmp_path / "full"
    answers = out / "answers.jsonl"
    real_open = pathlib.Path.open

    def open_on_a_full_disk(self, mode="r", *args, **kwargs):
        if self == answers and "a" in mode:
            return _FullDisk(self, "a")
        return real_open(self, mode, *args, **kwargs)

    _FullDisk.room = len("".join(clean[:3])) + 40  # three records and part of the fourth
    monkeypatch.setattr(pathlib.Path, "open", open_on_a_full_disk)
    code = _eval_pope(a, root, "--out", str(out), "--batch-size", "2")
    monkeypatch.undo()
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"regate eval: error: cannot write {answers}: No space left on device. The answers written before it are "
        "kept: free space (or fix the cause) and rerun the same command, which answers the rest"
    )
    assert answers.read_text() == "".join(clean[:3]) + clean[3][:40]  # nothing written is lost
    assert not (out / "metrics.json").exists()

    assert _eval_pope(a, root, "--out", str(out), "--batch-size", "2") == 0  # the rerun cuts the torn line off
    assert answers.read_text() == "".join(clean)
    assert _metrics(out) == _metrics(tmp_path / "clean")


@pytest.mark.parametrize(
    ("command", "flag", "value", "problem"),
    [
        ("pope", "--batch-size", "0", "must be at least 1, got 0"),  # was a traceback
        ("pope", "--batch-size", "-1", "must be at least 1, got -1"),  # was exit 0 with nothing answered
        ("pope", "--limit", "-1", "must be at least 0, got -1"),  # dropped the last question
        ("mvbench", "--batch-size", "0", "must be at least 1, got 0"),
        ("mvbench", "--limit", "-1", "must be at least 0, got -1"),
        ("mvbench", "--num-frames", "0", "must be at least 1, got 0"),
    ],
)
def test_counts_out_of_range_are_refused_by_the_parser(tmp_path, capsys, command, flag, value, problem):
    """Refused before anything loads or is written, naming the flag."""
    argv = ["eval", command, "--model", str(tmp_path / "never-read"), "--data-root", str(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        regate([*argv, "--out", str(tmp_path / "out"), flag, value])
    assert exited.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"regate eval {command}: error: argument {flag}")  # its underscore spelling may follow
    assert line.endswith(f": {problem}")
    assert not (tmp_path / "out").exists()


def test_a_hub_id_is_fingerprinted_by_the_revision_its_local_cache_holds(tmp_path, monkeypatch):
    """The HF cache layout (models--owner--name/refs/main -> snapshots/<commit>/): the revision names the weights;
    a hub id the cache does not hold has no fingerprint until it loads."""
    import huggingface_hub.constants
    from regate_plugin.eval.provenance import model_fingerprint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--owner--tiny-llava"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert model_fingerprint("owner/tiny-llava") == f"owner/tiny-llava@{commit}"
    assert model_fingerprint("owner/not-cached") is None
