"""The demo's easy-VQA task against the `easy-vqa` package's own data and GQA's scoring rule."""

import json
import sys

import easy_vqa
import numpy as np
import pytest
import torch
from PIL import Image
from regate_plugin.eval.runners import HFRunner

from regate_plugin.core.config import ConfigError
from regate_plugin.data import expand_placeholders, get_template, iter_conversations
from regate_plugin.demo import DemoConfig, encode_split, run_demo
from regate_plugin.demo.easy_vqa import COLOURS, EasyVQABenchmark, generate
from regate_plugin.demo.models import processor_for, train_tokenizer
from regate_plugin.demo.tasks import TASKS

TASK = TASKS["easy-vqa"]


def gqa_correct(text: str, gold: str) -> bool:
    """LLaVA's convert_gqa_for_eval (trailing period stripped, lower-cased) then GQA's exact match, as written."""
    return text.rstrip(".").lower() == gold


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("easy-vqa"), train_size=20, test_per_task=2, seed=3, progress=False)


def test_every_question_is_the_package_s_own_with_its_image(splits):
    train_questions = set(zip(*easy_vqa.get_train_questions()))
    test_questions = set(zip(*easy_vqa.get_test_questions()))
    package_images = {"train": easy_vqa.get_train_image_paths(), "test": easy_vqa.get_test_image_paths()}
    rows = [("train", row) for row in json.loads(splits.train_json.read_text())]
    rows += [("test", row) for row in json.loads(splits.test_json.read_text())]
    assert len(rows) == 20 + 2 * len(COLOURS)
    for split, row in rows:
        question = row["conversations"][0]["value"].removeprefix("<image>\n").splitlines()[0]
        answer = row["conversations"][1]["value"]
        colour = answer.rsplit(" ", 1)[1].removesuffix(".")
        image_id = int(row["image"].rsplit("-", 1)[1].removesuffix(".jpg"))
        assert (question, colour, image_id) in (train_questions if split == "train" else test_questions)
        assert answer == f'The answer to "{question}" is {colour}.'
        ours = np.asarray(Image.open(splits.root / row["image"]).convert("RGB"), dtype=np.float32)
        theirs = np.asarray(Image.open(package_images[split][image_id]).convert("RGB"), dtype=np.float32)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).mean() < 2.0  # JPEG, nearly lossless
        if split == "test":
            ((start, end),) = row["visual_spans"]
            assert answer[start:end] == colour
    test = json.loads(splits.test_json.read_text())
    assert sorted(row["conversations"][1]["value"].rsplit(" ", 1)[1][:-1] for row in test) == sorted(COLOURS * 2)


def test_scoring_is_gqa_s_rule_on_the_generated_word(splits):
    benchmark = EasyVQABenchmark(splits.benchmark_root)
    questions = benchmark.load()
    texts = ["Blue.", "red", "teal.", " green", "the answer", "yellow.", "black", "gray."] * 2
    records = [{"question_id": q.question_id, "prompt": q.text, "text": t} for q, t in zip(questions, texts)]
    score = benchmark.score(questions, records)
    expected = [gqa_correct(t, q.answer) for q, t in zip(questions, texts)]
    assert score.metrics["acc"] == pytest.approx(100 * sum(expected) / len(expected))
    assert sorted(score.groups) == sorted(COLOURS)


def test_training_tokens_equal_what_evaluation_feeds_the_model(splits):
    """The test split through VideoLLaMA2's template gives exactly the ids the processor builds for the benchmark's
    request (prompt and pre-filled restatement), followed by the colour, the period and EOS."""
    test = json.loads(splits.test_json.read_text())
    tokenizer = train_tokenizer([turn["value"] for row in test for turn in row["conversations"]])
    processor = processor_for(tokenizer, TASK.image_size, TASK.patch)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    template = get_template("videollama2")
    benchmark = EasyVQABenchmark(splits.benchmark_root)
    questions = {q.question_id: q for q in benchmark.load()}
    for row, conversation in zip(test, iter_conversations(splits.test_json)):
        request = benchmark.request(questions[row["id"]])
        text = HFRunner(torch.nn.Module(), processor)._text(request)
        prompt_ids = processor(text=[text], images=list(request.images), return_tensors="pt")["input_ids"][0].tolist()
        encoded = expand_placeholders(template.encode(conversation, tokenizer), image_token, TASK.visual_rows(1))
        assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
        rest = tokenizer.decode(encoded.input_ids[len(prompt_ids) :])
        assert rest == f" {questions[row['id']].answer}." + tokenizer.eos_token
    # the answer tokens marked as needing the image are the colour word's
    samples = encode_split(splits.test_json, splits.root, tokenizer, processor, image_token, TASK, 1, False)
    for row, sample in zip(test, samples):
        ids = [label for label in sample.labels if label != -100]
        visual = "".join(tokenizer.decode([i]) for i, v in zip(ids, sample.visual) if v)
        assert visual.strip() == questions[row["id"]].answer


def test_a_short_easy_vqa_demo_reports_the_rule_applied_to_its_answers(tmp_path):
    cfg = DemoConfig(
        task="easy-vqa",
        steps=6,
        batch_size=4,
        train_size=16,
        test_per_task=1,
        eval_every=3,
        reference_steps=2,
        warmup_steps=1,
        cycle_steps=3,
        dense_steps=1,
        progress=False,
    )
    results = run_demo(tmp_path, cfg)
    none, regate, random = results
    assert regate.answer_tokens == random.answer_tokens < none.answer_tokens
    questions = {q.question_id: q for q in EasyVQABenchmark(tmp_path / "data" / "gqa").load()}
    for r in results:
        lines = (tmp_path / "eval" / r.mode / "step-00006" / "answers-easy-vqa.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == len(questions) == len(COLOURS)
        correct = sum(gqa_correct(rec["text"], questions[rec["question_id"]].answer) for rec in records)
        assert 100 * correct / len(records) == pytest.approx(r.accuracy)


def test_asking_for_more_questions_than_easy_vqa_has_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--train-size 1000000: easy-VQA has 5166"):
        generate(tmp_path, train_size=10**6, test_per_task=1, progress=False)
    with pytest.raises(ValueError, match="--test-per-task 1000: easy-VQA's test split has 149"):
        generate(tmp_path, train_size=1, test_per_task=1000, progress=False)
    assert not (tmp_path / "train.json").exists()


def test_without_the_package_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # what `import easy_vqa` meets when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'regate-plugin\[easy-vqa\]'"):
        generate(tmp_path, train_size=1, test_per_task=1, progress=False)
