"""The image-benchmark harness (docs/EVAL.md): LLaVA-1.5's prompts and each benchmark's official scoring.

A benchmark is an `ImageBenchmark` subclass registered with `@register_benchmark`: it loads the official data
into `ImageQuestion`s and scores a list of answer records. Answer records are the lines LLaVA's eval scripts write
(`{question_id, prompt, text, answer_id, model_id, metadata}`), so our prediction files go straight into the
official scorers, and old LLaVA answer files can be rescored here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from ..registry import Registry
from .base import BenchmarkError, ModelRunner, PredictionFile, Prompt, Request, run_resumable, unreadable_lines
from .provenance import RUN_FIELD, resumable

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class ImageQuestion:
    question_id: Any  # as LLaVA's question and answer files have it (str or int)
    text: str  # the user text after the image, response-format suffix included
    image: Path | bytes | None  # a file, encoded image bytes (MMBench's base64 column), or none (text-only)
    answer: Any  # the gold answer, in the benchmark's own form
    meta: dict[str, Any] = field(default_factory=dict)
    record_prompt: str | None = None  # LLaVA's answer-record `prompt` when it differs from `text`

    @property
    def prompt_field(self) -> str:
        return self.text if self.record_prompt is None else self.record_prompt

    def open_image(self) -> Image.Image | None:
        if self.image is None:
            return None
        source = io.BytesIO(self.image) if isinstance(self.image, bytes) else self.image
        try:
            return Image.open(source).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise BenchmarkError(
                f"question {self.question_id}: cannot read its image "
                f"{self.image if isinstance(self.image, Path) else '(inline)'}: {err}"
            ) from None


@dataclass
class Score:
    """Headline metrics, a breakdown (per split, category or type), how many questions had no answer, and the
    answer-file lines that could not be read."""

    benchmark: str
    metrics: dict[str, float]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    notes: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "metrics": self.metrics,
            "groups": self.groups,
            "counts": self.counts,
            "unanswered": self.unanswered,
            "notes": self.notes,
            "unreadable": self.unreadable,
        }

    def table(self) -> str:
        columns = list(dict.fromkeys(k for row in self.groups.values() for k in row))
        width = max([len(g) for g in self.groups] + [10])
        lines = []
        if self.groups:
            lines.append(f"{'':<{width}} {'n':>6} " + " ".join(f"{c:>9}" for c in columns))
            for group, row in self.groups.items():
                values = " ".join(f"{row[c]:>9.2f}" if c in row else f"{'':>9}" for c in columns)
                lines.append(f"{group:<{width}} {self.counts.get(group, 0):>6} {values}")
        lines += [f"{self.benchmark} {name}: {value:.2f}" for name, value in self.metrics.items()]
        if self.unanswered:
            lines.append(f"unanswered: {self.unanswered} (scored as the official script does)")
        lines += self.notes + unreadable_lines(self.unreadable)
        return "\n".join(lines)


def flag(*names: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One benchmark-specific command-line option (argparse `add_argument` arguments)."""
    return names, kwargs


