"""The drawn-image tasks (`refer-back`, `describe`): the images show what the answers say, the first mentions are
the visual spans, and the whole generated answer is scored by GQA's rule."""

import json

import numpy as np
import pytest
import torch
from regate_plugin.eval.runners import HFRunner

from regate_plugin.data import expand_placeholders, get_template, iter_conversations
from regate_plugin.demo import DemoConfig, run_demo
from regate_plugin.demo.models import processor_for, train_tokenizer
from regate_plugin.demo.scenes import (
    BACKGROUNDS,
    COLOURS,
    COUNTS,
    SceneBenchmark,
    generate_describe,
    generate_refer_back,
)
from regate_plugin.demo.tasks import TASKS


def _read(root, row) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(root / row["image"]).convert("RGB"), dtype=np.float32)


def _colour_of(pixels: np.ndarray) -> str:
    """The named colour nearest to the bright pixels of a black image."""
    bright = pixels.reshape(-1, 3)
    bright = bright[bright.sum(axis=1) > 150]
    mean = bright.mean(axis=0)
    return min(COLOURS, key=lambda c: float(np.abs(mean - np.array(COLOURS[c])).sum()))


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    return generate_refer_back(tmp_path_factory.mktemp("refer"), train_size=24, test_per_task=2, seed=1, progress=False)


@pytest.fixture(scope="module")
def describe(tmp_path_factory):
    return generate_describe(
        tmp_path_factory.mktemp("describe"), train_size=24, test_per_task=2, seed=2, progress=False
    )


def test_refer_back_images_show_the_colour_and_size_the_answer_states_twice(refer):
    rows = json.loads(refer.train_json.read_text()) + json.loads(refer.test_json.read_text())
    for row in rows:
        image = _read(refer.root, row)
        colour = _colour_of(image)
        lit = int((image.sum(axis=2) > 150).sum())
        size = "big" if lit > 100 else "small"  # 14 x 14 = 196 pixels against 6 x 6 = 36, JPEG edges aside
        answer = row["conversations"][1]["value"]
        assert answer == f"The square is {colour} and {size}. So the {size} square is the {colour} one."
        if "visual_spans" in row:  # the first mentions need the image, the restatements do not
            assert [answer[a:b] for a, b in row["visual_spans"]] == [colour, size]
            assert row["visual_spans"][1][1] <= answer.index(". So")


def test_describe_images_show_the_four_facts_the_answer_states(describe):
    for row in json.loads(describe.train_json.read_text()) + json.loads(describe.test_json.read_text()):
        image = _read(describe.root, row)
        near = {b: int((np.abs(image - np.array(v)).sum(axis=2) < 60).sum()) for b, v in BACKGROUNDS.items()}
        background = max(near, key=near.__getitem__)
        square = np.abs(image - np.array(BACKGROUNDS[background])).sum(axis=2) > 120
        cell = image.shape[0] // 2
        quarters = [
            square[(q // 2) * cell : (q // 2 + 1) * cell, (q % 2) * cell : (q % 2 + 1) * cell] for q in range(4)
        ]
        count = COUNTS[sum(int(q.sum()) > 16 for q in quarters) - 1]
        size = "big" if square.sum() / (COUNTS.index(count) + 1) > 100 else "small"  # 196 against 36 pixels
        colour = min(COLOURS, key=lambda c: float(np.abs(image[square].mean(axis=0) - COLOURS[c]).sum()))
        answer = row["conversations"][1]["value"]
        assert f"The background is {background}." in answer and f"{count} square" in answer
        assert f"{'is' if count == 'one' else 'are'} {size}." in answer and answer.endswith(f"colour is {colour}.")
        if "visual_spans" in row:
            verb = "is" if count == "one" else "are"
            assert [answer[a:b] for a, b in row["visual_spans"]] == [background, verb, count, size, colour]


def test_the_whole_answer_is_scored_by_gqa_s_rule(refer):
    benchmark = SceneBenchmark(refer.benchmark_root)
    questions = benchmark.load()
    gold = {row["id"]: row["conversations"][1]["value"] for row in json.loads(refer.test_json.read_text())}
    texts = []
    for i, q in enumerate(questions):
        answer = gold[q.question_id]
        texts.append([answer, answer.upper(), answer.rstrip("."), answer.replace("square is", "square was")][i % 4])
    records = [{"question_id": q.question_id, "prompt": q.text, "text": t} for q, t in zip(questions, texts)]
    expected = [t.rstrip(".").lower() == gold[q.question_id].rstrip(".").lower() for q, t in zip(questions, texts)]
    assert benchmark.score(questions, records).metrics["acc"] == pytest.approx(100 * sum(expected) / len(expected))
    assert 0 < sum(expected) < len(expected)


@pytest.mark.parametrize("name", ["refer-back", "describe"])
def test_training_tokens_equal_what_evaluation_feeds_the_model(name, refer, describe):
    splits, task = (refer if name == "refer-back" else describe), TASKS[name]
    test = json.loads(splits.test_json.read_text())
    tokenizer = train_tokenizer([turn["value"] for row in test for turn in row["conversations"]])
    processor = processor_for(tokenizer, task.image_size, task.patch)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    questions = {q.question_id: q for q in SceneBenchmark(splits.benchmark_root).load()}
    for row, conversation in zip(test, iter_conversations(splits.test_json)):
        request = SceneBenchmark(splits.benchmark_root).request(questions[row["id"]])
        text = HFRunner(torch.nn.Module(), processor)._text(request)
        prompt_ids = processor(text=[text], images=list(request.images), return_tensors="pt")["input_ids"][0].tolist()
        encoded = expand_placeholders(
            get_template("videollama2").encode(conversation, tokenizer), image_token, task.visual_rows(1)
        )
        assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
        rest = tokenizer.decode(encoded.input_ids[len(prompt_ids) :])
        assert rest == row["conversations"][1]["value"] + tokenizer.eos_token


@pytest.mark.parametrize(("task", "answers"), [("refer-back", 8), ("digits", 10)])
def test_a_short_demo_reports_the_rule_applied_to_its_answers(tmp_path, task, answers):
    """The whole-answer tasks (digits shares their scoring): the reported accuracy is GQA's rule on the answers."""
    cfg = DemoConfig(
        task=task,
        steps=4,
        batch_size=4,
        train_size=16,
        test_per_task=1,
        eval_every=2,
        reference_steps=2,
        warmup_steps=1,
        cycle_steps=3,
        dense_steps=1,
        progress=False,
    )
    results = run_demo(tmp_path, cfg)
    gold = {r["id"]: r["conversations"][1]["value"] for r in json.loads((tmp_path / "data" / "test.json").read_text())}
    for r in results:
        lines = (tmp_path / "eval" / r.mode / "step-00004" / "answers-scenes.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == len(gold) == answers
        correct = sum(
            rec["text"].rstrip(".").lower() == gold[rec["question_id"]].rstrip(".").lower() for rec in records
        )
        assert 100 * correct / len(records) == pytest.approx(r.accuracy)
