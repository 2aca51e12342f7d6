"""MME (docs/EVAL.md): the official `calculation.py` rule, acc + acc+ per subtask, perception and
cognition sums. LLaVA's prompt swaps MME's " Please answer yes or no." for the short-answer suffix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..image import SHORT_ANSWER, BenchmarkError, ImageBenchmark, ImageQuestion, Score, ratio, register_benchmark

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUFFIX = "Please answer yes or no."
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def mme_answer(text: str) -> str:
    """'yes'/'no' if the lower-cased output is exactly that, else by its first 4 characters, else 'other'."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def llava_mme_text(question: str) -> str:
    question = question.strip()
    if question.endswith(MME_SUFFIX):
        question = question[: -len(MME_SUFFIX)].rstrip()
    return question + SHORT_ANSWER


@register_benchmark
class MME(ImageBenchmark):
    name = "mme"
    title = "MME"
    data_layout = (
        "MME_Benchmark_release_version's 14 subtask folders (images/ + questions_answers_YN/, or side by side)"
    )
    unique_ids = False  # LLaVA's question_id is "<subtask>/<image>", shared by the image's two questions

    def data_paths(self) -> list[Path]:
        return [self.root / subtask for subtask in (*PERCEPTION, *COGNITION)]

    def _pairs(self, subtask: str) -> list[tuple[str, Any]]:
        """(image file, question file) for each image of a subtask, in file-name order."""
        folder = self.root / subtask
        texts = folder / "questions_answers_YN"
        images = folder / "images"
        if not texts.is_dir():
            texts = images = folder
        pairs = []
        for text_file in sorted(texts.glob("*.txt")):
            image = next(
                (images / (text_file.stem + s) for s in IMAGE_SUFFIXES if (images / (text_file.stem + s)).exists()),
                None,
            )
            if image is None:
                raise BenchmarkError(f"mme: no image for {text_file} in {images}")
            pairs.append((image, text_file))
        return pairs

    def subtasks(self) -> list[str]:
        present = [s for s in (*PERCEPTION, *COGNITION) if (self.root / s).is_dir()]
        if not present:
            raise BenchmarkError(
                f"mme: none of the 14 subtask folders is under {self.root}; --data-root must hold {self.data_layout}"
            )
        return present

    def load(self) -> list[ImageQuestion]:
        questions = []
        for subtask in self.subtasks():
            for image, text_file in self._pairs(subtask):
                for number, line in enumerate(text_file.read_text().splitlines(), start=1):
                    if not line.strip():
                        continue
                    parts = line.split("\t")
                    if len(parts) != 2:
                        raise BenchmarkError(f"{text_file} line {number}: expected 'question<TAB>answer'")
                    questions.append(
                        ImageQuestion(
                            f"{subtask}/{image.name}",
                            llava_mme_text(parts[0]),
                            image,
                            parts[1].strip(),
                            {"subtask": subtask, "image": image.name},
                        )
                    )
        return questions

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        per_image: dict[tuple[str, str], list[bool]] = {}
        unanswered = 0
        for q, text in zip(questions, self.answer_texts(questions, records)):
            unanswered += text is None
            correct = text is not None and mme_answer(text) == q.answer.lower()
            per_image.setdefault((q.meta["subtask"], q.meta["image"]), []).append(correct)
        groups, counts = {}, {}
        for subtask in self.subtasks():
            images = [flags for (s, _), flags in per_image.items() if s == subtask]
            flat = [c for flags in images for c in flags]
            acc = 100 * ratio(sum(flat), len(flat))
            acc_plus = 100 * ratio(sum(all(flags) for flags in images), len(images))
            groups[subtask], counts[subtask] = {"acc": acc, "acc+": acc_plus, "score": acc + acc_plus}, len(flat)
        metrics = {
            part: sum(groups[s]["score"] for s in names if s in groups)
            for part, names in (("perception", PERCEPTION), ("cognition", COGNITION))
        }
        missing = [s for s in (*PERCEPTION, *COGNITION) if s not in groups]
        notes = [f"missing subtasks (sums are over the others): {', '.join(missing)}"] if missing else []
        return Score(self.name, metrics, groups, counts, unanswered, notes)