class ImageBenchmark:
    """Load the official data, build LLaVA-1.5's prompts, and score answer records like the official script."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # what a results table calls it
    data_layout: ClassVar[str] = ""  # what --data-root must hold
    image_folder: ClassVar[str] = ""  # the images' folder under --data-root (--image-dir overrides it), if any
    max_new_tokens: ClassVar[int] = 128
    flags: ClassVar[tuple[tuple[tuple[str, ...], dict[str, Any]], ...]] = ()
    unique_ids: ClassVar[bool] = True  # question_id alone identifies a question
    # options that say where files are, not what is asked: left out of an answer file's settings
    location_options: ClassVar[tuple[str, ...]] = ("image_dir", "question_file")

    def __init__(self, root: str | Path, **options: Any) -> None:
        self.root = Path(root)
        self.options = options

    def load(self) -> list[ImageQuestion]:
        raise NotImplementedError

    @property
    def image_dir(self) -> Path:
        return Path(self.options.get("image_dir") or self.root / self.image_folder)

    def data_paths(self) -> list[Path]:
        """The files and folders a complete --data-root holds, besides the images its questions name."""
        return [self.image_dir] if self.image_folder else []

    def missing_data(self) -> list[Path]:
        """What a complete --data-root lacks: its files and folders, or, when they are all there, the images its
        questions name (`regate eval <benchmark> --check-data`)."""
        missing = [path for path in self.data_paths() if not path.exists()]
        if missing:
            return missing
        images = dict.fromkeys(q.image for q in self.load() if isinstance(q.image, Path))
        return [image for image in images if not image.exists()]

    def settings(self) -> dict[str, Any]:
        """What shapes an answer besides the model: the benchmark and its options (file locations left out)."""
        options = {k: v for k, v in sorted(self.options.items()) if k not in self.location_options}
        return {"benchmark": self.name, "max_new_tokens": self.max_new_tokens, **options}

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        raise NotImplementedError

    def question_key(self, question: ImageQuestion) -> Hashable:
        return str(question.question_id) if self.unique_ids else (str(question.question_id), question.prompt_field)

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return str(record["question_id"]) if self.unique_ids else (str(record["question_id"]), record["prompt"])

    def request(self, question: ImageQuestion) -> Request:
        image = question.open_image()
        return Request(() if image is None else (image,), Prompt(question.text, max_new_tokens=self.max_new_tokens))

    def answers_by_question(
        self, questions: list[ImageQuestion], records: list[dict[str, Any]]
    ) -> dict[Hashable, dict[str, Any]]:
        """Each question's answer record, paired by question id, never by position; a record for a question the
        data does not have is an error (an answer file with two records for one question is refused when it is
        scored: `PredictionFile.by_key`)."""
        known = {self.question_key(q) for q in questions}
        answers: dict[Hashable, dict[str, Any]] = {}
        for record in records:
            key = self.record_key(record)
            if key not in known:
                raise BenchmarkError(
                    f"{self.name}: an answer for question {record['question_id']!r} that the data under {self.root} "
                    "does not have"
                )
            answers[key] = record
        return answers

    def answer_texts(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> list[str | None]:
        """Each question's answer text, in question order (None: unanswered)."""
        answers = self.answers_by_question(questions, records)
        return [answers[k]["text"] if (k := self.question_key(q)) in answers else None for q in questions]

    def _path(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        if not path.exists():
            raise BenchmarkError(f"{self.name}: {path} is missing; --data-root must hold {self.data_layout}")
        return path


def _load_builtin_benchmarks() -> None:
    """Import the benchmark modules that ship with the plugin (each registers itself)."""
    from . import benchmarks  # noqa: F401


BENCHMARKS: Registry[type[ImageBenchmark]] = Registry(
    "benchmark", group="regate_plugin.benchmarks", builtins=_load_builtin_benchmarks
)
"""Image benchmarks by name (each is a `regate eval` command); third-party packages add theirs under the
`regate_plugin.benchmarks` entry-point group."""


def register_benchmark(cls: type[ImageBenchmark]) -> type[ImageBenchmark]:
    """Class decorator: register `cls` under `cls.name` (a name already taken is refused)."""
    return BENCHMARKS.register(cls.name, cls)


def get_benchmark(name: str, root: str | Path, **options: Any) -> ImageBenchmark:
    return BENCHMARKS.get(name)(root, **options)


def answer_record(
    question: ImageQuestion, output: str, model_id: str, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The line LLaVA's `model_vqa_loader.py` writes (its answer_id is a random uuid, which no scorer reads), with
    the run's description in `metadata` (eval/provenance.py)."""
    return {
        "question_id": question.question_id,
        "prompt": question.prompt_field,
        "text": output.strip(),
        "answer_id": f"regate-{question.question_id}",
        "model_id": model_id,
        "metadata": {} if run is None else {RUN_FIELD: run},
    }


def predict(
    benchmark: ImageBenchmark,
    questions: list[ImageQuestion],
    runner: ModelRunner,
    out: Path,
    model_id: str = "",
    batch_size: int = 1,
    progress: bool = True,
    run: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Iterator[dict[str, Any]]:
    """Answer every question not yet in `out` (LLaVA answer jsonl, appended a batch at a time). With `run`
    (eval/provenance.py), every record carries it and a file of another run is refused; `overwrite` starts the
    file again."""
    resumed = resumable(out, lambda path: read_answers(path, missing_ok=True), run, overwrite)
    return run_resumable(
        questions,
        benchmark.question_key,
        [benchmark.record_key(r) for r in resumed.records],
        benchmark.request,
        lambda q, output: answer_record(q, output, model_id, run),
        runner,
        out,
        batch_size,
        benchmark.name,
        progress,
    )


def read_answers(path: Path, missing_ok: bool = False) -> PredictionFile:
    """LLaVA-format answer records in file order (each with question_id and text), and the unreadable lines."""
    return PredictionFile.read(path, missing_ok).require("question_id", "text", kind="a LLaVA answer record")


def score_answers(
    benchmark: ImageBenchmark, questions: list[ImageQuestion], answers: PredictionFile, asked_only: bool = False
) -> Score:
    """Score an answer file on `questions`, its unreadable lines reported; `asked_only` leaves out answers to
    other questions of the data (a `--limit` run over an answer file of a longer one)."""
    records = list(answers.by_key(benchmark.record_key).values())
    if asked_only:
        asked = {benchmark.question_key(q) for q in questions}
        records = [r for r in records if benchmark.record_key(r) in asked]
    score = benchmark.score(questions, records)
    score.unreadable = answers.unreadable
    return score


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def accuracy_groups(
    items: list[tuple[str, bool]], order: Callable[[str], Any] | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Per-group accuracy (x100) and counts from (group, correct) pairs."""
    groups: dict[str, list[bool]] = {}
    for group, correct in items:
        groups.setdefault(group, []).append(correct)
    names = sorted(groups, key=order) if order else list(groups)
    return (
        {g: {"acc": 100 * ratio(sum(groups[g]), len(groups[g]))} for g in names},
        {g: len(groups[g]) for g in names},
    )
