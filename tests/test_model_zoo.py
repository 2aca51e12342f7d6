import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from regate_plugin.eval import get_protocol, load_mvbench
from regate_plugin.eval.base import Request
from regate_plugin.eval.runners import HFRunner
from regate_plugin.model_zoo import (
    FORMATS,
    SHIPPED_DIR,
    ZooError,
    ZooFormat,
    detect_format,
    entries,
    format_table,
    get_entry,
    load,
    parse_entry,
    verify_files,
)

from regate_plugin import model_zoo
from regate_plugin.demo import data as demo_data

SHIPPED = [e for e in entries().values() if e.availability == "shipped"]
REQUIRED_NAMES = (
    "llava-v1.5-7b",
    "videollama2-7b",
    "videollama2-7b-16f",
    "videollama2.1-7b-16f",
    "llava-onevision-qwen2-7b-ov",
)


def test_registry_holds_the_required_entries_and_every_one_validates():
    assert set(REQUIRED_NAMES) <= set(entries())
    assert any(e.availability == "announced" for e in entries().values())
    assert len(SHIPPED) == 3
    references = {
        "llava-v1.5-7b": "lmsys/vicuna-7b-v1.5",
        "videollama2-7b": "mistralai/Mistral-7B-Instruct-v0.2",
        "videollama2-7b-16f": "mistralai/Mistral-7B-Instruct-v0.2",
        "videollama2.1-7b-16f": "Qwen/Qwen2-7B-Instruct",
        "llava-onevision-qwen2-7b-ov": "Qwen/Qwen2-7B-Instruct",
    }
    for name, reference in references.items():
        assert get_entry(name).reference_llm == reference
    for path in sorted(model_zoo.ENTRIES_DIR.glob("*.json")):  # re-read from disk, each through the schema
        assert parse_entry(json.loads(path.read_text()), path).name == path.stem


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("license"), "missing field 'license'"),
        (lambda e: e.update(format="onnx"), "'format' must be one of"),
        (lambda e: e.update(tokens_used="many"), "field 'tokens_used' has the wrong type"),
        (lambda e: e.update(files={}), "lists every file with its sha256"),
        (lambda e: e["eval"][0].pop("metric"), "eval[0] needs exactly"),
        (lambda e: e.update(extra=1), "unknown field(s) ['extra']"),
    ],
)
def test_schema_rejects_a_bad_entry_naming_file_and_field(tmp_path, change, message):
    source = model_zoo.ENTRIES_DIR / "regate-demo-tiny-regate.json"
    raw = json.loads(source.read_text())
    change(raw)
    bad = tmp_path / "regate-demo-tiny-regate.json"
    shutil.copy(source.with_suffix(".md"), bad.with_suffix(".md"))
    with pytest.raises(
        ZooError,
        match=str(bad).replace(".", r"\.")
        + ".*"
        + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        parse_entry(raw, bad)


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.name)
def test_shipped_checkpoint_loads_offline_verifies_and_reproduces_its_result(entry, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load(entry.name)
    assert loaded.entry is entry and loaded.format == "hf-llava" == detect_format(loaded.path)
    [result] = entry.eval
    data = load_mvbench(SHIPPED_DIR / result.data, allow_missing=True)  # the tasks of the demo it was trained on
    protocol = get_protocol(result.protocol, 4)
    runner = HFRunner(loaded.model, loaded.processor)
    outputs = runner.generate(
        [Request(tuple(protocol.frames(q)), protocol.prompt(q), video=True) for q in data.questions]
    )
    correct = [protocol.parse(q, output)[1] for q, output in zip(data.questions, outputs)]
    assert len(correct) == 90
    assert 100 * sum(correct) / len(correct) == pytest.approx(result.value, abs=1e-9)


def test_a_tampered_shipped_file_is_refused(tmp_path):
    entry = SHIPPED[0]
    for directory in (entry.location, entry.reference_path):
        shutil.copytree(SHIPPED_DIR / directory, tmp_path / directory)
    copy = tmp_path / entry.location
    assert verify_files(entry, tmp_path) == copy
    reference = tmp_path / entry.reference_path / "model.safetensors"
    reference.write_bytes(reference.read_bytes()[:-1])
    with pytest.raises(ZooError, match=r"regate-demo-tiny-reference/model\.safetensors does not match"):
        verify_files(entry, tmp_path)
    shutil.copy(SHIPPED_DIR / entry.reference_path / "model.safetensors", reference)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ZooError, match=r"model\.safetensors does not match its recorded sha256"):
        verify_files(entry, tmp_path)
    weights.unlink()
    with pytest.raises(ZooError, match=r"model\.safetensors is missing"):
        verify_files(entry, tmp_path)


