import json
import subprocess
import sys

import pytest
import torch
from regate_plugin.eval import get_protocol, load_mvbench
from regate_plugin.eval.base import Request
from regate_plugin.eval.runners import HFRunner

from regate_plugin.core import batch_sample_keys
from regate_plugin.data import expand_placeholders, get_template, iter_conversations
from regate_plugin.demo import DemoConfig, DemoResult, SavedActivations, run_demo
from regate_plugin.demo import data as demo_data
from regate_plugin.demo.models import processor_for, train_tokenizer
from regate_plugin.demo.report import plot_curves
from regate_plugin.demo.tasks import TASKS
from regate_plugin.store import ReferenceLossCache

SQUARES = TASKS["squares"]

SHORT = DemoConfig(
    steps=12,
    batch_size=4,
    train_size=24,
    test_per_task=3,
    eval_every=5,
    reference_steps=4,
    warmup_steps=2,
    cycle_steps=5,
    dense_steps=1,
    progress=False,
)


def official_correct(output: str, gt: str) -> bool:
    """VideoChat2's rule as written (docs/EVAL.md): "(" + first line; first words compared loosely."""
    pred = "(" + output.strip().split("\n")[0]
    pred_option, gt_option = pred.lower().split(" ")[0], gt.lower().split(" ")[0]
    return pred_option.replace(".", "") in gt_option or gt_option in pred_option


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, SHORT)


