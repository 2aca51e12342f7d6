"""VQA accuracy as LLaVA scores TextVQA (docs/EVAL.md): the EvalAI answer normalisation and the
leave-one-out soft score over 10 annotator answers (`m4c_evaluator.TextVQAAccuracyEvaluator`), quirks included."""

from __future__ import annotations

import re
from functools import lru_cache

NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ANNOTATORS = 10  # answers per question in VQA-style data
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
PERIOD = re.compile(r"(\.)(?!\d)")  # a period not followed by a digit
PERIODS_REMOVED = 32  # the reference passes re.UNICODE (= 32) where `sub` takes its count

# Contractions as written; the normaliser restores each from any spelling that lacks exactly one of its apostrophes.
CONTRACTIONS_WRITTEN = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've"
).split()


@lru_cache(maxsize=1)
def contraction_table() -> dict[str, str]:
    table = {}
    for written in CONTRACTIONS_WRITTEN:
        for i, char in enumerate(written):
            if char == "'":
                table[written[:i] + written[i + 1 :]] = written
    table["somebody'd"] = "somebodyd"  # the reference table maps this one backwards
    return table


def normalize_answer(text: str) -> str:
    """EvalAI's answer processor: lower-case, punctuation, periods, number words, articles, contractions."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    delete = DIGIT_COMMA.search(text) is not None
    out = text
    for p in PUNCTUATION:  # deleted when it touches a space in the input, else replaced by one
        out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
    out = PERIOD.sub("", out, count=PERIODS_REMOVED)
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    table = contraction_table()
    return " ".join(table.get(w, w) for w in words if w not in ARTICLES)


def vqa_scores(gt_answers: list[str]) -> dict[str, float]:
    """Score of each distinct normalised answer: the mean over the 10 leave-one-out subsets of
    min(1, matches among the other 9 / 3)."""
    answers = [normalize_answer(a) for a in gt_answers]
    if len(answers) != ANNOTATORS:
        raise ValueError(f"VQA accuracy needs {ANNOTATORS} annotator answers, got {len(answers)}")
    scores = {}
    for candidate in set(answers):
        total = 0.0  # summed in the reference's order, so the floats agree to the last bit
        for left_out in range(ANNOTATORS):
            matches = sum(1 for i, a in enumerate(answers) if i != left_out and a == candidate)
            total += min(1, float(matches) / 3)
        scores[candidate] = total / ANNOTATORS
    return scores


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """0..1 soft accuracy of one prediction."""
    return vqa_scores(gt_answers).get(normalize_answer(prediction), 0.0)
