"""The demo's video question-answering set, drawn with PyAV: short clips of squares, one of them coloured and
drifting (the moving object), the others grey and still.

Built so that ReGATE's premise holds: every answer is a templated sentence of about 30 tokens, most of which a
text-only model predicts from the prompt ("Best option:(", "The moving object is a", "square in the", ...), and a
few that only the video can tell (the option letter, the moving object's colour, its corner, the number of
squares). Three MVBench-style tasks ask for one of those facts each, so that the real MVBench loader and scorer run
on the test split unchanged; the answer states all three:

- `Moving Attribute`: what colour is the moving object?
- `Object Shuffle`: in which corner is the moving object at the end?
- `Moving Count`: how many objects are in the video?

The answer states every fact, so two clips share a text (and a sample key) only when their facts are the same.
With `shuffle_options`, options come in a shuffled order per question and every training clip gets a text of its
own; the letter then needs a second hop (fact, then the option that names it), and the demo's 2-layer student does
not learn that within its budget (docs/BENCHMARKS.md), so the default keeps the candidates' order.

Files: `train.json` (LLaVA conversation format, one `<video>` per sample); the test split in the MVBench layout
(`mvbench/json/<task>.json`, `mvbench/video/<prefix>/*.mp4`), and the same questions with their whole answers in
`test.json` (LLaVA format, plus each question's MVBench `uid` and the character spans of its answer that need the
video), for the token-level metrics.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..eval.mvbench import TASKS, OfficialProtocol, Question

FRAME_SIZE = 32
CLIP_FRAMES = 8
CLIP_FPS = 4
CELL = FRAME_SIZE // 2  # one corner of the frame; a square stays inside its cell
SQUARE = 10
GREY = (128, 128, 128)
COLOURS = {"red": (230, 30, 30), "green": (30, 210, 30), "blue": (40, 60, 240), "yellow": (235, 220, 30)}
CORNERS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4}
Segments = list[tuple[str, bool]]  # an answer as (text, needs the visual input) pieces


@dataclass(frozen=True)
class Facts:
    """What one clip shows: the moving square's colour and corner, and how many squares there are."""

    colour: str
    corner: str
    count: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass(frozen=True)
class DemoTask:
    name: str  # the MVBench task it imitates
    question: str
    attribute: str  # the `Facts` field the question asks for
    candidates: tuple[str, ...]


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("Moving Attribute", "What is the colour of the moving object?", "colour", tuple(COLOURS)),
    DemoTask("Object Shuffle", "Where is the moving object at the end?", "corner", tuple(CORNERS)),
    DemoTask("Moving Count", "How many objects are in the video?", "count", tuple(COUNTS)),
)
TASK_NAMES = [task.name for task in DEMO_TASKS]
_MVBENCH = {task.name: task for task in TASKS}


