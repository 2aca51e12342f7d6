"""SEED-Bench image accuracy (docs/EVAL.md): LLaVA's exact-letter rule (`convert_seed_for_submission.py`)
per question type and over the image questions, plus lmms-eval's first-character rule as a second column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..image import (
    LETTER_ANSWER,
    ImageBenchmark,
    ImageQuestion,
    Score,
    accuracy_groups,
    flag,
    ratio,
    register_benchmark,
)
from ._common import read_json, require


@register_benchmark
class SEEDBench(ImageBenchmark):
    name = "seed"
    title = "SEED-IMG"
    data_layout = "SEED-Bench.json and SEED-Bench-image/"
    image_folder = "SEED-Bench-image"
    flags = (flag("--image-dir", help="SEED-Bench images (default: DATA_ROOT/SEED-Bench-image)"),)

    def data_paths(self) -> list[Path]:
        return [self.root / "SEED-Bench.json", *super().data_paths()]

    def load(self) -> list[ImageQuestion]:
        path = self._path("SEED-Bench.json")
        data = read_json(path)
        names = {v: k for k, v in require(data, "question_type", str(path)).items()}
        questions = []
        for i, q in enumerate(require(data, "questions", str(path))):
            where = f"{path} question {i}"
            if require(q, "data_type", where) != "image":
                continue
            options = "".join(f"\n{letter}. {require(q, 'choice_' + letter.lower(), where)}" for letter in "ABCD")
            questions.append(
                ImageQuestion(
                    require(q, "question_id", where),
                    require(q, "question", where) + options + LETTER_ANSWER,
                    self.image_dir / require(q, "data_id", where),
                    require(q, "answer", where),
                    {"type": names.get(q["question_type_id"], str(q["question_type_id"]))},
                )
            )
        return questions

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        """A question is right only if its stripped output equals the letter; unanswered ones count as wrong."""
        texts = self.answer_texts(questions, records)
        exact = [t is not None and t == q.answer for t, q in zip(texts, questions)]
        first = [t is not None and t.strip()[:1] == q.answer for t, q in zip(texts, questions)]
        groups, counts = accuracy_groups([(q.meta["type"], c) for q, c in zip(questions, exact)])
        metrics = {
            "img_acc": 100 * ratio(sum(exact), len(exact)),
            "img_acc_first_char": 100 * ratio(sum(first), len(first)),
        }
        return Score(
            self.name,
            metrics,
            groups,
            counts,
            texts.count(None),
            ["img_acc_first_char is lmms-eval's more lenient rule (first character only)"],
        )
