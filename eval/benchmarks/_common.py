"""Reading benchmark files with errors that name the file and the record; VQA-accuracy scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..image import BenchmarkError, ImageBenchmark, ImageQuestion, Score, ratio
from ..vqa_accuracy import ANNOTATORS, vqa_accuracy


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{path}: not valid JSON ({err})") from None


def require(record: dict[str, Any], name: str, where: str) -> Any:
    try:
        return record[name]
    except KeyError:
        raise BenchmarkError(f"{where}: missing field {name!r}") from None


def annotator_answers(record: dict[str, Any], where: str, field: str = "answers") -> list[Any]:
    """The record's VQA annotator answers: exactly 10, as VQA accuracy needs them."""
    answers = require(record, field, where)
    if not isinstance(answers, list) or len(answers) != ANNOTATORS:
        count = len(answers) if isinstance(answers, list) else type(answers).__name__
        raise BenchmarkError(f"{where}: {field!r} must list {ANNOTATORS} annotator answers, it has {count}")
    return answers


def vqa_score(
    benchmark: ImageBenchmark,
    questions: list[ImageQuestion],
    records: list[dict[str, Any]],
    group: str,
    notes: list[str],
) -> Score:
    """Mean VQA accuracy x100 overall and per `meta[group]`; an unanswered question scores 0."""
    texts = benchmark.answer_texts(questions, records)
    scores = [0.0 if t is None else vqa_accuracy(t, q.answer) for t, q in zip(texts, questions)]
    by_group: dict[str, list[float]] = {}
    for q, s in zip(questions, scores):
        by_group.setdefault(q.meta.get(group, ""), []).append(s)
    groups = {g: {"acc": 100 * ratio(sum(v), len(v))} for g, v in sorted(by_group.items())}
    return Score(
        benchmark.name,
        {"acc": 100 * ratio(sum(scores), len(scores))},
        groups,
        {g: len(v) for g, v in sorted(by_group.items())},
        texts.count(None),
        notes,
    )
