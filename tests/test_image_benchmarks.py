"""Image benchmarks: each extraction rule against the references' cases and quirks, the scores against the official
scorers shipped in llava-torch (run in the upstream env on the same answer files) or against the spec's formula,
and every benchmark end to end on generated fixtures with a tiny model, through our HF runner and the upstream
LLaVA runner (whose answers must equal upstream `model_vqa_loader.py`'s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from regate_plugin.eval import BENCHMARKS, BenchmarkError, Request, get_benchmark
from regate_plugin.eval.base import Prompt
from regate_plugin.eval.benchmarks.mmbench import mmbench_letter
from regate_plugin.eval.benchmarks.mme import mme_answer
from regate_plugin.eval.benchmarks.pope import pope_answer
from regate_plugin.eval.benchmarks.scienceqa import scienceqa_letter
from regate_plugin.eval.image import ImageQuestion
from regate_plugin.eval.runners import HFRunner
from regate_plugin.eval.vqa_accuracy import contraction_table, normalize_answer

from regate_plugin.cli import main as regate
from regate_plugin.registry import UnknownEntryError

from .eval_fixtures import write_tiny_hf_llava
from .image_fixtures import WRITERS, colour, write_mmbench, write_mme, write_pope, write_scienceqa, write_seed
from .test_launch_llava import _llava
from .tokenizers_fixture import write_bpe_chat_tokenizer, write_sentencepiece_llama


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("There is not.", "no"),
        ("Yes. No.", "yes"),
        ("No, there is none", "no"),
        ("NO", "yes"),
        ("", "yes"),
        ("Not really", "yes"),
        ("yes,no", "yes"),  # quirks: case, empty, comma joins words
    ],
)
def test_pope_rule(text, answer):
    assert pope_answer(text) == answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes.", "yes"),
        ("No, it is not", "no"),
        ("nope", "no"),
        (" yes", "yes"),
        ("  yes", "other"),
        ("I think yes", "other"),
        ("", "other"),  # no strip: only the first 4 characters count
    ],
)
def test_mme_rule(text, answer):
    assert mme_answer(text) == answer


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("E", "E"),
        ("B. choice 1", "B"),
        ("B.", "FAILED"),
        ("b", "FAILED"),
        ("The answer is C.", "C"),
        ("The answer is C. The answer is D.", "FAILED"),
        ("F", "FAILED"),
        ("", "FAILED"),
    ],
)
def test_scienceqa_rule(text, letter):
    assert scienceqa_letter(text) == letter


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B) dog", "B"),
        ("B: dog.", "B"),
        ("A or B", None),
        ("It is a dog", "B"),
        ("cat and dog", None),
        ("D", None),  # not an option of this question
    ],
)
def test_mmbench_rule(text, letter):
    assert mmbench_letter(text, {"A": "cat", "B": "dog", "C": "bird"}) == letter


def _records(questions: list[ImageQuestion], texts: list[str]) -> list[dict]:
    return [{"question_id": q.question_id, "prompt": q.prompt_field, "text": t} for q, t in zip(questions, texts)]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mme_scores_acc_plus_acc_plus_per_subtask(tmp_path):
    benchmark = get_benchmark("mme", write_mme(tmp_path / "mme"))
    questions = benchmark.load()
    assert [q.question_id for q in questions[:4]] == ["existence/0000.jpg"] * 2 + ["existence/0001.png"] * 2
    assert (
        questions[0].text == "Is there a existence 0 in this image?\nAnswer the question using a single word or phrase."
    )
    texts = {
        "existence": ["Yes", "No", "Yes", "Yes"],
        "artwork": ["yes", "no.", "no", "no"],
        "code_reasoning": ["  yes", "No", "No", "No"],
    }
    ordered = [t for subtask in ("existence", "artwork", "code_reasoning") for t in texts[subtask]]
    score = benchmark.score(questions, _records(questions, ordered))
    # existence: 3/4 right, 1 of 2 images fully right -> 75 + 50; artwork: 3/4 (the third says no to a yes), 50
    assert score.groups["existence"] == {"acc": 75.0, "acc+": 50.0, "score": 125.0}
    assert score.groups["artwork"]["score"] == 125.0
    assert score.groups["code_reasoning"] == {"acc": 50.0, "acc+": 0.0, "score": 50.0}  # "  yes" is 'other'
    assert score.metrics == {"perception": 250.0, "cognition": 50.0}
    assert "missing subtasks" in score.notes[0]


def test_seed_exact_letter_and_first_character(tmp_path):
    benchmark = get_benchmark("seed", write_seed(tmp_path / "seed"))
    questions = benchmark.load()
    assert len(questions) == 4 and questions[0].text.endswith(
        "\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer with the option's letter from the given choices directly."
    )
    # gold letters are A, B, C, D; int question ids (as LLaVA writes them) match the JSON's string ids
    records = [
        {"question_id": 100, "prompt": "", "text": "A"},
        {"question_id": 101, "prompt": "", "text": "B."},
        {"question_id": 102, "prompt": "", "text": "D"},
    ]
    score = benchmark.score(questions, records)
    assert score.metrics == {"img_acc": 25.0, "img_acc_first_char": 50.0} and score.unanswered == 1
    assert score.groups == {"Scene Understanding": {"acc": 50.0}, "Instance Identity": {"acc": 0.0}}


def test_gqa_strips_periods_and_lower_cases(tmp_path):
    benchmark = get_benchmark("gqa", WRITERS["gqa"](tmp_path / "gqa"))
    questions = benchmark.load()
    score = benchmark.score(questions, _records(questions, ["Yes.", "no..", "Red", "left side"]))
    assert score.metrics["acc"] == 75.0 and score.groups["choose"] == {"acc": 0.0}


def test_mmbench_circular_eval(tmp_path):
    benchmark = get_benchmark("mmbench", write_mmbench(tmp_path / "mmb"))
    questions = benchmark.load()
    assert (
        len(questions) == 7 and questions[0].prompt_field == "A hint.\nWhat is it 0?\nA. cat\nB. dog\nC. bird\nD. fish"
    )
    assert (
        questions[4].text
        == "What is it 1?\nA. up\nB. down\nC. left\nAnswer with the option's letter from the given choices directly."
    )
    gold = [q.answer for q in questions]
    # base 0 right in every rotation (one by option text); base 1 wrong in its last rotation
    texts = [gold[0], "It is a dog", *gold[2:4], gold[4], gold[5], "A" if gold[6] != "A" else "B"]
    score = benchmark.score(questions, _records(questions, texts))
    assert score.metrics == {"circular_acc": 50.0}
    assert score.groups["category: count"] == {"acc": 100.0} and score.groups["category: scene"] == {"acc": 0.0}
    cn = get_benchmark(
        "mmbench", write_mmbench(tmp_path / "cn", "mmbench_dev_cn_20231003.tsv"), tsv="mmbench_dev_cn_20231003.tsv"
    )
    assert cn.load()[0].text.endswith("\n请直接回答选项字母。")


def test_bad_data_names_the_file(tmp_path):
    with pytest.raises(BenchmarkError, match=r"pid_splits.json is missing; --data-root must hold ScienceQA"):
        get_benchmark("scienceqa", tmp_path).load()
    root = write_pope(tmp_path / "pope", 2)
    (root / "coco/coco_pope_random.json").write_text('{"question_id": 1, "image": "x.jpg"}\n')
    with pytest.raises(BenchmarkError, match=r"coco_pope_random.json line 1: missing field 'text'"):
        get_benchmark("pope", root).load()
    benchmark = get_benchmark("gqa", WRITERS["gqa"](tmp_path / "gqa"))
    with pytest.raises(BenchmarkError, match="'999' that the data under"):
        benchmark.score(benchmark.load(), [{"question_id": "999", "prompt": "", "text": "x"}])
    with pytest.raises(UnknownEntryError, match="unknown benchmark .nope."):
        get_benchmark("nope", tmp_path)


VARIED = [
    "Yes",
    "No",
    "no, it is not.",
    "NO",
    "",
    "Yes, there is no cat.",
    "A",
    "B. b",
    "The answer is C.",
    "C",
    "2",
    "two dogs",
    "Two",
    "unanswerable",
    "Red and white!",
    "red, white",
    "the flag.",
    "yes",
]


def parse_eval_pope(printed: str) -> dict[str, dict[str, float]]:
    """The metrics `eval_pope.py` prints for each category, as percentages."""
    names = {
        "Accuracy": "acc",
        "Precision": "precision",
        "Recall": "recall",
        "F1 score": "f1",
        "Yes ratio": "yes_ratio",
    }
    metrics: dict[str, dict[str, float]] = {}
    for line in printed.splitlines():
        if line.startswith("Category: "):
            category = metrics.setdefault(line.split(",")[0][len("Category: ") :], {})
        name, _, value = line.partition(": ")
        if name in names:
            category[names[name]] = 100 * float(value)
    return metrics


OFFICIAL_SCORES = r"""
import json, sys, io, contextlib
from llava.eval import eval_pope, eval_science_qa, eval_textvqa
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor, TextVQAAccuracyEvaluator
work = sys.argv[1]
out = {}
# eval_pope.py, run as a script on our question and answer files: collect each category's printed metrics
buffer = io.StringIO()
sys.argv = ["eval_pope.py", "--annotation-dir", work + "/pope/coco", "--question-file", work + "/pope_q.jsonl",
            "--result-file", work + "/pope_a.jsonl"]
