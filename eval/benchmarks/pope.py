"""POPE (docs/EVAL.md): LLaVA's `eval_pope.py` yes/no rule and its per-category metrics."""

from __future__ import annotations

from collections.abc import Hashable
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


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Yes is the positive class; predictions and labels are paired by position; yes-ratio is over predictions."""
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
    flags = (
        flag("--image-dir", help="COCO val2014 images (default: DATA_ROOT/val2014)"),
        flag(
            "--question-file",
            help="scoring LLaVA's answer files: its llava_pope_test.jsonl, which gives each question_id its category",
        ),
    )

    def categories(self) -> list[str]:
        present = [c for c in CATEGORIES if (self.root / "coco" / f"coco_pope_{c}.json").exists()]
        if not present:
            raise BenchmarkError(
                f"pope: no coco/coco_pope_*.json under {self.root}; --data-root must hold {self.data_layout}"
            )
        return present

    def labels(self, category: str) -> list[dict[str, Any]]:
        return read_json_lines(self.root / "coco" / f"coco_pope_{category}.json", error=BenchmarkError)

    def load(self) -> list[ImageQuestion]:
        image_dir = Path(self.options.get("image_dir") or self.root / "val2014")
        questions = []
        for category in self.categories():
            path = self.root / "coco" / f"coco_pope_{category}.json"
            for i, record in enumerate(self.labels(category)):
                where = f"{path} line {i + 1}"
                questions.append(
                    ImageQuestion(
                        f"{category}/{require(record, 'question_id', where)}",
                        require(record, "text", where) + SHORT_ANSWER,
                        image_dir / require(record, "image", where),
                        require(record, "label", where),
                        {"category": category},
                    )
                )
        return questions

    def _category_of(self) -> dict[str, str]:
        path = self.options.get("question_file")
        if not path:
            return {}
        return {str(r["question_id"]): r["category"] for r in read_json_lines(Path(path), error=BenchmarkError)}

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return str(record["question_id"])

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        """Per category, the answers in file order are paired by position with the label-file lines."""
        mapped = self._category_of()
        by_category: dict[str, list[str]] = {c: [] for c in self.categories()}
        for record in records:
            qid = str(record["question_id"])
            category = mapped.get(qid) or qid.split("/")[0]
            if category not in by_category:
                hint = "" if mapped else " (a LLaVA answer file needs --question-file llava_pope_test.jsonl)"
                raise BenchmarkError(f"pope: answer {qid!r} has no category{hint}")
            by_category[category].append(pope_answer(record["text"]))
        groups, counts, unanswered, notes = {}, {}, 0, []
        for category, predictions in by_category.items():
            labels = [r["label"] for r in self.labels(category)]
            if predictions:
                groups[category], counts[category] = (
                    pope_metrics(predictions, labels),
                    min(len(predictions), len(labels)),
                )
            unanswered += max(len(labels) - len(predictions), 0)
            if category == "random":
                notes.append(f"POPE release: {RELEASES.get(len(labels), f'{len(labels)} random-split questions')}")
        means = {f"{m}_mean": sum(g[m] for g in groups.values()) / len(groups) for m in ("f1", "acc")} if groups else {}
        return Score(self.name, means, groups, counts, unanswered, notes)
