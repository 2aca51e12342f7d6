"""MVBench (docs/EVAL.md): the 20-task table, the loader, and two protocols scored exactly like their
reference code: `official` (VideoChat2's notebook) and `videollama2` (VideoLLaMA2's MCQA scripts).

Predictions are one JSON line per question, flushed as they come, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..registry import Registry
from .base import BenchmarkError, ModelRunner, PredictionFile, Prompt, Request, run_resumable, unreadable_lines
from .frames import Bound, VisualSource, sample_official, sample_videollama2
from .provenance import RUN_FIELD, resumable


@dataclass(frozen=True)
class Task:
    name: str  # leaderboard key
    json_file: str
    prefix: str  # folder under the MVBench `video/` root
    data_type: str  # 'video' or 'frame'
    bounded: bool  # start/end seconds are used


TASKS: tuple[Task, ...] = tuple(
    Task(*row)
    for row in (
        ("Action Sequence", "action_sequence.json", "star/Charades_v1_480/", "video", True),
        ("Action Prediction", "action_prediction.json", "star/Charades_v1_480/", "video", True),
        ("Action Antonym", "action_antonym.json", "ssv2_video/", "video", False),
        ("Fine-grained Action", "fine_grained_action.json", "Moments_in_Time_Raw/videos/", "video", False),
        ("Unexpected Action", "unexpected_action.json", "FunQA_test/test/", "video", False),
        ("Object Existence", "object_existence.json", "clevrer/video_validation/", "video", False),
        ("Object Interaction", "object_interaction.json", "star/Charades_v1_480/", "video", True),
        ("Object Shuffle", "object_shuffle.json", "perception/videos/", "video", False),
        ("Moving Direction", "moving_direction.json", "clevrer/video_validation/", "video", False),
        ("Action Localization", "action_localization.json", "sta/sta_video/", "video", True),
        ("Scene Transition", "scene_transition.json", "scene_qa/video/", "video", False),
        ("Action Count", "action_count.json", "perception/videos/", "video", False),
        ("Moving Count", "moving_count.json", "clevrer/video_validation/", "video", False),
        ("Moving Attribute", "moving_attribute.json", "clevrer/video_validation/", "video", False),
        ("State Change", "state_change.json", "perception/videos/", "video", False),
        ("Fine-grained Pose", "fine_grained_pose.json", "nturgbd/", "video", False),
        ("Character Order", "character_order.json", "perception/videos/", "video", False),
        ("Egocentric Navigation", "egocentric_navigation.json", "vlnqa/", "video", False),
        ("Episodic Reasoning", "episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
        ("Counterfactual Inference", "counterfactual_inference.json", "clevrer/video_validation/", "video", False),
    )
)


class MVBenchError(BenchmarkError):
    """Malformed MVBench data or predictions: the message names the file and the record."""


@dataclass(frozen=True)
class Question:
    task: str
    index: int  # position in the task's JSON list
    video: Path
    question: str
    candidates: tuple[str, ...]
    answer_index: int
    bound: Bound | None

    @property
    def uid(self) -> str:
        return f"{self.task}/{self.index}"

    @property
    def letters(self) -> list[str]:
        return [chr(ord("A") + i) for i in range(len(self.candidates))]


@dataclass
class MVBenchData:
    questions: list[Question]
    counts: dict[str, int]
    missing: list[str]  # tasks whose JSON or media is absent


def _media_root(root: Path, prefix: str) -> Path:
    """`video/<prefix>`, or the `video/data0613/<prefix>` layout some archives unpack into."""
    for candidate in (root / "video" / prefix, root / "video" / "data0613" / prefix):
        if candidate.exists():
            return candidate
    return root / "video" / prefix


def _wanted(tasks: list[str] | None) -> list[Task]:
    unknown = sorted(set(tasks or []) - {t.name for t in TASKS})
    if unknown:
        raise MVBenchError(f"unknown MVBench task(s) {unknown}; known: {[t.name for t in TASKS]}")
    return [t for t in TASKS if tasks is None or t.name in tasks]


def _task_questions(root: Path, task: Task) -> list[Question]:
    """The questions of `json/<task>.json` (which must exist); each answer must be one of its candidates."""
    path = root / "json" / task.json_file
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MVBenchError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise MVBenchError(f"{path}: expected a JSON list of questions, got {type(records).__name__}")
    media = _media_root(root, task.prefix)
    loaded = []
    for i, record in enumerate(records):
        where = f"{path} record {i}"
        try:
            candidates = tuple(record["candidates"])
            answer = record["answer"]
            video = record["video"]
            question = record["question"]
            bound = (float(record["start"]), float(record["end"])) if task.bounded else None
        except KeyError as err:
            raise MVBenchError(f"{where}: missing field {err}") from None
        except (TypeError, ValueError) as err:
            raise MVBenchError(f"{where}: {err}") from None
        if answer not in candidates:
            raise MVBenchError(f"{where}: answer {answer!r} is not one of its candidates {list(candidates)}")
        loaded.append(Question(task.name, i, media / video, question, candidates, candidates.index(answer), bound))
    return loaded


def load_mvbench(root: str | Path, tasks: list[str] | None = None, allow_missing: bool = False) -> MVBenchData:
    """Read `json/<task>.json` for every task; each answer must be one of its candidates. A task whose JSON or
    first video is absent is missing: an error unless `allow_missing` (NTU pose videos are no longer distributed)."""
    root = Path(root)
    questions, counts, missing = [], {}, []
    for task in _wanted(tasks):
        if not (root / "json" / task.json_file).exists():
            missing.append(task.name)
            continue
        loaded = _task_questions(root, task)
        if loaded and not loaded[0].video.exists():
            missing.append(task.name)
            continue
        questions += loaded
        counts[task.name] = len(loaded)
    if missing and not allow_missing:
        raise MVBenchError(
            f"MVBench task(s) missing under {root}: {missing} (json/ or video/ absent; `regate eval mvbench "
            "--check-data` lists the missing paths); pass --allow-missing to score the others (the result is then "
            "labelled with the number of tasks)"
        )
    return MVBenchData(questions, counts, missing)


def missing_paths(root: str | Path, tasks: list[str] | None = None) -> list[Path]:
    """What a complete MVBench root lacks for `tasks` (default: all 20), as paths: each task's JSON file, its
    `video/<prefix>` folder, or the videos (or frame folders) its records name (`regate eval mvbench --check-data`)."""
    root = Path(root)
    missing: dict[Path, None] = {}
    for task in _wanted(tasks):
        path, media = root / "json" / task.json_file, _media_root(root, task.prefix)
        for absent in (p for p in (path, media) if not p.exists()):
            missing[absent] = None
        if path.exists() and media.exists():
            missing.update(dict.fromkeys(q.video for q in _task_questions(root, task) if not q.video.exists()))
    return list(missing)


OFFICIAL_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement of "
    "objects, and the action and pose of persons. Based on your observations, select the best option that "
    "accurately addresses the question.\n"
)
# mm_infer puts Llama-2's system prompt in front for these VideoLLaMA2 model types (not for videollama2_qwen2)
LLAMA2_SYSTEM_MODEL_TYPES = ("videollama2", "videollama2_mistral", "videollama2_mixtral")
LLAMA2_SYSTEM = (
    "<<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\nIf a question does not "
    "make any sense, or is not factually coherent, explain why instead of answering something not correct. If you "
    "don't know the answer to a question, please don't share false information.\n<</SYS>>"
)
VIDEOLLAMA2_INSTRUCTION = (
    "Answer with the option's letter from the given choices directly and only give the best option."
)


def check_ans(pred: str, gt: str) -> bool:
    """VideoChat2's loose rule on first tokens: "(" alone (an empty output) counts as correct."""
    pred_option = pred.lower().split(" ")[0]
    gt_option = gt.lower().split(" ")[0]
    return pred_option.replace(".", "") in gt_option or gt_option in pred_option