with contextlib.redirect_stdout(buffer):
    exec(open(eval_pope.__file__).read(), {"__name__": "__main__"})
out["pope"] = buffer.getvalue()
# eval_science_qa.py as a script; IMG accuracy from its per-problem output file
sys.argv = ["eval_science_qa.py", "--base-dir", work + "/sqa", "--result-file", work + "/sqa_a.jsonl",
            "--output-file", work + "/sqa_out.json", "--output-result", work + "/sqa_result.json"]
with contextlib.redirect_stdout(io.StringIO()):
    exec(open(eval_science_qa.__file__).read(), {"__name__": "__main__"})
results = json.load(open(work + "/sqa_out.json"))
mm_correct = len([x for x in results["correct"] if x["is_multimodal"]])
mm_total = mm_correct + len([x for x in results["incorrect"] if x["is_multimodal"]])
out["sqa"] = {"acc": json.load(open(work + "/sqa_result.json"))["acc"], "img_acc": mm_correct / mm_total * 100}
# eval_textvqa.eval_single, keeping the evaluator's unrounded accuracy
accuracies = []
original = TextVQAAccuracyEvaluator.eval_pred_list
TextVQAAccuracyEvaluator.eval_pred_list = lambda self, preds: accuracies.append(original(self, preds)) or accuracies[-1]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    eval_textvqa.eval_single(work + "/textvqa/TextVQA_0.5.1_val.json", work + "/textvqa_a.jsonl")
    # VizWiz: the same evaluator on our VizWiz answers and their 10 annotator answers
    vizwiz = json.load(open(work + "/vizwiz_pairs.json"))
    out["vizwiz"] = TextVQAAccuracyEvaluator().eval_pred_list(vizwiz)
