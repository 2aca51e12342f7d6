"""The `regate` command's error handling (docs/RELIABILITY.md): bad input is one line naming what to fix, exit 2;
a bug keeps its traceback; a `--model` that names nothing loadable fails before anything loads."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import huggingface_hub
import pytest
import transformers
from regate_plugin.eval import BenchmarkError, MVBenchError
from regate_plugin.model_zoo import ZooError, entries

from regate_plugin.cli import main as regate
from regate_plugin.core import ConfigError
from regate_plugin.core.errors import UserError
from regate_plugin.data import DataError
from regate_plugin.patching import PatchError
from regate_plugin.store import CacheError

from .image_fixtures import write_pope, write_scienceqa


def _regate_process(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """`regate ARGS` in a fresh interpreter, after `prelude` (Python source) has run."""
    code = f"{prelude}\nimport sys\nfrom regate_plugin.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _plugin_error_classes() -> list[type]:
    """Every exception class the plugin defines, found by importing each of its modules."""
    import importlib
    import pkgutil

    import regate_plugin

    for module in pkgutil.walk_packages(regate_plugin.__path__, "regate_plugin."):
        importlib.import_module(module.name)
    found, todo = set(), [Exception]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.__module__.startswith("regate_plugin.") and cls is not UserError:
                found.add(cls)
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_every_error_class_for_bad_input_is_a_user_error():
    errors = _plugin_error_classes()
    assert {CacheError, ConfigError, DataError, PatchError, BenchmarkError, MVBenchError, ZooError} <= set(errors)
    assert [e for e in errors if not issubclass(e, UserError)] == []


def test_a_bug_keeps_its_traceback(tmp_path):
    """A ValueError from inside the code (here: the POPE rule made to fail) is not taken for bad input."""
    root = write_pope(tmp_path / "pope", 1)
    pred = tmp_path / "answers.jsonl"
    pred.write_text(json.dumps({"question_id": "random/1", "prompt": "", "text": "Yes"}) + "\n")
    done = _regate_process(
        "eval",
        "score",
        "pope",
        "--pred",
        str(pred),
        "--data-root",
        str(root),
        prelude=(
            "import regate_plugin.eval.benchmarks.pope as pope\n"
            "def broken(text):\n    raise ValueError('an internal bug')\n"
            "pope.pope_answer = broken"
        ),
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ValueError: an internal bug" in done.stderr


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    root = write_scienceqa(tmp_path / "sqa")
    pred = tmp_path / "answers.jsonl"
    pred.write_text("")
    done = _regate_process("eval", "score", "scienceqa", "--pred", str(pred), "--data-root", str(root), "--split", "va")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"regate eval: error: scienceqa: --split 'va' is not in {root / 'pid_splits.json'}, which has ['test', 'train']"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--steps", "0"], "--steps, --batch-size"),
        (["demo", "--reference-steps", "-1"], "--reference-steps must be >= 0, got -1"),
        (
            ["precompute", "--data", "train.json", "--reference", "r", "--template", "v1", "--out", "c"],
            "--batch-tokens and --window must be >= 1",
        ),
        (["zoo", "show", "llava-v15-7b"], "did you mean llava-v1.5-7b"),
        (["eval", "score", "mmbench", "--pred", "answers.jsonl"], "not an MMBench TSV"),
    ],
)
def test_bad_flags_and_data_are_reported_not_raised(tmp_path, monkeypatch, capsys, args, message):
    """Bad flags and data that used to raise a plain ValueError (caught as any ValueError) now raise user errors."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "answers.jsonl").write_text("")
    (tmp_path / "mmbench").mkdir()
    (tmp_path / "mmbench/mmbench_dev_20230712.tsv").write_text("a\tb\n1\t2\n")
    extra = {
        "demo": ["--out", str(tmp_path / "demo")],
        "precompute": ["--batch-tokens", "0"],
        "eval": ["--data-root", str(tmp_path / "mmbench")],
    }
    assert regate([*args, *extra.get(args[0], [])]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model or reach the hub fails the test, whatever the hub setting."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model load or hub call was attempted: {args} {kwargs}")

    class Refused:
        from_pretrained = staticmethod(refuse)

    monkeypatch.setattr(transformers, "AutoProcessor", Refused)
    monkeypatch.setattr(transformers, "AutoModelForImageTextToText", Refused)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_a_misspelled_zoo_name_fails_before_loading_naming_the_closest_entry(
    tmp_path, monkeypatch, capsys, no_model_loading
):
    assert "llava-v1.5-7b" in entries()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even with the hub allowed, a name that is no hub id is not looked up
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    root = write_pope(tmp_path / "pope", 1)
    args = ["eval", "pope", "--model", "llava-v15-7b", "--data-root", str(root), "--out", str(tmp_path / "out")]
    assert regate(args) == 2
    err = capsys.readouterr().err
    assert "'llava-v15-7b' is not a checkpoint directory, a model_zoo entry" in err
    assert "did you mean the model_zoo entry llava-v1.5-7b" in err
    assert not (tmp_path / "out/answers.jsonl").exists()


