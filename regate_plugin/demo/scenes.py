"""Two drawn-image tasks of the evidence suite, each an answer structure the squares and easy-VQA tasks lack:

- `refer-back`: a 32x32 image holds one coloured square, small or big, anywhere. The answer states the two facts
  that need the image, then refers back to both, so the second mentions are predictable from the answer so far,
  not from the template:

      The square is red and small. So the small square is the red one.

  (Its first version asked for the side, left or right; the 2-layer student did not learn the side within 800
  steps even without elision, docs/BENCHMARKS.md, so the second fact is the square's size.)

- `describe`: a 32x32 image on one of three backgrounds holds one to three squares of one colour and one size,
  each in its own quarter; the answer is a longer description, four facts that need the image (background, count,
  size, colour; 3 x 3 x 2 x 4 values) and no restatement:

      The background is grey. There are two squares on it. The squares are big. Their colour is red.

  (Facts about where things are, such as which quarter holds a square, are left out: the 2-layer student does
  not learn positions within the demo's budget, as the first version of `refer-back` showed.)

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
SIZES = {"small": 6, "big": 14}
BACKGROUNDS = {"black": (0, 0, 0), "grey": (96, 96, 96), "white": (250, 250, 250)}
COUNTS = ("one", "two", "three")
REFER_SIZE = 32
DESCRIBE_SIZE = 32

Sample = tuple[str, Segments, np.ndarray]  # a sample as a task draws it: prompt, answer pieces, image


def refer_back_segments(colour: str, size: str) -> Segments:
    """State the colour and size (they need the image), then refer back to them (they need the answer so far)."""
    return [
        ("The square is ", False),
        (colour, True),
        (" and ", False),
        (size, True),
        (f". So the {size} square is the {colour} one.", False),
    ]


def describe_segments(background: str, count: str, size: str, colour: str) -> Segments:
    """Four statements, one fact each."""
    return [
        ("The background is ", False),
        (background, True),
        (". There ", False),
        ("is" if count == "one" else "are", True),
        (" ", False),
        (count, True),
        (" square on it. The square is " if count == "one" else " squares on it. The squares are ", False),
        (size, True),
        (". Its colour is " if count == "one" else ". Their colour is ", False),
        (colour, True),
        (".", False),
    ]


def _square(image: np.ndarray, rng: random.Random, box: tuple[int, int, int, int], size: int, colour: str) -> None:
    """A `size` square of `colour` at a random place inside `box` (x, y, width, height)."""
    x0, y0, width, height = box
    x, y = x0 + rng.randrange(width - size + 1), y0 + rng.randrange(height - size + 1)
    image[y : y + size, x : x + size] = COLOURS[colour]


def refer_back_sample(rng: random.Random, facts: tuple[str, ...]) -> Sample:
    colour, size = facts
    image = np.zeros((REFER_SIZE, REFER_SIZE, 3), dtype=np.uint8)
    _square(image, rng, (0, 0, REFER_SIZE, REFER_SIZE), SIZES[size], colour)
    return "Describe the square.", refer_back_segments(colour, size), image


def describe_sample(rng: random.Random, facts: tuple[str, ...]) -> Sample:
    background, count, size, colour = facts
    image = np.full((DESCRIBE_SIZE, DESCRIBE_SIZE, 3), BACKGROUNDS[background], dtype=np.uint8)
    cell = DESCRIBE_SIZE // 2
    for quarter in rng.sample(range(4), COUNTS.index(count) + 1):
        _square(image, rng, ((quarter % 2) * cell, (quarter // 2) * cell, cell, cell), SIZES[size], colour)
    return "Describe the picture.", describe_segments(background, count, size, colour), image


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
    train = [draw(rng, rng.choice(pool)) for _ in range(train_size)]
    test = []
    for name in sorted({group(facts) for facts in pool}):
        members = [facts for facts in pool if group(facts) == name]
        test += [(name, draw(rng, rng.choice(members))) for _ in range(test_per_task)]
    return write_splits(root, train, test, progress)


def write_splits(root: Path, train: list[Sample], test: list[tuple[str, Sample]], progress: bool) -> DemoSplits:
    """Write drawn samples under `root`: the training split, and the test split (each sample with the name of its
    group, the score's breakdown) in GQA's layout, scored by the whole answer."""
    root.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(train), desc="write images", disable=not progress)
    train_rows: list[dict[str, Any]] = []
    for n, (prompt, segments, image) in enumerate(train):
        record = {"id": f"train-{n:05d}", "image": _write(root, f"images/train-{n:05d}.jpg", image)}
        train_rows.append({**record, "conversations": _conversation(prompt, segments)})
        bar.update(1)
    bar.close()
    gqa = root / "gqa"
    questions: dict[str, dict[str, Any]] = {}
    test_rows: list[dict[str, Any]] = []
    for name, (prompt, segments, image) in test:
        qid = f"test-{len(test_rows):05d}"
        _write(gqa, f"images/{qid}.jpg", image)
        answer = joined(segments)
        questions[qid] = {
            "question": prompt,
            "imageId": qid,
            "answer": answer.rstrip(".").lower(),
            "types": {"structural": name},
        }
        test_rows.append(
            {
                "id": qid,
                "image": f"gqa/images/{qid}.jpg",
                "conversations": _conversation(prompt, segments),
                "visual_spans": visual_spans(segments),
            }
        )
    (gqa / "testdev_balanced_questions.json").write_text(json.dumps(questions, indent=1))
    train_json, test_json = root / "train.json", root / "test.json"
    train_json.write_text(json.dumps(train_rows, indent=1))
    test_json.write_text(json.dumps(test_rows, indent=1))
    return DemoSplits(root, train_json, gqa, test_json, len(train_rows), len(test_rows))


REFER_BACK_POOL = list(itertools.product(COLOURS, SIZES))
DESCRIBE_POOL = list(itertools.product(BACKGROUNDS, COUNTS, SIZES, COLOURS))


def generate_refer_back(
    root: Path, train_size: int, test_per_task: int, seed: int = 0, progress: bool = True
) -> DemoSplits:
    return generate_scenes(
        root, refer_back_sample, REFER_BACK_POOL, " ".join, train_size, test_per_task, seed, progress
    )


def generate_describe(
    root: Path, train_size: int, test_per_task: int, seed: int = 0, progress: bool = True
) -> DemoSplits:
    return generate_scenes(root, describe_sample, DESCRIBE_POOL, " ".join, train_size, test_per_task, seed, progress)


class SceneBenchmark(GQA):
    """GQA's loading and scoring of a drawn-image test split: the question as it is (no short-answer
    instruction), the whole answer generated and compared with the gold one."""

    name = "scenes"
    title = "whole answer (GQA rule)"
    max_new_tokens = 64

    def load(self) -> list[ImageQuestion]:
        return [replace(q, text=q.text.removesuffix(SHORT_ANSWER)) for q in super().load()]