out["textvqa"] = accuracies[0]
processor = EvalAIAnswerProcessor()
out["normalized"] = [processor(s) for s in json.load(open(work + "/strings.json"))]
out["contractions"] = {k: v for k, v in processor.CONTRACTIONS.items() if k != v}
print(json.dumps(out))
"""

STRINGS = [
    "Two dogs.",
    "the cat's toy?",
    "3.5 kg",
    "1,000 people",
    "dont know",
    "somebody'd",
    "y'alld've",
    "I'm",
    "a (red) car",
    "x- y",
    "x-y",
    "well.done",
    "Ten.",
    "none",
    "hadn'tve",
    "tab\tand\nnewline",
    "'twas",
    "e.g. this",
    "a" + "." * 40 + "b",
    "An apple; a pear",
    "yall'll",
    "why?!",
    "it's 5:30",
]


def test_scores_equal_llava_torch_official_scorers(tmp_path):
    """POPE, ScienceQA, TextVQA and VizWiz scored by us and by llava-torch's own scripts on the same answer files."""
    pope = get_benchmark("pope", write_pope(tmp_path / "pope", per_category=6))
    pope_questions = pope.load()
    _write(
        tmp_path / "pope_q.jsonl",
        [
            {"question_id": q.question_id, "image": q.image.name, "text": q.text, "category": q.meta["category"]}
            for q in pope_questions
        ],
    )
    pope_answers = _records(pope_questions, [VARIED[i % 6] for i in range(len(pope_questions))])
    _write(tmp_path / "pope_a.jsonl", pope_answers[:-1])  # one missing answer: paired by position, as upstream does

    sqa = get_benchmark("scienceqa", write_scienceqa(tmp_path / "sqa"), subset="all")
    sqa_questions = sqa.load()
    assert len(sqa_questions) == 6 and sum(q.image is not None for q in sqa_questions) == 4
    assert sqa_questions[2].text.startswith("Which one is thing 2?\nA. ")  # empty hint: no "Context:" line
    sqa_answers = _records(sqa_questions, ["A", "E", "The answer is C.", "B. x", "A", "C"])
    _write(tmp_path / "sqa_a.jsonl", sqa_answers[1:])  # the first problem unanswered: FAILED, counted as text-only

    textvqa = get_benchmark("textvqa", WRITERS["textvqa"](tmp_path / "textvqa"))
    textvqa_questions = textvqa.load()
    assert textvqa_questions[0].text == (
        "what does sign 0 say?\nReference OCR token: STOP, sign\nAnswer the question using a single word or phrase."
    )
    assert "Reference OCR token" not in textvqa_questions[1].text  # an image without OCR tokens: 2-line prompt
    textvqa_answers = _records(textvqa_questions, ["2", "Unanswerable", "yes.", "red and white"])
    _write(tmp_path / "textvqa_a.jsonl", textvqa_answers)

    vizwiz = get_benchmark("vizwiz", WRITERS["vizwiz"](tmp_path / "vizwiz"))
    vizwiz_questions = vizwiz.load()
    vizwiz_texts = ["Two", "unanswerable.", "Yes", "the flag"]
    (tmp_path / "vizwiz_pairs.json").write_text(
        json.dumps([{"pred_answer": t, "gt_answers": q.answer} for t, q in zip(vizwiz_texts, vizwiz_questions)])
    )
    (tmp_path / "strings.json").write_text(json.dumps(STRINGS))
    script = tmp_path / "official.py"
    script.write_text(OFFICIAL_SCORES)
    official = json.loads(_llava(str(script), str(tmp_path)).stdout.strip().splitlines()[-1])

    ours = pope.score(pope_questions, pope_answers[:-1])
    assert parse_eval_pope(official["pope"]) == ours.groups and set(ours.groups) == {"adversarial", "popular", "random"}
    assert ours.unanswered == 1

    ours = sqa.score(sqa_questions, sqa_answers[1:])
    assert ours.metrics == official["sqa"]
    assert ours.unanswered == 1

    assert textvqa.score(textvqa_questions, textvqa_answers).metrics == {"acc": 100 * official["textvqa"]}
    assert vizwiz.score(vizwiz_questions, _records(vizwiz_questions, vizwiz_texts)).metrics == {
        "acc": 100 * official["vizwiz"]
    }
    assert [normalize_answer(s) for s in STRINGS] == official["normalized"]
    assert contraction_table() == official["contractions"]


