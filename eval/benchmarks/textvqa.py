"""TextVQA val (docs/EVAL.md): LLaVA's prompt with Rosetta OCR tokens (on by default: lmms-eval's default
off costs LLaVA-1.5 about 12 points), matched and scored as `eval_textvqa.py` with m4c's VQA accuracy."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ..image import SHORT_ANSWER, BenchmarkError, ImageBenchmark, ImageQuestion, Score, flag, register_benchmark
from ._common import annotator_answers, read_json, require, vqa_score

OCR_FILE = "TextVQA_Rosetta_OCR_v0.2_val.json"


def question_in_prompt(prompt: str) -> str:
    """`eval_textvqa.py`'s prompt_processor: the question line of a LLaVA TextVQA prompt, lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        start = prompt.find("Question: ")
        end = prompt.find(" Short answer:", start + len("Question: "))
        if start < 0 or end < 0:
            raise BenchmarkError(f"textvqa: cannot find the question in prompt {prompt!r}")
        question = prompt[start + len("Question: ") : end]
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise BenchmarkError(f"textvqa: cannot find the question in prompt {prompt!r}")
    return question.lower()


@register_benchmark
class TextVQA(ImageBenchmark):
    name = "textvqa"
    title = "TextVQA (val)"
    data_layout = f"TextVQA_0.5.1_val.json, {OCR_FILE} (for --ocr-tokens on) and train_images/"
    image_folder = "train_images"
    flags = (
        flag(
            "--ocr-tokens",
            choices=["on", "off"],
            default="on",
            help="add LLaVA's 'Reference OCR token:' line (default: on, as LLaVA-1.5 reports it)",
        ),
        flag("--image-dir", help="TextVQA images (default: DATA_ROOT/train_images)"),
    )

    def data_paths(self) -> list[Path]:
        ocr = [self.root / OCR_FILE] if self.options.get("ocr_tokens", "on") == "on" else []
        return [self.root / "TextVQA_0.5.1_val.json", *ocr, *super().data_paths()]

    def _ocr_tokens(self) -> dict[str, list[str]]:
        if self.options.get("ocr_tokens", "on") == "off":
            return {}
        path = self._path(OCR_FILE)
        return {str(r["image_id"]): r.get("ocr_tokens", []) for r in require(read_json(path), "data", str(path))}

    def load(self) -> list[ImageQuestion]:
        path = self._path("TextVQA_0.5.1_val.json")
        ocr = self._ocr_tokens()
        questions = []
        for i, record in enumerate(require(read_json(path), "data", str(path))):
            where = f"{path} record {i}"
            image_id = require(record, "image_id", where)
            tokens = ocr.get(str(image_id), [])
            reference = f"\nReference OCR token: {', '.join(tokens)}" if tokens else ""
            questions.append(
                ImageQuestion(
                    image_id,
                    require(record, "question", where) + reference + SHORT_ANSWER,
                    self.image_dir / f"{image_id}.jpg",
                    annotator_answers(record, where),
                    {"question": record["question"]},
                )
            )
        return questions

    def question_key(self, question: ImageQuestion) -> Hashable:
        return (str(question.question_id), question.meta["question"].lower())

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return (str(record["question_id"]), question_in_prompt(record["prompt"]))

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        ocr = self.options.get("ocr_tokens", "on")
        return vqa_score(self, questions, records, "", [f"OCR tokens: {ocr}"])