@dataclass(frozen=True)
class Parsed:
    letter: str
    fallback: str = ""  # '', 'empty', 'substring', 'option_c'


class MVBenchProtocol:
    """A prompt, a frame rule and an answer rule."""

    name = ""
    default_frames = 16  # frames per video when --num-frames is not given

    def __init__(self, num_frames: int, model_type: str = "") -> None:
        self.num_frames = num_frames
        self.model_type = model_type  # the evaluated model's config.model_type, where the protocol depends on it

    def frames(self, question: Question) -> list[Image.Image]:
        raise NotImplementedError

    def prompt(self, question: Question) -> Prompt:
        raise NotImplementedError

    def parse(self, question: Question, output: str) -> tuple[Parsed, bool]:
        raise NotImplementedError


class OfficialProtocol(MVBenchProtocol):
    """VideoChat2 `mvbench.ipynb`: 16 frames by `get_index`, the system prompt repeated in the user turn,
    "Best option:(" pre-filled, 100 new tokens, first line, "(" prepended, `check_ans`."""

    name = "official"
    default_frames = 16

    def frames(self, question: Question) -> list[Image.Image]:
        return sample_official(VisualSource(question.video), self.num_frames, question.bound)

    def prompt(self, question: Question) -> Prompt:
        options = "".join(f"\n({letter}) {c}" for letter, c in zip(question.letters, question.candidates))
        block = f"Question: {question.question}\nOptions:{options}".rstrip()
        return Prompt(
            OFFICIAL_SYSTEM + block + "\nOnly give the best option.\n", OFFICIAL_SYSTEM, "Best option:(", 100, ("###",)
        )

    def parse(self, question: Question, output: str) -> tuple[Parsed, bool]:
        first_line = output.strip().split("\n")[0]
        pred = "(" + first_line
        gt = f"({question.letters[question.answer_index]}) {question.candidates[question.answer_index]}"
        token = pred.split(" ")[0].strip("(). ").upper()
        letter = token if token in question.letters else ""
        return Parsed(letter, "empty" if not first_line.strip() else ""), check_ans(pred, gt)


