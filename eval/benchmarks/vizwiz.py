"""VizWiz val (docs/EVAL.md): LLaVA's prompt with the 'Unanswerable' line, VQA accuracy over the 10
annotator answers with the normalisation LLaVA scores TextVQA with (m4c, recorded in the score notes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..image import SHORT_ANSWER, ImageBenchmark, ImageQuestion, Score, flag, register_benchmark
from ._common import annotator_answers, read_json, require, vqa_score

UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."


@register_benchmark
class VizWiz(ImageBenchmark):
    name = "vizwiz"
    title = "VizWiz (val)"
    data_layout = "VizWiz's val.json and val/ (images)"
    image_folder = "val"
    flags = (flag("--image-dir", help="VizWiz val images (default: DATA_ROOT/val)"),)

    def data_paths(self) -> list[Path]:
        return [self.root / "val.json", *super().data_paths()]

    def load(self) -> list[ImageQuestion]:
        path = self._path("val.json")
        questions = []
        for i, record in enumerate(read_json(path)):
            where = f"{path} record {i}"
            image = require(record, "image", where)
            answers = [require(a, "answer", where) for a in annotator_answers(record, where)]
            questions.append(
                ImageQuestion(
                    image,
                    require(record, "question", where) + UNANSWERABLE + SHORT_ANSWER,
                    self.image_dir / image,
                    answers,
                    {"answer_type": record.get("answer_type", "")},
                )
            )
        return questions

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        return vqa_score(
            self,
            questions,
            records,
            "answer_type",
            ["VQA accuracy with m4c's EvalAI normalisation on prediction and answers (as LLaVA's TextVQA)"],
        )