def draw_clip(rng: random.Random, facts: Facts) -> np.ndarray:
    """uint8 [CLIP_FRAMES, H, W, 3]: the coloured square drifts inside its corner's cell; grey squares stand still
    in other corners."""
    video = np.zeros((CLIP_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    room = CELL - SQUARE
    corners = [c for c in CORNERS if c != facts.corner]
    others = rng.sample(corners, COUNTS[facts.count] - 1)
    for corner in others:
        cx, cy = CORNERS[corner]
        x, y = cx * CELL + rng.randrange(room + 1), cy * CELL + rng.randrange(room + 1)
        video[:, y : y + SQUARE, x : x + SQUARE] = GREY
    cx, cy = CORNERS[facts.corner]
    start, end = [(rng.randrange(room + 1), rng.randrange(room + 1)) for _ in range(2)]
    for t in range(CLIP_FRAMES):
        x = cx * CELL + round(start[0] + (end[0] - start[0]) * t / (CLIP_FRAMES - 1))
        y = cy * CELL + round(start[1] + (end[1] - start[1]) * t / (CLIP_FRAMES - 1))
        video[t, y : y + SQUARE, x : x + SQUARE] = COLOURS[facts.colour]
    return video


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


def answer_segments(question: Question, facts: Facts) -> Segments:
    """The supervised answer as (text, needs the video) pieces. It starts with the official protocol's pre-filled
    "Best option:(" so that training and evaluation see the same tokens; the letter and every fact need the video,
    the rest is the template."""
    letter = question.letters[question.answer_index]
    return [
        ("Best option:(", False),
        (letter, True),
        (") ", False),
        (question.candidates[question.answer_index], True),
        (". The moving object is a ", False),
        (facts.colour, True),
        (" square in the ", False),
        (facts.corner, True),
        (" corner, and the number of squares is ", False),
        (facts.count, True),
        (".", False),
    ]


def joined(segments: Segments) -> str:
    return "".join(text for text, _ in segments)


def visual_spans(segments: Segments) -> list[tuple[int, int]]:
    """Character spans [start, end) of the answer that need the visual input."""
    spans, at = [], 0
    for text, visual in segments:
        if visual:
            spans.append((at, at + len(text)))
        at += len(text)
    return spans


def user_text(question: Question) -> str:
    """The official protocol's user turn (system prompt, question, options, instruction)."""
    return OfficialProtocol(num_frames=1).prompt(question).user


@dataclass(frozen=True)
class DemoSplits:
    root: Path
    train_json: Path  # LLaVA conversation format
    benchmark_root: Path  # the test split in its benchmark's layout (here MVBench's: json/, video/)
    test_json: Path  # the test questions with their whole answers, LLaVA format
    train_size: int
    test_size: int


def _combinations(task: DemoTask, shuffle_options: bool) -> list[tuple[tuple[str, ...], Facts]]:
    """Every (option order, facts) a question of `task` can have."""
    orders = list(itertools.permutations(task.candidates)) if shuffle_options else [task.candidates]
    facts = [Facts(*f) for f in itertools.product(COLOURS, CORNERS, COUNTS)]
    return list(itertools.product(orders, facts))


def _conversation(question: Question, facts: Facts) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": "<video>\n" + user_text(question)},
        {"from": "gpt", "value": joined(answer_segments(question, facts))},
    ]


def generate(
    root: Path, train_size: int, test_per_task: int, seed: int = 0, progress: bool = True, shuffle_options: bool = False
) -> DemoSplits:
    """Write both splits under `root`; tasks are balanced, test clips are drawn independently, everything from
    `seed`. With `shuffle_options`, each training clip has a text of its own."""
    rng = random.Random(seed)
    pools = {task.name: _combinations(task, shuffle_options) for task in DEMO_TASKS}
    per_task = -(-train_size // len(DEMO_TASKS))
    smallest = min(len(pool) for pool in pools.values())
    if shuffle_options and per_task > smallest:
        raise ValueError(
            f"--train-size {train_size} asks for {per_task} clips per task, but a task has only {smallest} distinct "
            f"texts; use --train-size {smallest * len(DEMO_TASKS)} or less"
        )
    draw = rng.sample if shuffle_options else lambda pool, n: [rng.choice(pool) for _ in range(n)]
    drawn = {name: draw(pool, per_task) for name, pool in pools.items()}
    root.mkdir(parents=True, exist_ok=True)
    mvbench = root / "mvbench"
    bar = tqdm(total=train_size + test_per_task * len(DEMO_TASKS), desc="draw video clips", disable=not progress)
    train: list[dict[str, Any]] = []
    for n in range(train_size):
        task = DEMO_TASKS[n % len(DEMO_TASKS)]
        order, facts = drawn[task.name][n // len(DEMO_TASKS)]
        video = f"train/{n:05d}.mp4"
        write_clip(root / video, draw_clip(rng, facts))
        question = Question(
            task.name, n, root / video, task.question, order, order.index(facts.value(task.attribute)), None
        )
        train.append({"id": f"demo-{n:05d}", "video": video, "conversations": _conversation(question, facts)})
        bar.update(1)
    train_json = root / "train.json"
    train_json.write_text(json.dumps(train, indent=1))
    test: list[dict[str, Any]] = []
    for task in DEMO_TASKS:
        prefix = _MVBENCH[task.name].prefix
        records = []
        for i in range(test_per_task):
            order, facts = rng.choice(pools[task.name])
            facts = Facts(**{**vars(facts), task.attribute: task.candidates[i % len(task.candidates)]})
            name = f"{task.name.lower().replace(' ', '_')}_{i:04d}.mp4"
            write_clip(mvbench / "video" / prefix / name, draw_clip(rng, facts))
            answer = facts.value(task.attribute)
            records.append({"video": name, "question": task.question, "candidates": list(order), "answer": answer})
            question = Question(
                task.name, i, mvbench / "video" / prefix / name, task.question, order, order.index(answer), None
            )
            test.append(
                {
                    "id": question.uid,
                    "video": str((mvbench / "video" / prefix / name).relative_to(root)),
                    "conversations": _conversation(question, facts),
                    "visual_spans": visual_spans(answer_segments(question, facts)),
                }
            )
            bar.update(1)
        (mvbench / "json").mkdir(parents=True, exist_ok=True)
        (mvbench / "json" / _MVBENCH[task.name].json_file).write_text(json.dumps(records, indent=1))
    test_json = root / "test.json"
    test_json.write_text(json.dumps(test, indent=1))
    bar.close()
    return DemoSplits(root, train_json, mvbench, test_json, train_size, test_per_task * len(DEMO_TASKS))