class VideoLLaMA2Protocol(MVBenchProtocol):
    """VideoLLaMA2 `inference_video_mcqa_mvbench.py`: `frame_sample` frames, the letter instruction (after Llama-2's
    system prompt for the Mistral/Mixtral model types), greedy, `mvbench_dump` (first in-range capital letter, else an
    option's text, else option C)."""

    name = "videollama2"
    default_frames = 8

    def frames(self, question: Question) -> list[Image.Image]:
        return sample_videollama2(VisualSource(question.video), self.num_frames, question.bound)

    def prompt(self, question: Question) -> Prompt:
        options = "".join(f"({letter}) {c}\n" for letter, c in zip(question.letters, question.candidates))
        system = LLAMA2_SYSTEM if self.model_type in LLAMA2_SYSTEM_MODEL_TYPES else None
        return Prompt(f"Question: {question.question}\nOptions:\n{options}{VIDEOLLAMA2_INSTRUCTION}", system, "", 2048)

    def parse(self, question: Question, output: str) -> tuple[Parsed, bool]:
        letters = question.letters
        text = output.replace("answer", "").replace("Answer", "")
        found = re.findall(f"[\\(,\\ ]*[{letters[0]}-{letters[-1]}][\\),\\ ]*", text)
        if found:
            token = found[0].strip().strip("()")
            parsed = Parsed(token) if token in letters else Parsed("C", "option_c")
        else:
            index = next((i for i, c in enumerate(question.candidates) if c.lower() in text.lower()), None)
            parsed = Parsed(letters[index], "substring") if index is not None else Parsed("C", "option_c")
        return parsed, letters.index(parsed.letter) == question.answer_index


