"""MMBench dev (docs/EVAL.md), rule-based and therefore approximate: LLaVA's `model_vqa_mmbench.py` prompt
over the TSV's rows (which already hold the circular rotations) and CircularEval with rule-based option
extraction only; the official numbers add a GPT fallback for outputs the rules cannot read."""

from __future__ import annotations

import base64
import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..image import LETTER_ANSWER, BenchmarkError, ImageBenchmark, ImageQuestion, Score, flag, ratio, register_benchmark

LETTERS = ("A", "B", "C", "D")
CN_ANSWER = "\n请直接回答选项字母。"
CIRCULAR_STRIDE = 1_000_000  # rows index + k * 1e6 rotate the options of row `index`
# what pandas' read_table (LLaVA's reader) turns into NaN, and LLaVA's is_none then skips
MISSING = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
        "none",
    }
)
PUNCTUATION = ".()[],:;!*#{}"


def is_missing(value: str | None) -> bool:
    return value is None or value in MISSING or value.lower() in ("nan", "none")


def mmbench_letter(text: str, options: dict[str, str]) -> str | None:
    """The one option letter standing alone in the output, else the one option whose text it contains."""
    for p in PUNCTUATION:
        text = text.replace(p, " ")
    words = text.split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    contained = [letter for letter, option in options.items() if option.lower() in text.lower()]
    return contained[0] if len(contained) == 1 else None


@register_benchmark
class MMBench(ImageBenchmark):
    name = "mmbench"
    title = "MMBench-dev (rule-based)"
    data_layout = "the MMBench dev TSV (mmbench_dev_20230712.tsv, or the CN one via --tsv)"
    max_new_tokens = 1024  # model_vqa_mmbench
    flags = (
        flag(
            "--tsv", default="mmbench_dev_20230712.tsv", help="TSV under DATA_ROOT (default: mmbench_dev_20230712.tsv)"
        ),
        flag(
            "--lang", choices=["en", "cn"], help="answer instruction language (default: cn if the TSV name has '_cn')"
        ),
    )

    def tsv_name(self) -> str:
        return self.options.get("tsv") or "mmbench_dev_20230712.tsv"

    def data_paths(self) -> list[Path]:
        return [self.root / self.tsv_name()]

    def _rows(self) -> Iterator[tuple[str, dict[str, str]]]:
        """(where, row) for each data row of the TSV; `where` names the file and the line."""
        csv.field_size_limit(sys.maxsize)
        path = self._path(self.tsv_name())
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows and not {"index", "question", "answer", "image", "A", "B"} <= set(rows[0]):
            raise BenchmarkError(f"{path}: not an MMBench TSV (columns {sorted(rows[0])})")
        for line, row in enumerate(rows, start=2):
            yield f"{path} line {line}", row

    def load(self) -> list[ImageQuestion]:
        lang = self.options.get("lang") or ("cn" if "_cn" in (self.options.get("tsv") or "") else "en")
        questions = []
        for where, row in self._rows():
            options = {}
            for letter in LETTERS:
                if is_missing(row.get(letter)):
                    break
                options[letter] = row[letter]
            prompt = row["question"] if is_missing(row.get("hint")) else row["hint"] + "\n" + row["question"]
            prompt += "".join(f"\n{letter}. {option}" for letter, option in options.items())
            try:
                index, image = int(row["index"]), base64.b64decode(row["image"])
            except (TypeError, ValueError) as err:  # binascii.Error is a ValueError
                raise BenchmarkError(
                    f"{where}: the index is not an integer or the image is not base64 ({err})"
                ) from None
            questions.append(
                ImageQuestion(
                    index,
                    prompt + (CN_ANSWER if lang == "cn" else LETTER_ANSWER),
                    image,
                    row["answer"],
                    {"options": options, "category": row.get("category", ""), "l2": row.get("l2-category", "")},
                    prompt,
                )
            )
        return questions

    def score(self, questions: list[ImageQuestion], records: list[dict[str, Any]]) -> Score:
        """A base question (index mod 1e6) counts only if every rotation of it is answered with its letter."""
        texts = dict(zip((q.question_id for q in questions), self.answer_texts(questions, records)))
        rounds: dict[int, list[ImageQuestion]] = {}
        for q in questions:
            rounds.setdefault(q.question_id % CIRCULAR_STRIDE, []).append(q)
        passed: dict[int, bool] = {}
        unanswered = unreadable = 0
        for base, group in rounds.items():
            letters = []
            for q in group:
                text = texts[q.question_id]
                unanswered += text is None
                letter = None if text is None else mmbench_letter(text, q.meta["options"])
                unreadable += text is not None and letter is None
                letters.append(letter == q.answer)
            passed[base] = all(letters)
        firsts = {base: group[0] for base, group in rounds.items()}
        groups, counts = {}, {}
        for field in ("category", "l2"):
            for name in sorted({q.meta[field] for q in firsts.values()}):
                bases = [b for b, q in firsts.items() if q.meta[field] == name]
                groups[f"{field}: {name}"] = {"acc": 100 * ratio(sum(passed[b] for b in bases), len(bases))}
                counts[f"{field}: {name}"] = len(bases)
        notes = [
            f"approximate: rule-based extraction only; {unreadable} output(s) it could not read count as wrong "
            "(the official evaluation asks GPT instead)"
        ]
        return Score(
            self.name,
            {"circular_acc": 100 * ratio(sum(passed.values()), len(passed))},
            groups,
            counts,
            unanswered,
            notes,
        )
