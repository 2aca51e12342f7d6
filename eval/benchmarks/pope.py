"""POPE (docs/EVAL.md): LLaVA's `eval_pope.py` yes/no rule and its per-category metrics."""

from __future__ import annotations

from collections.abc import Hashable
from functools import cached_property
from pathlib import Path
from typing import Any

from ...core.files import read_json_lines
from ..image import SHORT_ANSWER, BenchmarkError, ImageBenchmark, ImageQuestion, Score, flag, ratio, register_benchmark
from ._common import require

CATEGORIES = ("adversarial", "popular", "random")
RELEASES = {
    2910: "the old POPE release LLaVA-1.5 used (8,910 questions)",
    3000: "the current POPE release (9,000 questions)",
}


def pope_answer(text: str) -> str:
    """'no' if a word of the first sentence (commas removed, split on single spaces) is 'No', 'not' or 'no'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_id(category: str, question_id: Any) -> str:
    """Our id of a POPE question: its label file's category and question_id."""
    return f"{category}/{question_id}"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Yes is the positive class; `predictions[i]` answers the question of `labels[i]`; yes-ratio is over
    predictions."""
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and g != "no" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g != "no" for p, g in pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "acc": 100 * ratio(tp + tn, tp + tn + fp + fn),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * ratio(2 * precision * recall, precision + recall),
        "yes_ratio": 100 * ratio(predictions.count("yes"), len(predictions)),
    }


@register_benchmark
class POPE(ImageBenchmark):
    name = "pope"
    title = "POPE"
    data_layout = "coco/coco_pope_{adversarial,popular,random}.json (POPE's label files) and val2014/ (COCO images)"
    image_folder = "val2014"
    flags = (
        flag("--image-dir", help="COCO val2014 images (default: DATA_ROOT/val2014)"),
        flag(
            "--question-file",
            help="scoring LLaVA's answer files: its llava_pope_test.jsonl, which gives each question_id its category",
        ),
    )

    def label_file(self, category: str) -> Path:
        return self.root / "coco" / f"coco_pope_{category}.json"

    def data_paths(self) -> list[Path]:
        return [*map(self.label_file, CATEGORIES), *super().data_paths()]

    def categories(self) -> list[str]:
        present = [c for c in CATEGORIES if self.label_file(c).exists()]
        if not present:
            raise BenchmarkError(
                f"pope: no coco/coco_pope_*.json under {self.root}; --data-root must hold {self.data_layout}"
            )
        return present

    def labels(self, category: str) -> list[dict[str, Any]]:
        return read_json_lines(self.label_file(category), error=BenchmarkError)

    def load(self) -> list[ImageQuestion]:
        questions = []
        for category in self.categories():
            path = self.label_file(category)
            for i, record in enumerate(self.labels(category)):
                where = f"{path} line {i + 1}"
                questions.append(
                    ImageQuestion(
                        pope_id(category, require(record, "question_id", where)),
                        require(record, "text", where) + SHORT_ANSWER,
                        self.image_dir / require(record, "image", where),
                        require(record, "label", where),
                        {"category": category},
                    )
                )
        return questions

    @cached_property
    def _own_ids(self) -> frozenset[str]:
        return frozenset(pope_id(c, r.get("question_id")) for c in self.categories() for r in self.labels(c))

    @cached_property
    def _question_file_ids(self) -> dict[str, str]:
        """LLaVA's question_id -> ours, from --question-file: a category's k-th question there is line k of the
        category's label file, as `eval_pope.py` pairs them; an image that differs is an error, not a silent
        misalignment (a question file of another POPE release)."""
        path = self.options.get("question_file")
        if not path:
            return {}
        labels = {c: self.labels(c) for c in self.categories()}
        seen: dict[str, int] = {}
        ids = {}
        for number, record in enumerate(read_json_lines(Path(path), error=BenchmarkError), start=1):
            where = f"{path} line {number}"
            category = require(record, "category", where)
            if category not in labels:
                raise BenchmarkError(f"{where}: category {category!r} has no coco/coco_pope_{category}.json")
            k = seen[category] = seen.get(category, -1) + 1
            if k >= len(labels[category]):
                raise BenchmarkError(
                    f"{where}: more {category} questions than coco_pope_{category}.json has labels "
                    f"({len(labels[category])}): the question file is from another POPE release"
                )
            label = labels[category][k]
            if "image" in record and record["image"] != label.get("image"):
                raise BenchmarkError(
                    f"{where}: the image {record['image']!r} is not that of line {k + 1} of coco_pope_{category}.json "
                    f"({label.get('image')!r}): the question file is from another POPE release"
                )
            ids[str(require(record, "question_id", where))] = pope_id(category, label.get("question_id"))
        return ids

    def record_key(self, record: dict[str, Any]) -> Hashable:
        """Our own answer files carry our ids ("<category>/<id>"); a LLaVA answer file's ids go through
        --question-file."""
        qid = str(record["question_id"])
        if qid in self._own_ids:
            return qid
        if qid in self._question_file_ids:
            return self._question_file_ids[qid]
        hint = (
            f"it is not in --question-file {self.options['question_file']}"
            if self.options.get("question_file")
            else "a LLaVA answer file needs --question-file llava_pope_test.jsonl"
        )
        raise BenchmarkError(f"pope: answer {qid!r} has no category ({hint})")

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        """Per category, each answered question's prediction against its own label (paired by question id:
        `eval_pope.py` pairs by position, the same for a complete answer file in question order); the metrics are
        over the answered questions, as `eval_pope.py`'s, and the unanswered ones are counted."""
        texts = self.answer_texts(questions, records)
        groups, counts, unanswered = {}, {}, 0
        for category in self.categories():
            asked = [(t, q.answer) for t, q in zip(texts, questions) if q.meta["category"] == category]
            paired = [(pope_answer(t), label) for t, label in asked if t is not None]
            unanswered += len(asked) - len(paired)
            if paired:
                predictions, labels = (list(side) for side in zip(*paired))
                groups[category], counts[category] = pope_metrics(predictions, labels), len(paired)
        notes = []
        if "random" in self.categories():
            n = len(self.labels("random"))
            notes.append(f"POPE release: {RELEASES.get(n, f'{n} random-split questions')}")
        means = {f"{m}_mean": sum(g[m] for g in groups.values()) / len(groups) for m in ("f1", "acc")} if groups else {}
        return Score(self.name, means, groups, counts, unanswered, notes)
