"""Errors that name their cause (docs/RELIABILITY.md): an upstream --version without a plugin template, a mistyped
checkpoint path, an upstream LLaVA checkpoint given to the HF runner, a processor without a chat template."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from regate_plugin.cli import main as regate

from .image_fixtures import write_pope
from .test_launch_llava import _llava

TEMPLATE_OF_VERSIONS = r"""
import json, sys
from llava import conversation
from regate_plugin.core.errors import UserError
from regate_plugin.training.launchers import llava_template
found = {}
for version in sys.argv[1:]:
    conversation.default_conversation = conversation.conv_templates[version]
    try:
        found[version] = llava_template(None)
    except UserError as err:
        found[version] = "error: " + str(err)
print(json.dumps(found))
"""


def test_an_upstream_version_without_a_plugin_template_is_named_with_those_that_have_one(tmp_path):
    """Upstream llava-torch's own conversation templates: v1 and plain map to the plugin's; llama_2 and
    llava_v1 (another system prompt) have none, which said nothing (the pre-flight then only found every sample
    missing from the cache)."""
    script = tmp_path / "template_of_versions.py"
    script.write_text(TEMPLATE_OF_VERSIONS)
    found = json.loads(_llava(str(script), "v1", "vicuna_v1", "plain", "llama_2", "llava_v1").stdout)
    assert {v: found[v] for v in ("v1", "vicuna_v1", "plain")} == {"v1": "v1", "vicuna_v1": "v1", "plain": "plain"}
    for version in ("llama_2", "llava_v1"):
        message = found[version]
        assert message.startswith(f"error: --version {version} ") and "\n" not in message
        assert "it has one for: v1 (v1), vicuna_v1 (v1), plain (plain), v0_plain (plain)" in message


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (
            "checkpoints/llava-v1.5-7b-tpyo",
            "no such checkpoint directory in checkpoints; did you mean checkpoints/llava-v1.5-7b-typo?",
        ),  # exists partially: checkpoints/ is here
        ("./llava-v1.5-7b", "no such checkpoint directory in ."),
        ("runs/a/b", "(runs does not exist)"),  # more separators than a hub id has
        ("~/regate-no-such-checkpoint", "no such checkpoint directory in "),
        ("{tmp}/checkpoints/gone", "no such checkpoint directory in {tmp}/checkpoints"),
    ],
)
def test_a_mistyped_checkpoint_path_is_refused_at_once_naming_it(tmp_path, monkeypatch, capsys, model, named):
    """It went to the hub (53 s of retries, then a raw OSError). Here the hub is not switched off, and the error
    comes before anything is asked of it (a socket opened would fail the test)."""
    (tmp_path / "checkpoints" / "llava-v1.5-7b-typo").mkdir(parents=True)
    root = write_pope(tmp_path / "pope", per_category=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    model, named = model.format(tmp=tmp_path), named.format(tmp=tmp_path)
    assert regate(["eval", "pope", "--model", model, "--data-root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"regate eval: error: --model {model}: ") and named in err and "\n" not in err
    assert not (tmp_path / "eval_out").exists()


def _no_network(*args, **kwargs):
    raise AssertionError("the hub was asked")


def test_a_hub_id_is_not_taken_for_a_path(tmp_path, monkeypatch, capsys):
    from regate_plugin.eval.runners import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("llava-hf/llava-1.5-7b-hf")
    assert looks_like_path("./llava-hf") and looks_like_path("a/b/c") and looks_like_path("/a")
    (tmp_path / "llava-hf").mkdir()
    assert looks_like_path("llava-hf/llava-1.5-7b-hf")  # a folder of that name is here: a path it is


@pytest.fixture(scope="module")
def upstream_llava_checkpoint(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5 checkpoint as upstream LLaVA's fine-tuning writes it (made in the upstream env)."""
    from .tokenizers_fixture import write_sentencepiece_llama

    root = tmp_path_factory.mktemp("upstream")
    model = root / "llava-v1.5-tiny"
    script = Path(__file__).parent / "upstream_llava" / "make_checkpoint.py"
    _llava(str(script), str(write_sentencepiece_llama(root / "tok")), str(root / "parts"), str(model))
    return model


def test_an_upstream_llava_checkpoint_without_runner_llava_says_to_use_it(tmp_path, upstream_llava_checkpoint, capsys):
    """transformers cannot load LlavaLlamaForCausalLM: it raised an error that did not say what to do."""
    root = write_pope(tmp_path / "pope", per_category=1)
    model = upstream_llava_checkpoint
    assert regate(["eval", "pope", "--model", str(model), "--data-root", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"regate eval: error: --model {model} is an upstream LLaVA checkpoint (format 'llava', from its "
        "config.json), which transformers cannot load: use --runner llava, in the upstream LLaVA environment"
    )


def test_a_processor_without_a_chat_template_is_named_and_chat_template_supplies_one(tmp_path, capsys):
    """It was a ValueError traceback from apply_chat_template. With --chat-template (the template the model was
    made with), the answers equal those of the model with its own template."""
    from .eval_fixtures import CHAT_TEMPLATE, write_tiny_hf_llava
    from .tokenizers_fixture import write_bpe_chat_tokenizer

    model = write_tiny_hf_llava(tmp_path / "with", write_bpe_chat_tokenizer(tmp_path / "tok", "chatml"))
    bare = tmp_path / "without"
    shutil.copytree(model, bare)
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (bare / name).is_file():
            config = json.loads((bare / name).read_text())
            config.pop("chat_template", None)
            (bare / name).write_text(json.dumps(config))
    root = write_pope(tmp_path / "pope", per_category=1)
    flags = ["--data-root", str(root), "--no-progress"]
    assert regate(["eval", "pope", "--model", str(bare), *flags, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"regate eval: error: --model {bare}: its processor has no chat template")
    assert "pass --chat-template FILE" in err

    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    assert (
        regate(
            [
                "eval",
                "pope",
                "--model",
                str(bare),
                *flags,
                "--chat-template",
                str(template),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    assert regate(["eval", "pope", "--model", str(model), *flags, "--out", str(tmp_path / "c")]) == 0
    texts = [
        [json.loads(line)["text"] for line in (tmp_path / d / "answers.jsonl").read_text().splitlines()]
        for d in ("b", "c")
    ]
    assert texts[0] == texts[1]
