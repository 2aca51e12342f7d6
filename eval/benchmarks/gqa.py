"""GQA testdev-balanced (docs/EVAL.md): LLaVA's `convert_gqa_for_eval.py` (trailing periods stripped,
lower-cased) and the official accuracy (exact string against the gold answer), per structural type too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..image import SHORT_ANSWER, ImageBenchmark, ImageQuestion, Score, accuracy_groups, flag, ratio, register_benchmark
from ._common import read_json, require

TESTDEV_BALANCED = 12578


@register_benchmark
class GQA(ImageBenchmark):
    name = "gqa"
    title = "GQA (testdev-balanced)"
    data_layout = "GQA's testdev_balanced_questions.json and images/"
    image_folder = "images"
    flags = (
        flag("--questions", default="testdev_balanced_questions.json", help="question file under DATA_ROOT"),
        flag("--image-dir", help="GQA images (default: DATA_ROOT/images)"),
    )

    def questions_name(self) -> str:
        return self.options.get("questions") or "testdev_balanced_questions.json"

    def data_paths(self) -> list[Path]:
        return [self.root / self.questions_name(), *super().data_paths()]

    def load(self) -> list[ImageQuestion]:
        path = self._path(self.questions_name())
        questions = []
        for qid, record in read_json(path).items():
            where = f"{path} question {qid}"
            questions.append(
                ImageQuestion(
                    qid,
                    require(record, "question", where) + SHORT_ANSWER,
                    self.image_dir / f"{require(record, 'imageId', where)}.jpg",
                    require(record, "answer", where),
                    {"structural": record.get("types", {}).get("structural", "")},
                )
            )
        return questions

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        texts = self.answer_texts(questions, records)
        correct = [t is not None and t.rstrip(".").lower() == q.answer for t, q in zip(texts, questions)]
        groups, counts = accuracy_groups([(q.meta["structural"], c) for q, c in zip(questions, correct)], order=str)
        notes = []
        if len(questions) != TESTDEV_BALANCED:
            notes.append(f"{len(questions)} questions (the testdev-balanced release has {TESTDEV_BALANCED})")
        return Score(
            self.name, {"acc": 100 * ratio(sum(correct), len(correct))}, groups, counts, texts.count(None), notes
        )