def test_pope_rescoring_of_a_llava_answer_file_needs_its_question_file(tmp_path, capsys):
    root = write_pope(tmp_path / "pope", 2)
    questions = get_benchmark("pope", root).load()
    # LLaVA's llava_pope_test.jsonl numbers questions globally and carries the category
    _write(
        tmp_path / "llava_pope_test.jsonl",
        [{"question_id": n, "category": q.meta["category"], "text": q.text} for n, q in enumerate(questions)],
    )
    answers = _write(
        tmp_path / "answers.jsonl",
        [{"question_id": n, "prompt": q.text, "text": "No" if n % 3 else "Yes"} for n, q in enumerate(questions)],
    )
    assert regate(["eval", "score", "pope", "--pred", str(answers), "--data-root", str(root)]) == 2
    assert "needs --question-file" in capsys.readouterr().err
    assert (
        regate(
            [
                "eval",
                "score",
                "pope",
                "--pred",
                str(answers),
                "--data-root",
                str(root),
                "--question-file",
                str(tmp_path / "llava_pope_test.jsonl"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m/metrics.json").read_text())
    assert metrics["counts"] == {"adversarial": 2, "popular": 2, "random": 2}


@pytest.fixture(scope="module")
def tiny_hf_llava(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_llava")
    return write_tiny_hf_llava(root / "model", write_bpe_chat_tokenizer(root / "tok", "chatml"))


@pytest.mark.parametrize("name", BENCHMARKS.names())
def test_end_to_end_run_resumes_and_rescores(tmp_path, tiny_hf_llava, name):
    root = WRITERS[name](tmp_path / "data")
    out = tmp_path / "out"
    args = [
        "eval",
        name,
        "--model",
        str(tiny_hf_llava),
        "--data-root",
        str(root),
        "--out",
        str(out),
        "--no-progress",
        "--batch-size",
        "2",
    ]
    assert regate(args) == 0
    answers = out / "answers.jsonl"
    first = [json.loads(line) for line in answers.read_text().splitlines()]
    questions = get_benchmark(name, root).load()
    assert len(first) == len(questions) and all(set(r) >= {"question_id", "prompt", "text"} for r in first)
    metrics = json.loads((out / "metrics.json").read_text())

    lines = answers.read_text().splitlines()  # killed mid-run: a record lost and a torn line
    answers.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:15])
    assert regate(args) == 0
    again = [json.loads(line) for line in answers.read_text().splitlines() if line.endswith("}")]
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == sorted(json.dumps(r, sort_keys=True) for r in first)

    assert (
        regate(["eval", "score", name, "--pred", str(answers), "--data-root", str(root), "--out", str(tmp_path / "s")])
        == 0
    )
    assert json.loads((tmp_path / "s/metrics.json").read_text()) == metrics


def test_hf_runner_batches_give_the_unbatched_answers(tiny_hf_llava):
    runner = HFRunner.from_pretrained(tiny_hf_llava)
    requests = [
        Request((colour(40 * i),), Prompt(f"question {'long ' * i}{i}?", max_new_tokens=4 + i)) for i in range(3)
    ]
    requests.append(Request((), Prompt("text only", max_new_tokens=3)))
    one_by_one = [runner.generate([r])[0] for r in requests]
    assert runner.generate(requests) == one_by_one
    assert len(set(one_by_one)) > 1


@pytest.fixture(scope="module")
def upstream_llava_pope(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaVA-1.5 checkpoint as upstream writes it (float32 weights), POPE data and LLaVA's question file."""
    root = tmp_path_factory.mktemp("upstream_llava_pope")
    model = root / "llava-v1.5-tiny"
    _llava(
        str(Path(__file__).parent / "upstream_llava/make_checkpoint.py"),
        str(write_sentencepiece_llama(root / "tok")),
        str(root / "parts"),
        str(model),
    )
    pope = write_pope(root / "pope", 2)
    questions = _write(
        root / "q.jsonl",
        [
            {"question_id": q.question_id, "image": q.image.name, "text": q.text, "category": q.meta["category"]}
            for q in get_benchmark("pope", pope).load()
        ],
    )
    return {"model": model, "pope": pope, "questions": questions}


def _regate_llava_pope(data: dict[str, Path], out: Path, *flags: str) -> list[tuple]:
    """`regate eval pope --runner llava` in the upstream env: (question_id, prompt, text) of each answer."""
    _llava(
        "-m",
        "regate_plugin.cli",
        "eval",
        "pope",
        "--runner",
        "llava",
        "--model",
        str(data["model"]),
        "--data-root",
        str(data["pope"]),
        "--out",
        str(out),
        "--no-progress",
        *flags,
    )
    return _answer_triples(out / "answers.jsonl")


def _model_vqa_loader_pope(data: dict[str, Path], answers: Path, *cast: str) -> list[tuple]:
    """Upstream `model_vqa_loader.py` on the same questions, on CPU (`cast`: `--cast DTYPE`)."""
    _llava(
        str(Path(__file__).parent / "upstream_llava/run_model_vqa_loader.py"),
        *cast,
        "--model-path",
        str(data["model"]),
        "--question-file",
        str(data["questions"]),
        "--image-folder",
        str(data["pope"] / "val2014"),
        "--answers-file",
        str(answers),
        "--temperature",
        "0",
        "--conv-mode",
        "vicuna_v1",
    )
    return _answer_triples(answers)


def _answer_triples(path: Path) -> list[tuple]:
    return [(r["question_id"], r["prompt"], r["text"]) for r in map(json.loads, path.read_text().splitlines())]


def test_upstream_llava_runner_reproduces_model_vqa_loader(tmp_path, upstream_llava_pope):
    """`regate eval pope --runner llava --dtype float16` in the upstream env answers exactly as upstream
    `model_vqa_loader.py` (run on CPU, in its float16), and upstream `eval_pope.py` scores its answer file as we do."""
    out = tmp_path / "out"
    ours = _regate_llava_pope(upstream_llava_pope, out, "--dtype", "float16")
    assert ours == _model_vqa_loader_pope(upstream_llava_pope, tmp_path / "reference.jsonl")
    assert len({text for _, _, text in ours}) > 1  # the answers depend on the image and the question
    printed = _llava(
        "-m",
        "llava.eval.eval_pope",
        "--annotation-dir",
        str(upstream_llava_pope["pope"] / "coco"),
        "--question-file",
        str(upstream_llava_pope["questions"]),
        "--result-file",
        str(out / "answers.jsonl"),
    ).stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert parse_eval_pope(printed) == metrics["groups"]


THIRD_PARTY = """
import json

from regate_plugin.eval.image import ImageBenchmark, ImageQuestion, Score


class Parity(ImageBenchmark):
    name = "parity"
    title = "Parity"
    data_layout = "numbers.json"

    def load(self):
        numbers = json.loads(self._path("numbers.json").read_text())
        return [ImageQuestion(str(n), f"Is {n} even?", None, "yes" if n % 2 == 0 else "no") for n in numbers]

    def score(self, questions, records):
        texts = self.answer_texts(questions, records)
        right = sum(text is not None and text.lower() == q.answer for q, text in zip(questions, texts))
        return Score(self.name, {"accuracy": 100.0 * right / len(questions)})


class AlwaysYes:
    def generate(self, requests):
        return ["Yes"] * len(requests)


def load_always_yes(model, *, model_base, conv_mode, device, dtype, chat_template):
    return AlwaysYes()
"""


def test_a_third_party_benchmark_and_runner_from_entry_points_run_through_regate_eval(tmp_path):
    """An installed package's entry points add an eval command and a --runner, listed in the help and run for real."""
    site = tmp_path / "site"
    (site / "toy_eval-0.1.dist-info").mkdir(parents=True)
    (site / "toy_eval.py").write_text(THIRD_PARTY)
    (site / "toy_eval-0.1.dist-info/METADATA").write_text("Metadata-Version: 2.1\nName: toy-eval\nVersion: 0.1\n")
    (site / "toy_eval-0.1.dist-info/entry_points.txt").write_text(
        "[regate_plugin.benchmarks]\nparity = toy_eval:Parity\n\n"
        "[regate_plugin.runners]\nyes = toy_eval:load_always_yes\n"
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data/numbers.json").write_text("[1, 2, 3, 4, 6]")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "regate_plugin.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    assert "parity" in cli("eval", "--help").stdout
    assert "{hf,llava,yes}" in cli("eval", "parity", "--help").stdout
    out = tmp_path / "out"
    done = cli(
        *("eval", "parity", "--runner", "yes", "--model", str(tmp_path)),
        *("--data-root", str(tmp_path / "data"), "--out", str(out), "--no-progress"),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "metrics.json").read_text())["metrics"] == {"accuracy": 60.0}
    assert [json.loads(line)["text"] for line in (out / "answers.jsonl").read_text().splitlines()] == ["Yes"] * 5


def test_upstream_llava_runner_computes_in_float32_on_the_cpu(tmp_path, upstream_llava_pope):
    """Without --dtype on the CPU, the llava runner's model is float32 throughout (upstream's loader gives float16,
    which torch 2.1's CPU convolution lacks), and it answers as `model_vqa_loader.py` with its model and images in
    float32."""
    probe = (
        "import json, sys\n"
        "from regate_plugin.eval.runners import load_runner\n"
        "model = load_runner('llava', sys.argv[1]).model\n"
        "print(json.dumps(sorted({str(p.dtype) for p in model.parameters()})))"
    )
    loaded = _llava("-c", probe, str(upstream_llava_pope["model"])).stdout.strip().splitlines()[-1]
    assert json.loads(loaded) == ["torch.float32"]
    ours = _regate_llava_pope(upstream_llava_pope, tmp_path / "out")
    assert ours == _model_vqa_loader_pope(upstream_llava_pope, tmp_path / "reference.jsonl", "--cast", "float32")
    assert len({text for _, _, text in ours}) > 1