def test_shortened_demo_runs_all_three_modes(short_demo):
    tmp_path, results = short_demo
    assert [r.mode for r in results] == ["none", "regate", "random"]
    none, regate, random = results
    # Same batches, fewer answer tokens under elision, and both elided modes spend the same budget.
    assert regate.answer_tokens == random.answer_tokens < none.answer_tokens
    # `regate` found every training sample in the cache (a miss is an error); the cache is content-addressed, one
    # entry per distinct text.
    train = json.loads((tmp_path / "data" / "train.json").read_text())
    texts = {tuple(turn["value"] for turn in row["conversations"]) for row in train}
    assert len(ReferenceLossCache(tmp_path / "reference_cache")) == len(texts)
    # Learning curves: every mode starts from the same model and is evaluated at steps 5, 10 and 12.
    for r in results:
        assert [p.step for p in r.curve] == [0, 5, 10, 12] and r.curve[0] == none.curve[0]
        assert r.curve[-1].answer_tokens == r.answer_tokens and r.curve[-1].train_seconds == r.seconds
        assert [p.answer_tokens for p in r.curve] == sorted(p.answer_tokens for p in r.curve)
    # The reported accuracy is the official rule applied to the written predictions.
    for r in results:
        lines = (tmp_path / "eval" / r.mode / "step-00012" / "predictions-official.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        data = {q.uid: q for q in load_mvbench(tmp_path / "data" / "mvbench", tasks=demo_data.TASK_NAMES).questions}
        assert len(records) == len(data) == 3 * SHORT.test_per_task
        correct = 0
        for rec in records:
            q = data[rec["uid"]]
            correct += official_correct(rec["output"], f"({q.letters[q.answer_index]}) {q.candidates[q.answer_index]}")
        assert abs(100 * correct / len(records) - r.accuracy) < 1e-9
        metrics = json.loads((tmp_path / "eval" / r.mode / "step-00012" / "metrics.json").read_text())
        assert metrics["exact_match"] == r.final.exact_match and metrics["visual_accuracy"] == r.final.visual_accuracy
    assert plot_curves(results, tmp_path / "curves.png").stat().st_size > 0


def test_every_run_saves_both_clocks_and_the_table_reports_one(short_demo):
    """Each mode's steps are timed on the wall clock and in CPU time; the three results report one clock (SHORT's
    `auto`, decided on all three), and results.json and each checkpoint's demo_result.json hold what was returned."""
    tmp_path, results = short_demo
    assert SHORT.clock == "auto" and len({(r.clock, r.clock_reason) for r in results}) == 1
    saved = [DemoResult.from_dict(values) for values in json.loads((tmp_path / "results.json").read_text())]
    assert saved == results
    for r in results:
        assert r.usage is not None and r.usage.wall_seconds > 0 and r.usage.cpu_seconds > 0
        last = r.curve[-1]
        assert (last.wall_seconds, last.cpu_seconds) == (r.usage.wall_seconds, r.usage.cpu_seconds)
        assert r.seconds == {"wall": last.wall_seconds, "cpu": last.cpu_seconds}[r.clock]
        assert all(p.train_seconds == {"wall": p.wall_seconds, "cpu": p.cpu_seconds}[r.clock] for p in r.curve)
        recorded = json.loads((tmp_path / "checkpoints" / r.mode / "demo_result.json").read_text())
        assert DemoResult.from_dict(recorded) == r
        assert r.clock_reason.endswith(f"reporting {'CPU time' if r.clock == 'cpu' else 'wall-clock time'}")


def test_saved_checkpoint_reproduces_its_recorded_accuracy(short_demo):
    tmp_path, results = short_demo
    regate = results[1]
    recorded = json.loads((tmp_path / "checkpoints" / "regate" / "demo_result.json").read_text())
    assert recorded["curve"][-1]["accuracy"] == regate.accuracy
    runner = HFRunner.from_pretrained(tmp_path / "checkpoints" / "regate")  # a plain local HF directory, offline
    data = load_mvbench(tmp_path / "data" / "mvbench", tasks=demo_data.TASK_NAMES)
    protocol = get_protocol("official", SHORT.num_frames)
    outputs = runner.generate(
        [Request(tuple(protocol.frames(q)), protocol.prompt(q), video=True) for q in data.questions]
    )
    correct = [protocol.parse(q, out)[1] for q, out in zip(data.questions, outputs)]
    assert 100 * sum(correct) / len(correct) == recorded["curve"][-1]["accuracy"]


def test_training_tokens_equal_what_evaluation_feeds_the_model(tmp_path):
    """The train split, through VideoLLaMA2's template and the placeholder expansion, gives exactly the ids the
    processor builds for the official-protocol request of the same question, followed by the answer."""
    splits = demo_data.generate(tmp_path, train_size=3, test_per_task=1, progress=False)
    train = json.loads(splits.train_json.read_text())
    tokenizer = train_tokenizer([turn["value"] for row in train for turn in row["conversations"]])
    processor = processor_for(tokenizer, SQUARES.image_size, SQUARES.patch)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    protocol = get_protocol("official", 4)
    template = get_template("videollama2")
    for row, conversation in zip(train, iter_conversations(splits.train_json)):
        task = next(t for t in demo_data.DEMO_TASKS if t.question in row["conversations"][0]["value"])
        answer = row["conversations"][1]["value"]
        index = ord(answer[len("Best option:(")]) - ord("A")
        user = row["conversations"][0]["value"]
        order = tuple(line.split(") ", 1)[1] for line in user.splitlines() if line[:1] == "(" and line[2:4] == ") ")
        question = demo_data.Question(task.name, 0, splits.root / row["video"], task.question, order, index, None)
        request = Request(tuple(protocol.frames(question)), protocol.prompt(question), video=True)
        text = HFRunner(torch.nn.Module(), processor)._text(request)
        prompt_ids = processor(text=[text], images=list(request.images), return_tensors="pt")["input_ids"][0].tolist()
        encoded = expand_placeholders(template.encode(conversation, tokenizer), image_token, SQUARES.visual_rows(4))
        assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
        rest = tokenizer.decode(encoded.input_ids[len(prompt_ids) :])
        assert "Best option:(" + rest == answer + tokenizer.eos_token


def test_precompute_cli_keys_hf_native_samples_as_the_adapter_does(tmp_path):
    """`regate precompute --image-token-id` keys the expanded sequence, which is what the HF adapter keys."""
    from regate_plugin.demo.models import tiny_base

    splits = demo_data.generate(tmp_path / "data", train_size=6, test_per_task=1, progress=False)
    train = json.loads(splits.train_json.read_text())
    tokenizer = train_tokenizer([turn["value"] for row in train for turn in row["conversations"]])
    tiny_base(tokenizer, 0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "regate_plugin.cli",
            "precompute",
            "--data",
            str(splits.train_json),
            "--reference",
            str(tmp_path / "base"),
            "--template",
            "videollama2",
            "--visual-tokens",
            str(SQUARES.visual_rows(4)),
            "--image-token-id",
            str(image_token),
            "--out",
            str(tmp_path / "cache"),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    cache = ReferenceLossCache(tmp_path / "cache")
    template = get_template("videollama2")
    for conversation in iter_conversations(splits.train_json):
        encoded = expand_placeholders(template.encode(conversation, tokenizer), image_token, SQUARES.visual_rows(4))
        ids, labels = torch.tensor([encoded.input_ids]), torch.tensor([encoded.labels])
        [key] = batch_sample_keys(ids, labels)  # what the adapter computes from a training batch
        assert key in cache and len(cache[key]) == sum(1 for label in encoded.labels[1:] if label != -100)


def test_saved_activations_counts_what_autograd_keeps():
    """addmm keeps its input for the weight gradient and relu keeps its output; the weight itself is not counted."""
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with SavedActivations(layer) as meter:
        layer(x).relu().sum()
    assert meter.bytes == (5 * 4 + 5 * 3) * 4


def test_cli_help_lists_demo():
    out = subprocess.run(
        [sys.executable, "-m", "regate_plugin.cli", "demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--preset" in out.stdout and "smollm2" in out.stdout


@pytest.mark.parametrize("shuffle", [False, True])
def test_texts_tell_clips_apart_and_the_visual_tokens_are_the_facts(tmp_path, shuffle):
    """Two training clips share a text only when their facts agree (never with shuffled options); the answer tokens
    marked as needing the video decode to the letter, the candidate and the three facts, and nothing else."""
    from regate_plugin.demo import encode_split

    splits = demo_data.generate(tmp_path, 30, 4, seed=3, progress=False, shuffle_options=shuffle)
    train = json.loads(splits.train_json.read_text())
    texts = {tuple(turn["value"] for turn in row["conversations"]) for row in train}
    facts = {(row["conversations"][0]["value"], row["conversations"][1]["value"].split(". ", 1)[1]) for row in train}
    assert len(texts) == len(facts) and (len(texts) == 30 or not shuffle)
    test = json.loads(splits.test_json.read_text())
    tokenizer = train_tokenizer([turn["value"] for row in train + test for turn in row["conversations"]])
    processor = processor_for(tokenizer, SQUARES.image_size, SQUARES.patch)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    samples = encode_split(splits.test_json, splits.root, tokenizer, processor, image_token, SQUARES, 4, False)
    data = {q.uid: q for q in load_mvbench(splits.benchmark_root, tasks=demo_data.TASK_NAMES).questions}
    assert sorted(data) == sorted(row["id"] for row in test)
    for row, sample in zip(test, samples):
        question, answer = data[row["id"]], row["conversations"][1]["value"]
        assert answer.startswith(f"Best option:({question.letters[question.answer_index]}) ")
        ids = [label for label in sample.labels if label != -100]
        visual = "".join(tokenizer.decode([i]) for i, v in zip(ids, sample.visual) if v)
        facts = [answer[a:b] for a, b in row["visual_spans"]]
        assert facts[1] == question.candidates[question.answer_index]
        assert visual.replace(" ", "") == "".join(facts).replace(" ", "")


def test_exact_match_is_what_greedy_decoding_writes(short_demo):
    """Teacher-forced argmax and greedy decoding agree token by token up to the first miss, so "every argmax right"
    is "greedy decoding writes the answer": the first wrong argmax is where the generated answer leaves it."""
    from regate_plugin.demo import encode_split

    tmp_path, _ = short_demo
    runner = HFRunner.from_pretrained(tmp_path / "checkpoints" / "none")
    model, tokenizer = runner.model, runner.processor.tokenizer
    splits_root = tmp_path / "data"
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    samples = encode_split(
        splits_root / "test.json", splits_root, tokenizer, runner.processor, image_token, SQUARES, 4, False
    )
    for sample in samples[:4]:
        first = next(i for i, label in enumerate(sample.labels) if label != -100)
        ids = torch.tensor([sample.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=sample.pixel_values).logits[0]
            answer = sample.input_ids[first:]
            right = (logits[first - 1 : -1].argmax(-1) == torch.tensor(answer)).tolist()
            generated = model.generate(
                input_ids=ids[:, :first], pixel_values=sample.pixel_values, max_new_tokens=len(answer), do_sample=False
            )[0, first:].tolist()
        agreed = next((i for i, ok in enumerate(right) if not ok), len(answer))
        assert generated[:agreed] == answer[:agreed]
        if agreed < len(answer) and agreed < len(generated):
            assert generated[agreed] != answer[agreed]


def test_the_public_names_a_research_script_needs_resolve():
    import regate_plugin.demo as demo

    assert {"collate", "train_reference", "TrainSample", "encode_split", "prepare", "train_mode"} <= set(demo.__all__)
    assert all(getattr(demo, name) is not None for name in demo.__all__)


def test_collate_right_pads_each_row_to_the_longest():
    from regate_plugin.core import IGNORE_INDEX
    from regate_plugin.demo import TrainSample, collate

    rows = [
        TrainSample([5, 6, 7], [IGNORE_INDEX, 6, 7], torch.zeros(2, 3, 4, 4)),
        TrainSample([8], [8], torch.ones(2, 3, 4, 4)),
    ]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.equal(batch["pixel_values"], torch.cat([rows[0].pixel_values, rows[1].pixel_values]))
