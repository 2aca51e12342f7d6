"""The demo's digits task against scikit-learn's own images and labels, and GQA's rule on the whole answer."""

import json
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from regate_plugin.core.config import ConfigError
from regate_plugin.demo.digits import generate, upscaled
from regate_plugin.demo.models import train_tokenizer
from regate_plugin.demo.scenes import SceneBenchmark

NAMES = "zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("digits"), train_size=40, test_per_task=3, seed=5, progress=False)


def _source(pixels: np.ndarray, theirs: np.ndarray) -> tuple[int, float]:
    """The load_digits image nearest to a written one (each 4x4 block averaged back to one 0..16 grey level):
    its index, and the mean absolute difference in grey levels."""
    grey = pixels.mean(axis=2).reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16 / 255
    distances = np.abs(theirs - grey).mean(axis=(1, 2))
    index = int(distances.argmin())
    return index, float(distances[index])


def test_every_sample_is_a_load_digits_image_with_its_own_label(splits):
    digits = load_digits()
    sources = {}
    for split, path in (("train", splits.train_json), ("test", splits.test_json)):
        rows = json.loads(path.read_text())
        sources[split] = []
        for row in rows:
            pixels = np.asarray(Image.open(splits.root / row["image"]).convert("RGB"), dtype=np.float64)
            assert pixels.shape == (32, 32, 3)
            index, distance = _source(pixels, digits.images)
            assert distance < 0.25  # JPEG of flat 4x4 blocks: well under one of the 17 grey levels
            sources[split].append(index)
            label = int(digits.target[index])
            name = NAMES[label]
            answer = row["conversations"][1]["value"]
            assert row["conversations"][0]["value"] == "<image>\nWhat digit is this, and is it even or odd?"
            assert answer == f"The digit is {name}, and {name} is {'odd' if label % 2 else 'even'}."
            if split == "test":  # only the first mention of the digit needs the image
                assert [answer[a:b] for a, b in row["visual_spans"]] == [name]
    assert len(sources["train"]) == 40 == len(set(sources["train"]))  # the pool is larger: no image twice
    assert not set(sources["train"]) & set(sources["test"])
    assert sorted(digits.target[sources["test"]].tolist()) == sorted(list(range(10)) * 3)


def test_images_are_upscaled_by_nearest_neighbour():
    image = np.arange(64, dtype=np.float64).reshape(8, 8) % 17
    big = upscaled(image)
    assert big.shape == (32, 32, 3) and big.dtype == np.uint8
    for y, x in [(0, 0), (3, 5), (7, 7), (2, 6)]:
        assert (big[4 * y : 4 * y + 4, 4 * x : 4 * x + 4] == round(image[y, x] * 255 / 16)).all()


def test_training_wraps_around_the_pool_only_when_asked_for_more_than_it_holds(tmp_path):
    splits = generate(tmp_path, train_size=1797, test_per_task=1, seed=0, progress=False)
    names = [
        row["conversations"][1]["value"].split()[3].rstrip(",") for row in json.loads(splits.train_json.read_text())
    ]
    counts = np.bincount(load_digits().target, minlength=10)
    # the pool is every image but the 10 held out; 10 more samples start the next pass
    assert len(names) == 1797 and all(names.count(n) >= counts[d] - 1 for d, n in enumerate(NAMES))


def test_the_restated_digit_is_the_same_token_as_its_first_mention(splits):
    """What `repeats` sees: the second mention of the digit is a repeat of the first mention's token."""
    rows = json.loads(splits.train_json.read_text())
    tokenizer = train_tokenizer([turn["value"] for row in rows for turn in row["conversations"]])
    for row in rows[:10]:
        answer = row["conversations"][1]["value"]
        name = answer.split()[3].rstrip(",")
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        (word,) = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        assert ids.count(word) == 2


def test_the_whole_answer_is_scored_by_gqa_s_rule(splits):
    benchmark = SceneBenchmark(splits.benchmark_root)
    questions = benchmark.load()
    gold = {row["id"]: row["conversations"][1]["value"] for row in json.loads(splits.test_json.read_text())}
    texts = []
    for i, q in enumerate(questions):
        answer = gold[q.question_id]
        texts.append([answer, answer.upper(), answer.rstrip("."), answer.replace(" is ", " was ", 1)][i % 4])
    records = [{"question_id": q.question_id, "prompt": q.text, "text": t} for q, t in zip(questions, texts)]
    expected = [t.rstrip(".").lower() == gold[q.question_id].rstrip(".").lower() for q, t in zip(questions, texts)]
    score = benchmark.score(questions, records)
    assert score.metrics["acc"] == pytest.approx(100 * sum(expected) / len(expected))
    assert 0 < sum(expected) < len(expected) and sorted(score.groups) == sorted(NAMES)


def test_asking_for_more_test_images_than_a_digit_has_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--test-per-task 180"):
        generate(tmp_path, train_size=10, test_per_task=180, seed=0, progress=False)


def test_without_scikit_learn_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # what the import meets when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'regate-plugin\[digits\]'"):
        generate(tmp_path, train_size=1, test_per_task=1, progress=False)
