"""ScienceQA-IMG (docs/EVAL.md): LLaVA's CQM-A prompt and `eval_science_qa.py`'s letter rule; accuracy over
the whole split and IMG-accuracy over the answers whose prompt holds "<image>"."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..image import LETTER_ANSWER, BenchmarkError, ImageBenchmark, ImageQuestion, Score, flag, ratio, register_benchmark
from ._common import read_json, require

OPTIONS = ("A", "B", "C", "D", "E")
THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(text: str) -> str:
    """A bare letter; else "X. ..." at the start; else "The answer is X." found exactly once; else FAILED."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_text(problem: dict[str, Any]) -> str:
    """ "Context: {hint}" (left out when the hint is empty, as lmms-eval does), the question, "A. choice" lines."""
    lines = [f"Context: {problem['hint']}"] if problem.get("hint") else []
    lines.append(problem["question"])
    lines += [f"{OPTIONS[i]}. {choice}" for i, choice in enumerate(problem["choices"])]
    return "\n".join(lines) + LETTER_ANSWER


@register_benchmark
class ScienceQA(ImageBenchmark):
    name = "scienceqa"
    title = "ScienceQA-IMG"
    data_layout = "ScienceQA's problems.json, pid_splits.json and images/<split>/<pid>/image.png"
    max_new_tokens = 1024  # model_vqa_science
    flags = (
        flag("--split", default="test", help="ScienceQA split (default: test)"),
        flag(
            "--subset",
            choices=["img", "all"],
            default="img",
            help="img: only the problems with an image (SQA-IMG, default); all: every problem, as LLaVA runs it",
        ),
    )

    def data_paths(self) -> list[Path]:
        return [self.root / "problems.json", self.root / "pid_splits.json"]

    def _problems(self) -> tuple[list[str], dict[str, Any]]:
        split = self.options.get("split") or "test"
        splits = read_json(self._path("pid_splits.json"))
        if split not in splits:
            raise BenchmarkError(
                f"scienceqa: --split {split!r} is not in {self.root / 'pid_splits.json'}, which has {sorted(splits)}"
            )
        return [str(pid) for pid in splits[split]], read_json(self._path("problems.json"))

    def load(self) -> list[ImageQuestion]:
        split = self.options.get("split") or "test"
        pids, problems = self._problems()
        questions = []
        for pid in pids:
            problem = require(problems, pid, f"{self.root / 'problems.json'}")
            image = problem.get("image")
            if self.options.get("subset", "img") == "img" and not image:
                continue
            text = scienceqa_text(problem)
            questions.append(
                ImageQuestion(
                    pid,
                    text,
                    self.root / "images" / split / pid / image if image else None,
                    problem["answer"],
                    {"choices": len(problem["choices"])},
                    ("<image>\n" + text) if image else text,
                )
            )
        return questions

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        """Every problem of the split is scored; one without an answer is FAILED and counts as text-only."""
        pids, problems = self._problems()
        latest = {str(r["question_id"]): r for r in records}
        correct = image_correct = image_total = unanswered = 0
        for pid in pids:
            record = latest.get(pid)
            unanswered += record is None
            letter = scienceqa_letter(record["text"]) if record else "FAILED"
            choices = len(problems[pid]["choices"])
            right = letter in OPTIONS[:choices] and OPTIONS.index(letter) == problems[pid]["answer"]
            correct += right
            if record is not None and "<image>" in record["prompt"]:
                image_total += 1
                image_correct += right
        metrics = {"img_acc": 100 * ratio(image_correct, image_total), "acc": 100 * ratio(correct, len(pids))}
        notes = []
        if unanswered:
            notes.append(
                f"acc is over all {len(pids)} problems of the split (the official script's denominator); "
                "run --subset all for a comparable value"
            )
        return Score(self.name, metrics, {}, {"img": image_total, "all": len(pids)}, unanswered, notes)
