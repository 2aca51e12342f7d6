"""The demo's video question-answering set, drawn with PyAV: short clips of coloured squares that move or appear.

Three MVBench-style tasks, named after the MVBench tasks they imitate so that the real MVBench loader and
scorer run on the test split unchanged:

- `Moving Attribute`: one square moves; what colour is it?
- `Moving Direction`: one square crosses the frame; which way does it move?
- `Moving Count`: squares appear one after another; how many are there at the end?

Every answer mixes words a text-only model can guess from the prompt ("Best option:(", "The object in the video
is") with words only the video can tell (the option letter). The train split is in the LLaVA conversation format
(`train.json`, one `<video>` per sample); the test split is in the MVBench layout (`json/<task>.json`,
`video/clevrer/video_validation/*.mp4`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..eval.mvbench import TASKS, OfficialProtocol, Question

FRAME_SIZE = 32
CLIP_FRAMES = 8
CLIP_FPS = 4
SQUARE = 12
COLOURS = {"red": (230, 30, 30), "green": (30, 210, 30), "blue": (40, 60, 240), "yellow": (235, 220, 30)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNTS = {"one": 1, "two": 2, "three": 3}


@dataclass(frozen=True)
class ClipSpec:
    """What one clip shows: squares (colour, start x, start y, per-frame dx, dy, first frame shown)."""

    squares: tuple[tuple[str, int, int, int, int, int], ...]

    def frames(self) -> np.ndarray:
        """uint8 [CLIP_FRAMES, H, W, 3]."""
        video = np.zeros((CLIP_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
        for t in range(CLIP_FRAMES):
            for colour, x, y, dx, dy, first in self.squares:
                if t >= first:
                    left, top = x + dx * t, y + dy * t
                    video[t, max(top, 0) : max(top + SQUARE, 0), max(left, 0) : max(left + SQUARE, 0)] = COLOURS[colour]
        return video


@dataclass(frozen=True)
class DemoTask:
    name: str  # the MVBench task it imitates
    question: str
    candidates: tuple[str, ...]
    sentence: str  # the answer's second sentence, "{}" for the right candidate
    draw: Callable[[random.Random, str], ClipSpec]


def _moving_colour(rng: random.Random, colour: str) -> ClipSpec:
    dx, dy = rng.choice(list(DIRECTIONS.values()))
    span = FRAME_SIZE - SQUARE
    x, y = rng.randrange(span // 4, 3 * span // 4 + 1), rng.randrange(span // 4, 3 * span // 4 + 1)
    return ClipSpec(((colour, x, y, dx, dy, 0),))


def _moving_direction(rng: random.Random, direction: str) -> ClipSpec:
    dx, dy = DIRECTIONS[direction]
    speed = 3
    span = FRAME_SIZE - SQUARE
    across = rng.randrange(0, span + 1)
    start = 0 if (dx + dy) > 0 else span
    x, y = (start, across) if dx else (across, start)
    return ClipSpec(((rng.choice(list(COLOURS)), x, y, dx * speed, dy * speed, 0),))


def _moving_count(rng: random.Random, count: str) -> ClipSpec:
    cells = rng.sample([(x, y) for x in (2, 18) for y in (2, 18)], COUNTS[count])
    firsts = sorted([0] + [rng.randrange(1, CLIP_FRAMES // 2) for _ in cells[1:]])
    return ClipSpec(tuple((rng.choice(list(COLOURS)), x, y, 0, 0, first) for (x, y), first in zip(cells, firsts)))


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask(
        "Moving Attribute",
        "What is the colour of the moving object?",
        tuple(COLOURS),
        "The object in the video is {}.",
        _moving_colour,
    ),
    DemoTask(
        "Moving Direction",
        "Which direction does the object move?",
        tuple(DIRECTIONS),
        "The object in the video moves {}.",
        _moving_direction,
    ),
    DemoTask(
        "Moving Count",
        "How many objects are in the video at the end?",
        tuple(COUNTS),
        "The number of objects in the video is {}.",
        _moving_count,
    ),
)
TASK_NAMES = [task.name for task in DEMO_TASKS]
_MVBENCH = {task.name: task for task in TASKS}


def write_clip(path: Path, frames: np.ndarray) -> Path:
    """An mp4 (MPEG-4 part 2, yuv420p, near-lossless) of `frames`, at CLIP_FPS."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=CLIP_FPS)
        stream.width = stream.height = FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def answer_text(task: DemoTask, answer_index: int) -> str:
    """The supervised answer: it starts with the official protocol's pre-filled "Best option:(" so that
    training and evaluation see the same tokens."""
    letter = chr(ord("A") + answer_index)
    candidate = task.candidates[answer_index]
    return f"Best option:({letter}) {candidate}. {task.sentence.format(candidate)}"


def user_text(question: Question) -> str:
    """The official protocol's user turn (system prompt, question, options, instruction)."""
    return OfficialProtocol(num_frames=1).prompt(question).user


@dataclass(frozen=True)
class DemoSplits:
    root: Path
    train_json: Path  # LLaVA conversation format
    mvbench_root: Path  # MVBench layout: json/, video/
    train_size: int
    test_size: int


def generate(root: Path, train_size: int, test_per_task: int, seed: int = 0, progress: bool = True) -> DemoSplits:
    """Write both splits under `root`; tasks and answers are balanced, clips are drawn from `seed`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    mvbench = root / "mvbench"
    bar = tqdm(total=train_size + test_per_task * len(DEMO_TASKS), desc="draw video clips", disable=not progress)
    train: list[dict[str, Any]] = []
    for n in range(train_size):
        task = DEMO_TASKS[n % len(DEMO_TASKS)]
        answer = rng.randrange(len(task.candidates))
        video = f"train/{n:05d}.mp4"
        write_clip(root / video, task.draw(rng, task.candidates[answer]).frames())
        question = Question(task.name, n, root / video, task.question, task.candidates, answer, None)
        train.append(
            {
                "id": f"demo-{n:05d}",
                "video": video,
                "conversations": [
                    {"from": "human", "value": "<video>\n" + user_text(question)},
                    {"from": "gpt", "value": answer_text(task, answer)},
                ],
            }
        )
        bar.update(1)
    train_json = root / "train.json"
    train_json.write_text(json.dumps(train, indent=1))
    for task in DEMO_TASKS:
        prefix = _MVBENCH[task.name].prefix
        records = []
        for i in range(test_per_task):
            answer = i % len(task.candidates)
            name = f"{task.name.lower().replace(' ', '_')}_{i:04d}.mp4"
            write_clip(mvbench / "video" / prefix / name, task.draw(rng, task.candidates[answer]).frames())
            records.append(
                {
                    "video": name,
                    "question": task.question,
                    "candidates": list(task.candidates),
                    "answer": task.candidates[answer],
                }
            )
            bar.update(1)
        (mvbench / "json").mkdir(parents=True, exist_ok=True)
        (mvbench / "json" / _MVBENCH[task.name].json_file).write_text(json.dumps(records, indent=1))
    bar.close()
    return DemoSplits(root, train_json, mvbench, train_size, test_per_task * len(DEMO_TASKS))