def test_an_uncached_hub_id_with_the_hub_off_fails_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a model load was attempted")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)
    root = write_pope(tmp_path / "pope", 1)
    model = "regate-tests/no-such-checkpoint"
    assert regate(["eval", "pope", "--model", model, "--data-root", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{model} is not in the local HF cache" in err and "HF_HUB_OFFLINE" in err
    assert f"huggingface-cli download {model}" in err


@pytest.mark.parametrize("model", ["./checkpoints/my-llava", "/no/such/dir", "a/b/c", "llava_v1.5"])
def test_what_is_neither_a_directory_an_entry_nor_a_hub_id_is_refused(tmp_path, monkeypatch, no_model_loading, model):
    from regate_plugin.model_zoo import locate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ZooError, match="is not a checkpoint directory, a model_zoo entry"):
        locate(model)


def test_a_local_directory_and_a_zoo_entry_still_resolve(tmp_path):
    from regate_plugin.model_zoo import locate

    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert locate(str(tmp_path / "owner" / "name")) == (str(tmp_path / "owner" / "name"), None)
    name = next(e.name for e in entries().values() if e.availability == "shipped")
    path, entry = locate(name)
    assert entry is entries()[name] and Path(path) == entry.path


def test_regate_help_imports_neither_torch_nor_transformers():
    """`regate --help` builds no command's options, so nothing heavy is imported (it took 5-7 s when it did)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "regate_plugin.cli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "precompute" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "regate_plugin.cli_options" in imported  # the list is read right: the parser's own modules are in it
    assert {"torch", "transformers", "numpy"} & imported == set()


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["precompute", "--data", "d.json", "--out", "c", "--max_length", "128"], "max_length", 128),
        (["precompute", "--data", "d.json", "--out", "c", "--max-length", "128"], "max_length", 128),
        (["precompute", "--data", "d.json", "--out", "c", "--batch_tokens", "64"], "batch_tokens", 64),
        (["precompute", "--data", "d.json", "--out", "c", "--skip_bad"], "skip_bad", True),
        (["precompute", "--data", "d.json", "--out", "c", "--no_progress"], "progress", False),
        (["demo", "--keep_ratio", "0.5"], "keep_ratio", 0.5),
        (["demo", "--test_per_task", "3"], "test_per_task", 3),
        (["eval", "mvbench", "--model", "m", "--data_root", "r", "--num_frames", "8"], "num_frames", 8),
        (["eval", "pope", "--check_data", "--data_root", "r"], "check_data", True),
        (["zoo", "load", "x", "--model_base", "b"], "model_base", "b"),
    ],
)
def test_every_dashed_option_takes_the_underscore_spelling_too(argv, dest, value):
    from regate_plugin.cli import build_parser

    assert getattr(build_parser(argv[0]).parse_args(argv), dest) == value


def test_precompute_options_are_the_config_fields(tmp_path):
    """One option per PrecomputeConfig field with help, and the parsed values build the config unchanged."""
    from regate_plugin.cli import build_parser
    from regate_plugin.cli_options import config_from_args, config_options
    from regate_plugin.reference.precompute import PrecomputeConfig

    args = build_parser("precompute").parse_args(
        ["precompute", "--data", "a.json", "b.json", "--reference", "r", "--template", "v1", "--out", "c"]
        + ["--dtype", "float32", "--max_length", "96", "--resume", "--image-token-id", "7"]
    )
    cfg = config_from_args(PrecomputeConfig, args)
    expected = PrecomputeConfig(
        data=["a.json", "b.json"],
        reference="r",
        template="v1",
        out="c",
        cache_dtype="float32",
        max_length=96,
        resume=True,
        image_token_id=7,
    )
    assert cfg == expected
    # read off the student by --student-config, not options of their own
    derived = {"anyres", "processor_rows", "video_rows"}
    assert {f.name for f in config_options(PrecomputeConfig)} == {f.name for f in fields(PrecomputeConfig)} - derived


def test_a_misspelled_elision_flag_names_the_closest_one(capsys):
    """The launcher refuses it for either codebase before importing the upstream code (none is installed here)."""
    from regate_plugin.training.launchers import main as launch

    for codebase, flag, closest in [
        ("llava", "--regate_keep_ratoi", "--regate_keep_ratio"),
        ("videollama2", "--token_elison", "--token_elision"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            launch([codebase, "--output_dir", "o", flag, "0.5"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"error: {flag} is not a token-elision flag; did you mean {closest}?" in err
