"""Two drawn-image tasks of the evidence suite, each an answer structure the squares and easy-VQA tasks lack:

- `refer-back`: a 32x32 image holds one coloured square in its left or right half. The answer states the two facts
  that need the image, then refers back to both, so the second mentions are predictable from the answer so far,
  not from the template:

      The square is red and on the left. So the red square is the one on the left.

- `describe`: a 32x32 image of four cells, each empty or holding a square of one of four colours; the answer is a
  long description that states a fact per cell (four facts, five values each):

      The top left cell holds a red square, the top right cell is empty, the bottom left cell holds a blue
      square, and the bottom right cell holds a green square.

Each writes its training split (LLaVA conversation format, `images/`) and its test split in GQA's layout
(`gqa/testdev_balanced_questions.json`, `gqa/images/`), scored by the whole generated answer against the gold one
(GQA's rule: trailing period stripped, lower-cased, exact), and `test.json` with the answers' visual spans for the
token-level metrics. Only the first mention of a fact counts as needing the image.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..eval.benchmarks.gqa import GQA
from ..eval.image import SHORT_ANSWER, ImageQuestion
from .data import DemoSplits, Segments, joined, visual_spans

COLOURS = {"red": (230, 30, 30), "green": (30, 210, 30), "blue": (40, 60, 240), "yellow": (235, 220, 30)}
SIDES = ("left", "right")
CELLS = ("top left", "top right", "bottom left", "bottom right")
EMPTY = "empty"
REFER_SIZE, REFER_SQUARE = 32, 10
DESCRIBE_SIZE, DESCRIBE_SQUARE = 32, 10

Sample = tuple[str, Segments, np.ndarray]  # a sample as a task draws it: prompt, answer pieces, image


def refer_back_segments(colour: str, side: str) -> Segments:
    """State the colour and side (they need the image), then refer back to them (they need the answer so far)."""
    return [
        ("The square is ", False),
        (colour, True),
        (" and on the ", False),
        (side, True),
        (f". So the {colour} square is the one on the {side}.", False),
    ]


def describe_segments(contents: tuple[str, ...]) -> Segments:
    """One clause per cell: `empty` or the colour of its square."""
    segments: Segments = [("The ", False)]
    for i, (cell, content) in enumerate(zip(CELLS, contents)):
        if i:
            segments.append((", and the " if i == len(CELLS) - 1 else ", the ", False))
        if content == EMPTY:
            segments += [(f"{cell} cell is ", False), (EMPTY, True)]
        else:
            segments += [(f"{cell} cell holds a ", False), (content, True), (" square", False)]
    return [*segments, (".", False)]


def _square(image: np.ndarray, rng: random.Random, box: tuple[int, int, int, int], size: int, colour: str) -> None:
    """A `size` square of `colour` at a random place inside `box` (x, y, width, height)."""
    x0, y0, width, height = box
    x, y = x0 + rng.randrange(width - size + 1), y0 + rng.randrange(height - size + 1)
    image[y : y + size, x : x + size] = COLOURS[colour]


def refer_back_sample(rng: random.Random, facts: tuple[str, ...]) -> Sample:
    colour, side = facts
    image = np.zeros((REFER_SIZE, REFER_SIZE, 3), dtype=np.uint8)
    half = REFER_SIZE // 2
    _square(image, rng, (SIDES.index(side) * half, 0, half, REFER_SIZE), REFER_SQUARE, colour)
    return "Describe the square.", refer_back_segments(colour, side), image


def describe_sample(rng: random.Random, contents: tuple[str, ...]) -> Sample:
    image = np.zeros((DESCRIBE_SIZE, DESCRIBE_SIZE, 3), dtype=np.uint8)
    cell = DESCRIBE_SIZE // 2
    for i, content in enumerate(contents):
        if content != EMPTY:
            _square(image, rng, ((i % 2) * cell, (i // 2) * cell, cell, cell), DESCRIBE_SQUARE, content)
    return "Describe the four cells.", describe_segments(contents), image


Draw = Callable[[random.Random, tuple[str, ...]], Sample]


def _conversation(prompt: str, segments: Segments) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": "<image>\n" + prompt},
        {"from": "gpt", "value": joined(segments)},
    ]


def _write(root: Path, name: str, image: np.ndarray) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95, subsampling=0)
    return name


def generate_scenes(
    root: Path,
    draw: Draw,
    pool: list[tuple[str, ...]],
    group: Callable[[tuple[str, ...]], str],
    train_size: int,
    test_per_task: int,
    seed: int,
    progress: bool,
) -> DemoSplits:
    """Write `train_size` training samples (facts drawn uniformly from `pool`) and `test_per_task` test samples per
    `group` of the pool's facts (the score's breakdown) under `root`, everything from `seed`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=train_size, desc="draw images", disable=not progress)
    train: list[dict[str, Any]] = []
    for n in range(train_size):
        prompt, segments, image = draw(rng, rng.choice(pool))
        record = {"id": f"train-{n:05d}", "image": _write(root, f"images/train-{n:05d}.jpg", image)}
        train.append({**record, "conversations": _conversation(prompt, segments)})
        bar.update(1)
    bar.close()
    gqa = root / "gqa"
    questions: dict[str, dict[str, Any]] = {}
    test: list[dict[str, Any]] = []
    groups = sorted({group(facts) for facts in pool})
    for name in groups:
        members = [facts for facts in pool if group(facts) == name]
        for _ in range(test_per_task):
            prompt, segments, image = draw(rng, rng.choice(members))
            qid = f"test-{len(test):05d}"
            _write(gqa, f"images/{qid}.jpg", image)
            answer = joined(segments)
            questions[qid] = {
                "question": prompt,
                "imageId": qid,
                "answer": answer.rstrip(".").lower(),
                "types": {"structural": name},
            }
            test.append(
                {
                    "id": qid,
                    "image": f"gqa/images/{qid}.jpg",
                    "conversations": _conversation(prompt, segments),
                    "visual_spans": visual_spans(segments),
                }
            )
    (gqa / "testdev_balanced_questions.json").write_text(json.dumps(questions, indent=1))
    train_json, test_json = root / "train.json", root / "test.json"
    train_json.write_text(json.dumps(train, indent=1))
    test_json.write_text(json.dumps(test, indent=1))
    return DemoSplits(root, train_json, gqa, test_json, len(train), len(test))


REFER_BACK_POOL = list(itertools.product(COLOURS, SIDES))
DESCRIBE_POOL = list(itertools.product((*COLOURS, EMPTY), repeat=len(CELLS)))


def generate_refer_back(
    root: Path, train_size: int, test_per_task: int, seed: int = 0, progress: bool = True
) -> DemoSplits:
    return generate_scenes(
        root, refer_back_sample, REFER_BACK_POOL, " ".join, train_size, test_per_task, seed, progress
    )


def generate_describe(
    root: Path, train_size: int, test_per_task: int, seed: int = 0, progress: bool = True
) -> DemoSplits:
    return generate_scenes(
        root, describe_sample, DESCRIBE_POOL, lambda f: f"{CELLS[0]} {f[0]}", train_size, test_per_task, seed, progress
    )


class SceneBenchmark(GQA):
    """GQA's loading and scoring of a drawn-image test split: the question as it is (no short-answer
    instruction), the whole answer generated and compared with the gold one."""

    name = "scenes"
    title = "whole answer (GQA rule)"
    max_new_tokens = 64

    def load(self) -> list[ImageQuestion]:
        return [replace(q, text=q.text.removesuffix(SHORT_ANSWER)) for q in super().load()]
