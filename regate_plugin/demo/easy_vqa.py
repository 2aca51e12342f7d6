"""The demo's second task, on data a third party made: easy-VQA (Victor Zhou, MIT licence; the `easy-vqa` package on
PyPI, 4,000 train and 1,000 test images of 64x64 pixels, each one shape in one colour on a plain background).

We keep its colour questions ("what color is the shape?", "what is the color of the triangle?", ...: 8 answers).
Its yes/no questions are left out because their wording mostly gives the answer away, and its shape questions
because the demo's student (a random frozen vision tower, a 2-layer LLM) stays at chance on them within a few
hundred steps (docs/BENCHMARKS.md), which would leave nothing to measure. The supervised answer restates the
question, so most of its tokens are predictable from the text and one word needs the image:

    The answer to "what color is the shape?" is blue.

The test split is written in GQA's layout (`gqa/testdev_balanced_questions.json`, `gqa/images/<imageId>.jpg`) and
scored by the harness's GQA rule (trailing period stripped, lower-cased, exact against the gold word; the breakdown
is per gold colour), with the answer's restatement pre-filled as MVBench's official protocol pre-fills
"Best option:(". `test.json` holds the same questions with their whole answers for the token-level metrics, as
the squares task's does.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ..core.config import ConfigError
from ..eval.base import Request
from ..eval.benchmarks.gqa import GQA
from ..eval.image import SHORT_ANSWER, ImageQuestion
from .data import DemoSplits, Segments, joined, visual_spans

IMAGE_SIZE = 64
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
JPEG = {"quality": 95, "subsampling": 0}  # GQA's layout names images .jpg; flat colours survive this closely


def answer_prefix(question: str) -> str:
    """What evaluation pre-fills: the answer up to the word that needs the image."""
    return f'The answer to "{question}" is'


def answer_segments(question: str, answer: str) -> Segments:
    """The supervised answer as (text, needs the image) pieces."""
    return [(answer_prefix(question) + " ", False), (answer, True), (".", False)]


def _colour_questions(split: str) -> list[tuple[str, str, int]]:
    """(question, answer, image id) of a split's colour questions, in the package's order."""
    try:
        import easy_vqa
    except ImportError:
        raise ConfigError(
            "--task easy-vqa needs the `easy-vqa` package: pip install 'regate-plugin[easy-vqa]'"
        ) from None
    read = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    texts, answers, images = read()
    return [(q, a, i) for q, a, i in zip(texts, answers, images) if a in COLOURS]


def _image_paths(split: str) -> dict[int, str]:
    import easy_vqa

    return easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": "<image>\n" + question + SHORT_ANSWER},
        {"from": "gpt", "value": joined(answer_segments(question, answer))},
    ]


def _copy_image(source: str, target: Path) -> None:
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("RGB").save(target, **JPEG)


def generate(root: Path, train_size: int, test_per_task: int, seed: int = 0, progress: bool = True) -> DemoSplits:
    """Write `train_size` training questions drawn from easy-VQA's train split and `test_per_task` test questions
    per colour from its test split, under `root`, everything drawn from `seed`."""
    rng = random.Random(seed)
    train_pool = _colour_questions("train")
    if train_size > len(train_pool):
        raise ConfigError(f"--train-size {train_size}: easy-VQA has {len(train_pool)} colour questions for training")
    test_pool = _colour_questions("test")
    by_colour = {c: [q for q in test_pool if q[1] == c] for c in COLOURS}
    fewest = min(len(pool) for pool in by_colour.values())
    if test_per_task > fewest:
        raise ConfigError(f"--test-per-task {test_per_task}: easy-VQA's test split has {fewest} questions of a colour")
    drawn_train = rng.sample(train_pool, train_size)
    drawn_test = [q for c in COLOURS for q in rng.sample(by_colour[c], test_per_task)]
    root.mkdir(parents=True, exist_ok=True)
    paths = {"train": _image_paths("train"), "test": _image_paths("test")}
    bar = tqdm(total=len(drawn_train) + len(drawn_test), desc="easy-VQA images", disable=not progress)
    train: list[dict[str, Any]] = []
    for n, (question, answer, image_id) in enumerate(drawn_train):
        image = f"images/train-{image_id}.jpg"
        _copy_image(paths["train"][image_id], root / image)
        conversation = _conversation(question, answer)
        train.append({"id": f"easy-vqa-train-{n:05d}", "image": image, "conversations": conversation})
        bar.update(1)
    gqa = root / "gqa"
    questions: dict[str, dict[str, Any]] = {}
    test: list[dict[str, Any]] = []
    for n, (question, answer, image_id) in enumerate(drawn_test):
        qid = f"easy-vqa-test-{n:05d}"
        _copy_image(paths["test"][image_id], gqa / "images" / f"test-{image_id}.jpg")
        # GQA's scorer breaks accuracy down by `types.structural`: here, by the gold colour
        questions[qid] = {
            "question": question,
            "imageId": f"test-{image_id}",
            "answer": answer,
            "types": {"structural": answer},
        }
        test.append(
            {
                "id": qid,
                "image": f"gqa/images/test-{image_id}.jpg",
                "conversations": _conversation(question, answer),
                "visual_spans": visual_spans(answer_segments(question, answer)),
            }
        )
        bar.update(1)
    bar.close()
    (gqa / "testdev_balanced_questions.json").write_text(json.dumps(questions, indent=1))
    train_json, test_json = root / "train.json", root / "test.json"
    train_json.write_text(json.dumps(train, indent=1))
    test_json.write_text(json.dumps(test, indent=1))
    return DemoSplits(root, train_json, gqa, test_json, len(train), len(test))


class EasyVQABenchmark(GQA):
    """GQA's loading and scoring of the easy-VQA test split, with the answer's restatement pre-filled and the
    generation stopped at its period."""

    name = "easy-vqa"
    title = "easy-VQA (GQA rule)"
    max_new_tokens = 8

    def request(self, question: ImageQuestion) -> Request:
        request = super().request(question)
        prefill = answer_prefix(question.text.removesuffix(SHORT_ANSWER))
        return replace(request, prompt=replace(request.prompt, prefill=prefill, stop=(".",)))
