"""Faults of the reference cache and `regate precompute`: a lost manifest, corrupt and truncated shards, a run that
stopped before its first shard, a full disk, file modes, and `cache stats` on a cache it must not write into. Every
repaired cache is compared, value for value, with a fresh uninterrupted run of the same settings."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from regate_plugin.cli import main as regate
from regate_plugin.core import ReGATEConfig
from regate_plugin.core.keys import KEY_BYTES
from regate_plugin.data import get_template, iter_conversations
from regate_plugin.store import MANIFEST_NAME, CorruptShardError, ReferenceLossCache, ReferenceLossCacheWriter
from regate_plugin.store.shards import SET_ASIDE_SUFFIX
from regate_plugin.strategies import build_token_elision
from regate_plugin.training.preflight import CacheMismatchError, RunFacts, check_cache_fits

from .llava_data import conversation_samples, write_json, write_tiny_reference
from .tokenizers_fixture import write_sentencepiece_llama

SAMPLES = 24
WINDOW = 4  # one shard per window: six shards


def _text_only(samples: list[dict]) -> list[dict]:
    """The samples without their image, so the runs need no image files."""
    for sample in samples:
        sample.pop("image", None)
        for turn in sample["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "").strip()
    return samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_faults")
    tokenizer = write_sentencepiece_llama(root / "tok")
    reference = write_tiny_reference(root / "reference", tokenizer)
    data = write_json(root / "train.json", _text_only(conversation_samples(SAMPLES, seed=3, long_every=7)))
    fresh = root / "fresh"
    assert _run(data, reference, fresh) == 0
    return data, reference, _cache_dict(fresh)


def _args(data: Path, reference: Path, out: Path, *extra: object) -> list[str]:
    return [
        *("precompute", "--no-progress", "--dtype", "float32", "--data", data, "--reference", reference),
        *("--template", "v1", "--max-length", 160, "--window", WINDOW, "--batch-tokens", 300, "--out", out),
        *extra,
    ]


def _run(data: Path, reference: Path, out: Path, *extra: object) -> int:
    return regate([str(a) for a in _args(data, reference, out, *extra)])


def _cache_dict(path: Path) -> dict[bytes, torch.Tensor]:
    cache = ReferenceLossCache(path)
    return {key: cache[key] for key in cache.keys()}


def _assert_equal(got: dict[bytes, torch.Tensor], want: dict[bytes, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _summary(out: Path) -> dict:
    return json.loads((out / "precompute_summary.json").read_text())


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.safetensors"))}


def _samples_of(shard: Path) -> int:
    return safetensors.torch.load_file(shard)["keys"].shape[0]


def test_a_lost_manifest_is_refused_without_resume_and_rebuilt_with_it(setup, tmp_path, capsys):
    data, reference, fresh = setup
    out = tmp_path / "cache"
    assert _run(data, reference, out) == 0
    (out / MANIFEST_NAME).unlink()
    shards = _shard_bytes(out)
    assert len(shards) == SAMPLES // WINDOW

    assert _run(data, reference, out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "shard-00000.safetensors" in err and "--resume" in err and "--overwrite" in err
    assert _shard_bytes(out) == shards, "a refused run must leave every shard as it was"
    assert regate(["cache", "verify", str(out)]) == 2
    assert "rebuilds the manifest" in capsys.readouterr().err

    other = write_tiny_reference(tmp_path / "other", Path(reference), seed=1)
    assert _run(data, other, out, "--resume") == 2, "shards made with another reference LLM are not adopted"
    assert "made differently" in capsys.readouterr().err and _shard_bytes(out) == shards

    assert _run(data, reference, out, "--resume") == 0
    assert _shard_bytes(out) == shards and _summary(out)["scored"] == 0, "the shards are adopted, not rescored"
    _assert_equal(_cache_dict(out), fresh)
    assert regate(["cache", "verify", str(out)]) == 0


def test_a_lost_manifest_with_a_truncated_shard_keeps_the_rest(setup, tmp_path):
    data, reference, fresh = setup
    out = tmp_path / "cache"
    assert _run(data, reference, out) == 0
    (out / MANIFEST_NAME).unlink()
    broken = out / "shard-00002.safetensors"
    truncated = broken.read_bytes()[:-40]
    samples = _samples_of(out / "shard-00001.safetensors")  # every window holds the same number of samples
    broken.write_bytes(truncated)

    assert _run(data, reference, out, "--resume") == 0
    assert (out / (broken.name + SET_ASIDE_SUFFIX)).read_bytes() == truncated, "set aside, not deleted"
    assert _summary(out)["scored"] == samples
    _assert_equal(_cache_dict(out), fresh)
    assert regate(["cache", "verify", str(out)]) == 0


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_resume_sets_aside_a_damaged_shard_and_scores_its_samples_again(setup, tmp_path, capsys, damage):
    data, reference, fresh = setup
    out = tmp_path / "cache"
    assert _run(data, reference, out) == 0
    shard = out / "shard-00001.safetensors"
    samples = _samples_of(shard)
    content = bytearray(shard.read_bytes())
    if damage == "flipped":
        content[-3] ^= 0xFF
    else:
        content = content[: len(content) // 2]
    shard.write_bytes(bytes(content))

    with pytest.raises(CorruptShardError, match="--resume"):  # what training says
        ReferenceLossCache(out)
    assert regate(["cache", "verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"BAD  {shard}" in printed

    assert _run(data, reference, out) == 2, "without --resume a cache with work in it is refused"
    assert _run(data, reference, out, "--resume") == 0
    assert (out / (shard.name + SET_ASIDE_SUFFIX)).read_bytes() == bytes(content), "set aside, not deleted"
    summary = _summary(out)
    assert summary["scored"] == samples and summary["already_done"] == SAMPLES - samples
    assert regate(["cache", "verify", str(out)]) == 0
    _assert_equal(_cache_dict(out), fresh)


@pytest.mark.parametrize("how", ["failed", "killed"])
def test_a_run_that_stopped_before_its_first_shard_leaves_nothing_that_counts(setup, tmp_path, capsys, how):
    data, reference, fresh = setup
    out = tmp_path / "cache"
    if how == "failed":
        samples = json.loads(data.read_text())
        samples[1]["image"] = "0001.jpg"  # and no --visual-tokens: found as the sample is prepared
        samples[1]["conversations"][0]["value"] = "<image>\n" + samples[1]["conversations"][0]["value"]
        assert _run(write_json(tmp_path / "bad.json", samples), reference, out) == 2  # fails on its second sample
        assert "--visual-tokens" in capsys.readouterr().err
    else:  # what a SIGKILL before the first shard leaves: both manifests written, a shard being written
        for directory in (out, out / "parts" / "rank-00000"):
            ReferenceLossCacheWriter(directory, reference="killed", tokenizer_fingerprint="f", reference_mode="gap")
        (out / "parts" / "rank-00000" / ".shard-00000.safetensors.abc.tmp").write_bytes(b"\0" * 10)
    assert (out / MANIFEST_NAME).is_file() and (out / "parts").is_dir() and not list(out.rglob("shard-*"))

    assert regate(["cache", "verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "holds no samples" in printed and "all hashes match" not in printed

    other = write_tiny_reference(tmp_path / "other", Path(reference), seed=1)  # any settings: nothing is kept
    assert _run(data, other, out) == 0
    assert "already holds" not in capsys.readouterr().err
    assert _run(data, reference, out, "--overwrite") == 0
    _assert_equal(_cache_dict(out), fresh)


def _full_after(calls: int, error: Exception, write, tear):
    """`write` on a disk that fills up: the first `calls` calls succeed, the next ones keep half (`tear`) and fail."""
    count = 0

    def wrapped(*args, **kwargs):
        nonlocal count
        count += 1
        result = write(*args, **kwargs)
        if count > calls:
            tear(*args)
            raise error
        return result

    return wrapped


def _halve_file(tensors, filename):
    os.truncate(filename, os.path.getsize(filename) // 2)


def _halve_fd(fd):
    os.ftruncate(fd, os.fstat(fd).st_size // 2)


@pytest.mark.parametrize("where", ["shard", "shard-safetensors", "manifest"])
def test_a_full_disk_is_named_and_the_run_resumes_to_an_equal_cache(setup, tmp_path, capsys, monkeypatch, where):
    data, reference, fresh = setup
    out = tmp_path / "cache"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "manifest":  # the fifth manifest write: the part's, after its third shard
        name = "rank-00000/" + MANIFEST_NAME
        monkeypatch.setattr(os, "fsync", _full_after(4, full, os.fsync, _halve_fd))
    else:  # the part's third shard
        name = "rank-00000/shard-00002.safetensors"
        if where == "shard-safetensors":
            full = safetensors.SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)}")
        write = _full_after(2, full, safetensors.torch.serialize_file, _halve_file)
        monkeypatch.setattr(safetensors.torch, "serialize_file", write)
    assert _run(data, reference, out) == 2
    err = capsys.readouterr().err
    assert name in err and "--resume" in err and "Traceback" not in err
    monkeypatch.undo()
    assert not list(out.rglob("*.tmp")), "no half-written file is left"
    part = out / "parts" / "rank-00000"
    assert regate(["cache", "verify", str(part)]) == 0, "what was committed is intact"
    committed = ReferenceLossCache(part).manifest.samples
    assert committed > 0

    assert _run(data, reference, out, "--resume") == 0
    assert _summary(out)["already_done"] == committed
    _assert_equal(_cache_dict(out), fresh)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_shards_and_manifest_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        writer = ReferenceLossCacheWriter(tmp_path, reference="r", tokenizer_fingerprint="f", reference_mode="gap")
        writer.add(b"k" * KEY_BYTES, torch.ones(3))
        writer.close()
    finally:
        os.umask(previous)
    written = [tmp_path / MANIFEST_NAME, *tmp_path.glob("shard-*.safetensors")]
    assert len(written) == 2
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o666 & ~umask}


def test_cache_stats_writes_its_plot_where_asked_and_never_into_the_cache(setup, tmp_path, capsys, monkeypatch):
    data, reference, _ = setup
    out = tmp_path / "cache"
    assert _run(data, reference, out) == 0
    before = sorted(p.name for p in out.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert regate(["cache", "stats", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == before
    assert (work / "reference_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "histogram: reference_losses.png" in capsys.readouterr().out

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert regate(["cache", "stats", str(out), "--plot", str(blocked / "h.png")]) == 0
    captured = capsys.readouterr()
    assert "loss p50" in captured.out and f"cannot write {blocked / 'h.png'}" in captured.err
    shutil.rmtree(work)


def test_a_tokenizer_without_a_length_limit_truncates_nothing(setup, tmp_path):
    data, _, fresh = setup
    tokenizer = write_sentencepiece_llama(tmp_path / "tok", model_max_length=int(1e30))  # llava-hf's sentinel
    reference = write_tiny_reference(tmp_path / "reference", tokenizer)
    out = tmp_path / "cache"
    args = [a for a in _args(data, reference, out) if a not in ("--max-length", 160)]
    assert regate([str(a) for a in args]) == 0  # an OverflowError, "int too big to convert", before the fix
    assert _summary(out)["truncated"] == 0
    untruncated = _cache_dict(out)
    assert len(untruncated) == SAMPLES
    shorter = [key for key, losses in fresh.items() if key in untruncated]  # the samples --max-length 160 kept whole
    assert 0 < len(shorter) < SAMPLES, "the data has samples longer than 160 tokens and shorter ones"


def test_a_reference_with_a_smaller_vocabulary_is_refused_before_scoring(setup, tmp_path, capsys):
    data, reference, _ = setup
    config = transformers.AutoConfig.from_pretrained(reference)
    config.vocab_size = 100  # the data's token ids go up to the tokenizer's 700
    small = tmp_path / "small"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(small)
    transformers.AutoTokenizer.from_pretrained(reference).save_pretrained(small)
    out = tmp_path / "cache"
    assert _run(data, small, out) == 2  # an IndexError inside the forward before the fix
    err = capsys.readouterr().err
    assert f"reference LLM {small}" in err and "(100 tokens)" in err and "Traceback" not in err
    assert re.search(r"token id (\d+) is outside", err) and int(re.search(r"token id (\d+)", err)[1]) >= 100
    assert not list(out.rglob("shard-*")), "nothing scored"


@pytest.mark.parametrize("foreign", ["manifest", "parts"])
def test_files_the_precompute_did_not_make_are_neither_deleted_nor_replaced(setup, tmp_path, capsys, foreign):
    data, reference, fresh = setup
    out = tmp_path / "out"
    (out / "parts" / "notes").mkdir(parents=True)
    (out / "parts" / "notes" / "todo.txt").write_text("mine")
    (out / MANIFEST_NAME).write_text('{"model": "mine"}' if foreign == "manifest" else "")
    if foreign == "parts":  # a cache's empty manifest (what a run killed before its first shard leaves)
        (out / MANIFEST_NAME).unlink()
        ReferenceLossCacheWriter(out, reference="killed", tokenizer_fingerprint="f", reference_mode="gap")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _run(data, reference, out) == 2  # exit 0 with parts/ deleted and manifest.json replaced before the fix
    err = capsys.readouterr().err
    named = out / MANIFEST_NAME if foreign == "manifest" else out / "parts" / "notes"
    assert str(named) in err and "--overwrite" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing deleted or replaced"
    assert _run(data, reference, out, "--resume") == 2
    assert _run(data, reference, out, "--overwrite") == 0
    _assert_equal(_cache_dict(out), fresh)


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(setup, tmp_path):
    data, reference, fresh = setup
    slow = write_tiny_reference(tmp_path / "slow", Path(reference), hidden=256, layers=6)  # still going when killed
    long_data = write_json(tmp_path / "train.json", _text_only(conversation_samples(2000, seed=4)))
    out, lock = tmp_path / "out", tmp_path / "out" / "precompute.lock"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "regate_plugin.cli", *map(str, _args(long_data, slow, out))]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while _holder(lock).get("pid") != first.pid and time.time() < deadline:
            time.sleep(0.05)
        assert _holder(lock)["pid"] == first.pid
        other_job = [sys.executable, "-m", "regate_plugin.cli", *map(str, _args(data, slow, out, "--resume"))]
        second = subprocess.run(other_job, env=env, capture_output=True, text=True, timeout=300)  # other data
        assert _holder(lock)["pid"] == first.pid and first.poll() is None, "the first run still holds the lock"
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr and "--data" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert _holder(lock)["pid"] == first.pid, "a killed run leaves its lock file"
    third = subprocess.run(
        [sys.executable, "-m", "regate_plugin.cli", *map(str, _args(data, reference, out, "--overwrite"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert "taking over" in third.stderr and f"pid {first.pid}" in third.stderr
    assert not lock.exists(), "the lock is released at the end"
    _assert_equal(_cache_dict(out), fresh)


def _whole(data: Path, reference: Path) -> list[dict[str, torch.Tensor]]:
    """Every sample as training collates it (the v1 template, nothing cut), one a batch."""
    tokenizer, template = transformers.AutoTokenizer.from_pretrained(reference), get_template("v1")
    batches = []
    for sample in iter_conversations(data):
        encoded = template.encode(sample, tokenizer, 10**6)
        ids = torch.tensor([encoded.input_ids])
        batches.append({"input_ids": ids, "labels": torch.tensor([encoded.labels]), "attention_mask": ids * 0 + 1})
    return batches


@pytest.mark.parametrize("made_with", ["no --max-length", "--max-length 2048", "a --max-length that cuts"])
def test_a_cache_is_refused_only_for_a_max_length_that_cuts_a_sample_otherwise(setup, tmp_path, made_with):
    data, reference, _ = setup
    if made_with == "no --max-length":  # a tokenizer with no limit of its own: nothing is cut
        reference = write_tiny_reference(
            tmp_path / "ref", write_sentencepiece_llama(tmp_path / "tok", model_max_length=int(1e30))
        )
    batches = _whole(data, reference)
    longest = max(batch["input_ids"].shape[1] for batch in batches)  # each sample tokenized whole, independently
    out = tmp_path / "cache"
    limit = {"no --max-length": None, "--max-length 2048": 2048, "a --max-length that cuts": longest - 1}[made_with]
    args = [a for a in _args(data, reference, out) if a not in ("--max-length", 160)]
    assert regate([str(a) for a in [*args, *([] if limit is None else ["--max-length", limit])]]) == 0
    made = ReferenceLossCache(out).manifest.provenance
    assert (made.max_length, made.longest) == (limit, longest)
    elision = build_token_elision("regate", ReGATEConfig(), reference=out)

    def check(run_max_length: int | None) -> None:
        check_cache_fits(elision, batches[:8], RunFacts(template="v1", max_length=run_max_length))

    if limit is None or limit >= longest:  # before the fix: refused for any other limit
        for run_max_length in (longest, longest + 1, 4096, limit):
            check(run_max_length)  # no sample reaches either limit
        with pytest.raises(CacheMismatchError, match=f"at {longest - 1} tokens .*longest sample \\({longest} rows"):
            check(longest - 1)  # this run would cut the longest sample, the cache did not
    else:
        for run_max_length in (longest, 4096):  # the cache cut the longest sample, this run would not
            with pytest.raises(CacheMismatchError, match=f"made with --max-length {limit}, this run truncates"):
                check(run_max_length)