PROTOCOLS: Registry[type[MVBenchProtocol]] = Registry("MVBench protocol")
"""MVBench protocols by name (`regate eval mvbench --protocol`)."""
PROTOCOLS.register(OfficialProtocol.name, OfficialProtocol)
PROTOCOLS.register(VideoLLaMA2Protocol.name, VideoLLaMA2Protocol)


def get_protocol(name: str, num_frames: int | None = None, model_type: str = "") -> MVBenchProtocol:
    protocol = PROTOCOLS.get(name)
    return protocol(num_frames or protocol.default_frames, model_type)


def _prompt_hash(prompt: Prompt) -> str:
    return hashlib.blake2b(json.dumps(asdict(prompt), sort_keys=True).encode(), digest_size=8).hexdigest()


def prediction_record(
    question: Question, protocol: MVBenchProtocol, output: str, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One question's prediction, parsed by `protocol`, with the run's description in `metadata`
    (eval/provenance.py)."""
    parsed, correct = protocol.parse(question, output)
    return {
        "uid": question.uid,
        "task": question.task,
        "video": str(question.video),
        "protocol": protocol.name,
        "prompt_hash": _prompt_hash(protocol.prompt(question)),
        "output": output,
        "pred": parsed.letter,
        "gt": question.letters[question.answer_index],
        "correct": correct,
        "fallback": parsed.fallback,
        "metadata": {} if run is None else {RUN_FIELD: run},
    }


def read_predictions(path: Path, missing_ok: bool = True) -> PredictionFile:
    """Our prediction file (records with uid, task and correct, in file order) and its unreadable lines."""
    return PredictionFile.read(path, missing_ok).require("uid", "task", "correct", kind="an MVBench prediction")


def by_uid(predictions: PredictionFile) -> dict[str, dict[str, Any]]:
    """One record per question (two for one question are an error naming the file)."""
    return predictions.by_key(lambda record: record["uid"])


def predict(
    data: MVBenchData,
    protocol: MVBenchProtocol,
    runner: ModelRunner,
    out: Path,
    progress: bool = True,
    batch_size: int = 1,
    run: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Iterator[dict[str, Any]]:
    """Run every question not yet in `out` (jsonl, appended a batch at a time); yields new records. With `run`
    (eval/provenance.py), every record carries it and a file of another run is refused; `overwrite` starts the
    file again."""
    resumed = resumable(out, read_predictions, run, overwrite)
    return run_resumable(
        data.questions,
        lambda q: q.uid,
        by_uid(resumed),
        lambda q: Request(tuple(protocol.frames(q)), protocol.prompt(q), video=True),
        lambda q, output: prediction_record(q, protocol, output, run),
        runner,
        out,
        batch_size,
        "mvbench",
        progress,
    )


@dataclass
class MVBenchResult:
    per_task: dict[str, float]
    counts: dict[str, int]
    correct: int
    total: int
    missing: list[str] = field(default_factory=list)
    fallbacks: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0  # questions without a prediction, counted as wrong
    unreadable: list[str] = field(default_factory=list)  # prediction-file lines that did not parse

    @property
    def average(self) -> float:
        """Total correct / total questions x 100: the leaderboard "Avg" (sample-weighted)."""
        return 100.0 * self.correct / self.total if self.total else 0.0

    @property
    def task_mean(self) -> float:
        return sum(self.per_task.values()) / len(self.per_task) if self.per_task else 0.0

    @property
    def label(self) -> str:
        return f"{len(self.per_task)}-task"

    def leaderboard(self) -> dict[str, float]:
        return {**self.per_task, "Avg": self.average}

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "avg": self.average,
            "task_mean": self.task_mean,
            "per_task": self.per_task,
            "counts": self.counts,
            "correct": self.correct,
            "total": self.total,
            "missing": self.missing,
            "fallbacks": self.fallbacks,
            "unanswered": self.unanswered,
            "unreadable": self.unreadable,
        }

    def table(self) -> str:
        lines = [f"{'task':<26} {'n':>5} {'acc':>6}"]
        lines += [f"{t:<26} {self.counts[t]:>5} {acc:>6.1f}" for t, acc in self.per_task.items()]
        lines.append(f"{'Avg (' + self.label + ')':<26} {self.total:>5} {self.average:>6.1f}")
        if self.missing:
            lines.append(f"missing: {', '.join(self.missing)}")
        if any(self.fallbacks.values()):
            lines.append("fallbacks: " + ", ".join(f"{k} {v}" for k, v in self.fallbacks.items() if v))
        if self.unanswered:
            lines.append(f"unanswered: {self.unanswered} (counted as wrong, as the reference scoring does)")
        return "\n".join(lines + unreadable_lines(self.unreadable))


def aggregate(
    records: list[dict[str, Any]],
    missing: list[str] | None = None,
    asked: dict[str, int] | None = None,
    unreadable: list[str] | None = None,
) -> MVBenchResult:
    """Per-task accuracy and the sample-weighted average, in task-table order; fallback counts.

    `asked`: the questions per task the records answer (one record per question). In a task with predictions,
    each asked question without one is wrong and counted as unanswered; a task without any is missing."""
    order = [t.name for t in TASKS]
    tasks = sorted({r["task"] for r in records}, key=lambda t: order.index(t) if t in order else len(order))
    per_task, counts, correct, unanswered = {}, {}, 0, 0
    for task in tasks:
        flags = [bool(r["correct"]) for r in records if r["task"] == task]
        total = max(len(flags), (asked or {}).get(task, 0))
        per_task[task], counts[task] = 100.0 * sum(flags) / total, total
        correct, unanswered = correct + sum(flags), unanswered + total - len(flags)
    fallbacks: dict[str, int] = {}
    for r in records:
        if r.get("fallback"):
            fallbacks[r["fallback"]] = fallbacks.get(r["fallback"], 0) + 1
    absent = list(missing or []) + [t for t in order if t not in per_task and t not in (missing or [])]
    return MVBenchResult(
        per_task, counts, correct, sum(counts.values()), absent, fallbacks, unanswered, list(unreadable or [])
    )


def questions_per_task(questions: list[Question]) -> dict[str, int]:
    """How many questions each task asks (the `asked` of `aggregate`)."""
    return dict(Counter(q.task for q in questions))


def load_prediction_file(path: Path, protocol: MVBenchProtocol | None, data: MVBenchData | None) -> PredictionFile:
    """Our jsonl (one record per question; re-parsed from raw outputs with `protocol` when data
    is given), or VideoLLaMA2's `{vid, task_type, pred, gt}` lines (indices, scored as its eval script does);
    the unreadable lines kept."""
    lines = PredictionFile.read(path)
    if lines.records and isinstance(lines.records[0], dict) and "task_type" in lines.records[0]:
        lines.require("task_type", "pred", "gt", kind="a VideoLLaMA2 MVBench answer")
        records = [{"task": r["task_type"], "correct": r["pred"] == r["gt"], "fallback": ""} for r in lines.records]
        return PredictionFile(path, records, lines.unreadable)
    reparse = protocol is not None and data is not None
    fields = ("uid", "task", "correct", "output") if reparse else ("uid", "task", "correct")
    records = list(by_uid(lines.require(*fields, kind="an MVBench prediction")).values())
    if reparse:
        questions = {q.uid: q for q in data.questions}
        unknown = [r["uid"] for r in records if r["uid"] not in questions]
        if unknown:
            raise MVBenchError(f"{path}: {len(unknown)} prediction(s) for questions not in the data, e.g. {unknown[0]}")
        records = [prediction_record(questions[r["uid"]], protocol, r["output"]) for r in records]
    return PredictionFile(path, records, lines.unreadable)