def test_announced_and_uncached_hub_entries_say_what_to_do(tmp_path, monkeypatch):
    announced = next(e for e in entries().values() if e.availability == "announced")
    with pytest.raises(ZooError, match="not public yet"):
        load(announced.name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ZooError, match=r"liuhaotian/llava-v1\.5-7b is not in the local HF cache.*huggingface-cli download"
    ):
        load("llava-v1.5-7b")
    with pytest.raises(ZooError, match="no model_zoo entry 'nope'"):
        load("nope")


@pytest.mark.parametrize(
    ("config", "files", "expected"),
    [
        ({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}, [], "hf-qwen2-vl"),
        (
            {"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision"},
            [],
            "hf-llava",
        ),
        (
            {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_vision_tower": "clip"},
            [],
            "llava",
        ),
        ({"model_type": "llava_llama", "mm_vision_tower": "clip"}, ["adapter_config.json"], "llava-lora"),
        ({"architectures": ["Videollama2MistralForCausalLM"], "model_type": "videollama2_mistral"}, [], "videollama2"),
    ],
)
def test_detect_format_of_local_directories(tmp_path, config, files, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in files:
        (tmp_path / name).write_text("{}")
    assert detect_format(tmp_path) == expected


def test_the_demo_students_share_one_shipped_reference_llm():
    assert {e.reference_path for e in SHIPPED} == {"regate-demo-tiny-reference"}
    assert not list(SHIPPED_DIR.glob("*/reference"))


def test_a_registered_format_is_detected_and_loaded(tmp_path):
    """A third-party format plugs into detection, loading and the schema's list of formats."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy"}))

    def load_toy(path, model_base, **kw):
        return torch.nn.Linear(2, 3), None, None

    toy = ZooFormat(lambda path, config: config.get("model_type") == "toy", load_toy)
    FORMATS.register("toy", toy)
    try:
        with pytest.raises(ValueError, match="format 'toy' is already registered"):
            FORMATS.register("toy", ZooFormat(toy.detect, load_toy))
        loaded = load(tmp_path)
        assert loaded.format == "toy" and loaded.summary().endswith(f"9 parameters, format toy, from {tmp_path}")
        assert "toy" in format_table()
    finally:
        del FORMATS._entries["toy"]  # the registry offers no removal: undo this test's entry for the others


def test_detect_format_refuses_what_it_does_not_know(tmp_path):
    with pytest.raises(ZooError, match="no config.json"):
        detect_format(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ZooError, match="cannot tell its format"):
        detect_format(tmp_path)


def test_upstream_llava_checkpoint_loads_through_the_real_llava_loader(tmp_path):
    """In the upstream environment: `load(dir)` detects an upstream LLaVA checkpoint and returns exactly the
    weights `llava.model.builder.load_pretrained_model` loads."""
    from tests.test_launch_llava import _llava
    from tests.tokenizers_fixture import write_sentencepiece_llama

    tokenizer = write_sentencepiece_llama(tmp_path / "tok")
    model = tmp_path / "llava-v1.5-tiny"
    _llava(
        str(Path(__file__).parent / "upstream_llava/make_checkpoint.py"),
        str(tokenizer),
        str(tmp_path / "parts"),
        str(model),
    )
    script = (
        "import sys, torch\n"
        "from llava.model.builder import load_pretrained_model\n"
        "from regate_plugin.model_zoo import load\n"
        "loaded = load(sys.argv[1])\n"
        "_, reference, _, _ = load_pretrained_model(\n"
        "    sys.argv[1], None, 'llava-v1.5-tiny', device_map='cpu', device='cpu')\n"
        "ours, theirs = loaded.model.state_dict(), reference.state_dict()\n"
        "assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)\n"
        "print(loaded.format, type(loaded.model).__name__, type(loaded.processor).__name__)\n"
    )
    done = _llava("-c", script, str(model))
    assert done.stdout.split()[-3:] == ["llava", "LlavaLlamaForCausalLM", "CLIPImageProcessor"]


def test_zoo_cli_lists_shows_and_loads():
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "regate_plugin.cli", "zoo", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )

    listed = run("list")
    assert listed.returncode == 0 and all(name in listed.stdout for name in entries())
    shown = run("show", "regate-demo-tiny-regate")
    assert shown.returncode == 0 and shown.stdout.startswith("# regate-demo-tiny-regate")
    loaded = run("load", "regate-demo-tiny-none")
    assert (
        loaded.returncode == 0
        and "LlavaForConditionalGeneration" in loaded.stdout
        and "match their sha256" in loaded.stdout
    )
    refused = run("load", "regate-videollama2-7b")
    assert refused.returncode == 2 and "not public yet" in refused.stderr


def test_precompute_student_takes_reference_and_template_from_the_entry(tmp_path):
    """`--student NAME` defaults --reference to the entry's reference: for an uncached hub reference, offline, the
    run fails at loading that reference (and says which)."""
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps([{"id": 0, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "regate_plugin.cli",
            "precompute",
            "--data",
            str(data),
            "--student",
            "llava-v1.5-7b",
            "--out",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert "reference LLM and template from model_zoo entry llava-v1.5-7b: lmsys/vicuna-7b-v1.5, v1" in done.stdout
    assert done.returncode == 2 and "cannot load the tokenizer of lmsys/vicuna-7b-v1.5" in done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "regate_plugin.cli", "precompute", "--data", str(data), "--out", str(tmp_path / "c")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "--student NAME" in missing.stderr


def test_eval_cli_scores_a_zoo_entry_by_name(tmp_path):
    """`regate eval mvbench --model NAME` resolves the entry and scores it as its card says, to its recorded value."""
    entry = get_entry("regate-demo-tiny-random")
    [result] = entry.eval
    subprocess.run(
        [
            sys.executable,
            "-m",
            "regate_plugin.cli",
            "eval",
            "mvbench",
            "--model",
            entry.name,
            "--data-root",
            str(SHIPPED_DIR / result.data),
            "--num-frames",
            "4",
            "--allow-missing",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["total"] == 90 and metrics["avg"] == pytest.approx(result.value, abs=1e-9)


def test_precompute_student_uses_the_reference_shipped_with_a_demo_entry(tmp_path):
    """`--student regate-demo-tiny-regate` loads the entry's own reference LLM; its cached losses equal a direct
    forward of that LLM over the text tokens at their positions in the expanded sequence (visual rows skipped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from regate_plugin.core import batch_sample_keys
    from regate_plugin.data import expand_placeholders, get_template, iter_conversations
    from regate_plugin.store import ReferenceLossCache

    entry = get_entry("regate-demo-tiny-regate")
    splits = demo_data.generate(tmp_path / "data", train_size=3, test_per_task=1, progress=False)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "regate_plugin.cli",
            "precompute",
            "--data",
            str(splits.train_json),
            "--student",
            entry.name,
            "--image-token-id",
            "4",
            "--visual-tokens",
            "64",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "cache"),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    cache = ReferenceLossCache(tmp_path / "cache")
    reference = AutoModelForCausalLM.from_pretrained(SHIPPED_DIR / entry.reference_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DIR / entry.reference_path)
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    for conversation in iter_conversations(splits.train_json):
        sample = expand_placeholders(get_template("videollama2").encode(conversation, tokenizer), 4, 64)
        ids, labels = torch.tensor(sample.input_ids), torch.tensor(sample.labels)
        text = ids != 4
        with torch.no_grad():
            logits = reference(input_ids=ids[text][None], position_ids=torch.nonzero(text).T).logits[0]
        targets = labels[text][1:]
        expected = torch.nn.functional.cross_entropy(
            logits[:-1][targets != -100], targets[targets != -100], reduction="none"
        )
        [key] = batch_sample_keys(ids[None], labels[None])
        torch.testing.assert_close(cache[key], expected, atol=1e-4, rtol=1e-4)
