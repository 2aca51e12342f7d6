import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from regate_plugin.core import ReGATEConfig, batch_sample_keys, sample_key, shift_targets, tokenizer_fingerprint
from regate_plugin.core.compaction import IGNORE_INDEX
from regate_plugin.store import (
    CacheError,
    CorruptShardError,
    InMemoryReferenceStore,
    MissingReferenceError,
    ReferenceLossCache,
    ReferenceLossCacheWriter,
    ReferenceStore,
    TokenizerMismatchError,
)
from regate_plugin.strategies import build_token_elision


def test_sample_key_is_stable_across_processes():
    ids, mask = [1, 5, 9, 300, 2], [False, False, True, True, True]
    here = sample_key(ids, mask).hex()
    code = f"from regate_plugin.core import sample_key; print(sample_key({ids}, {mask}).hex())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there and len(here) == 32


def test_sample_key_ignores_padding_but_not_content_or_labels():
    ids = torch.tensor([[1, 5, 9, 2, 0, 0], [0, 0, 1, 5, 9, 2]])
    labels = torch.tensor([[-100, -100, 9, 2, -100, -100], [-100, -100, -100, -100, 9, 2]])
    mask = (torch.arange(6) < 4).long().unsqueeze(0).repeat(2, 1)
    mask[1] = torch.tensor([0, 0, 1, 1, 1, 1])
    right, left = batch_sample_keys(ids, labels, mask)
    assert right == left == sample_key([1, 5, 9, 2], [False, False, True, True])
    assert sample_key([1, 5, 9, 2], [False, True, True, True]) != right
    assert sample_key([1, 5, 8, 2], [False, False, True, True]) != right


def _tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>")


def test_tokenizer_fingerprint_tracks_the_vocabulary():
    a = _tokenizer({"<unk>": 0, "a": 1, "b": 2})
    same = _tokenizer({"<unk>": 0, "a": 1, "b": 2})
    swapped = _tokenizer({"<unk>": 0, "a": 2, "b": 1})
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(same) != tokenizer_fingerprint(swapped)


def _write(directory, samples, **kw):
    args = dict(reference="t", tokenizer_fingerprint="fp", reference_mode="gap", dtype="float32", shard_samples=2)
    args.update(kw)
    with ReferenceLossCacheWriter(directory, **args) as writer:
        for key, losses in samples.items():
            writer.add(key, losses)
    return directory


def _samples(n=5):
    gen = torch.Generator().manual_seed(0)
    return {sample_key([i, i + 1, i + 2], [False, True, True]): torch.rand(i % 4, generator=gen) for i in range(n)}


def test_round_trip_across_shards(tmp_path):
    samples = _samples()
    _write(tmp_path, samples)
    cache = ReferenceLossCache(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["samples"] == 5 and manifest["empty_samples"] == 2
    assert manifest["tokens"] == sum(v.numel() for v in samples.values())
    assert len(cache) == 5
    for key, losses in samples.items():
        assert torch.equal(cache[key], losses)
    assert not list(tmp_path.glob("*.tmp")) and cache.verify() == []


def test_float16_storage_is_close(tmp_path):
    samples = {k: v * 10 for k, v in _samples().items()}
    _write(tmp_path, samples, dtype="float16")
    cache = ReferenceLossCache(tmp_path)
    for key, losses in samples.items():
        torch.testing.assert_close(cache[key], losses, atol=1e-2, rtol=1e-3)


def test_a_flipped_byte_is_detected_and_named(tmp_path):
    _write(tmp_path, _samples())
    shard = sorted(tmp_path.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=shard.name):
        ReferenceLossCache(tmp_path)
    assert any(shard.name in problem for problem in ReferenceLossCache(tmp_path, verify=False).verify())


def test_fingerprint_mismatch_is_refused(tmp_path):
    _write(tmp_path, _samples())
    cache = ReferenceLossCache(tmp_path)
    cache.check_tokenizer("fp")
    with pytest.raises(TokenizerMismatchError, match="fp.*other"):
        cache.check_tokenizer("other")
    tok = _tokenizer({"<unk>": 0, "a": 1})
    with pytest.raises(TokenizerMismatchError, match=tokenizer_fingerprint(tok)):
        build_token_elision("regate", ReGATEConfig(), reference=tmp_path, tokenizer=tok)


def test_writer_resumes_and_refuses_a_different_reference(tmp_path):
    samples = _samples()
    items = list(samples.items())
    _write(tmp_path, dict(items[:3]))
    _write(tmp_path, dict(items))  # resume: the first three are already there
    cache = ReferenceLossCache(tmp_path)
    assert len(cache) == 5 and cache.manifest.samples == 5
    with pytest.raises(CacheError, match="reference"):
        _write(tmp_path, {}, reference="other")
    _write(tmp_path, {}, reference="other", overwrite=True)
    assert len(ReferenceLossCache(tmp_path)) == 0


def _batch_with_unknown_sample():
    input_ids = torch.tensor([[1, 7, 8, 9, 10, 2]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10, 2]])
    return input_ids, labels, torch.ones_like(input_ids)


def test_missing_key_errors_by_default_and_names_the_sample(tmp_path):
    _write(tmp_path, _samples())
    input_ids, labels, mask = _batch_with_unknown_sample()
    key = batch_sample_keys(input_ids, labels, mask)
    elision = build_token_elision("regate", ReGATEConfig(warmup_steps=0, dense_steps=0), reference=tmp_path)
    with pytest.raises(MissingReferenceError, match=key[0].hex()):
        elision.plan(labels, mask, key)


def test_missing_key_falls_back_to_the_ema_with_a_counted_warning(tmp_path):
    _write(tmp_path, _samples())
    input_ids, labels, mask = _batch_with_unknown_sample()
    key = batch_sample_keys(input_ids, labels, mask)
    cfg = ReGATEConfig(warmup_steps=0, dense_steps=0, missing_reference="ema")
    elision = build_token_elision("regate", cfg, reference=tmp_path)
    with pytest.warns(UserWarning, match="EMA alone"):
        plan = elision.plan(labels, mask, key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        elision.plan(labels, mask, key)  # counted, not warned again
    assert elision.stats.missing_reference == 2
    assert int((plan.kept_mask & plan.candidates).sum()) == 2  # ceil(0.5 * 3 candidates)


def test_cache_with_too_few_losses_for_a_sample_is_refused(tmp_path):
    input_ids, labels, mask = _batch_with_unknown_sample()
    key = batch_sample_keys(input_ids, labels, mask)
    _write(tmp_path, {key[0]: torch.ones(2)})  # the sample has 4 targets
    elision = build_token_elision("regate", ReGATEConfig(warmup_steps=0, dense_steps=0), reference=tmp_path)
    with pytest.raises(CacheError, match="4 answer targets"):
        elision.plan(labels, mask, key)


def test_not_a_cache_directory(tmp_path):
    with pytest.raises(CacheError, match="manifest.json is missing"):
        ReferenceLossCache(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(CacheError, match="not a valid cache manifest"):
        ReferenceLossCache(tmp_path)


@pytest.mark.parametrize("version", [2, 4])
def test_a_cache_of_another_format_version_is_refused_naming_both_versions(tmp_path, version):
    _write(tmp_path, _samples(), visual_tokens=16)
    manifest = tmp_path / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["version"] = version
    manifest.write_text(json.dumps(raw))
    with pytest.raises(CacheError, match=f"has cache format version {version}, this plugin reads version 3: re-run"):
        ReferenceLossCache(tmp_path)


def test_per_sample_visual_rows_round_trip_and_are_required(tmp_path):
    samples = _samples()
    layout = {"resolutions": [[64, 32]], "tile": 32, "grid": 8, "merge": "spatial_unpad", "max_tiles": None}
    with ReferenceLossCacheWriter(
        tmp_path, reference="t", tokenizer_fingerprint="fp", reference_mode="gap", visual_layout=layout, shard_samples=2
    ) as writer:
        for n, (key, losses) in enumerate(samples.items()):
            writer.add(key, losses, visual_rows=100 + n)
        with pytest.raises(CacheError, match="visual rows"):
            writer.add(sample_key([9, 9], [False, True]), torch.ones(1))
    cache = ReferenceLossCache(tmp_path)
    rows = cache.locate([*samples, sample_key([7], [True])])
    assert cache.expected_visual_rows(rows, np.zeros(len(rows), np.int64)).tolist() == [100, 101, 102, 103, 104, -1]


@pytest.mark.parametrize("n", [1, 3, 200])
def test_lookups_equal_a_dict_of_the_keys_with_colliding_first_halves(tmp_path, n):
    """`get`, `in` and `locate` against a plain dict; a third of the keys share their first 8 bytes with another."""
    rng = np.random.default_rng(n)
    raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    raw[2::3, :8] = raw[1::3, :8][: raw[2::3].shape[0]]
    samples = {row.tobytes(): torch.rand(int(rng.integers(0, 4))) for row in raw}
    _write(tmp_path, samples)
    cache = ReferenceLossCache(tmp_path)
    absent = [k[:8] + bytes(8) for k in samples] + [
        rng.integers(0, 256, 16, dtype=np.uint8).tobytes() for _ in range(50)
    ]
    absent = [k for k in absent if k not in samples]
    for key, losses in samples.items():
        assert key in cache and torch.equal(cache.get(key), losses)
    assert all(cache.get(key) is None and key not in cache for key in absent)
    rows = cache.locate([*samples, *absent])
    assert (rows[: len(samples)] >= 0).all() and (rows[len(samples) :] == -1).all()
    assert sorted(cache.keys()) == sorted(samples)


def test_the_same_samples_give_the_same_shard_bytes_in_every_process(tmp_path):
    """A shard's sha256 (and so the layout digest a saved EMA is checked against) depends on its content alone."""
    script = (
        "import sys, torch; from regate_plugin.store import ReferenceLossCacheWriter\n"
        "w = ReferenceLossCacheWriter(sys.argv[1], reference='r', tokenizer_fingerprint='f', reference_mode='gap')\n"
        "w.add(bytes(range(16)), torch.arange(3.0)); w.close()\n"
    )
    for n in range(6):  # several metadata keys would come out in one order of two with each process's hash seed
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(n))], check=True, timeout=120)
    digests = {(tmp_path / str(n) / "shard-00000.safetensors").read_bytes() for n in range(6)}
    assert len(digests) == 1


@pytest.mark.parametrize("visual", ["per placeholder", "per sample"])
def test_the_in_memory_store_answers_as_the_on_disk_cache_of_the_same_losses(tmp_path, visual):
    """Every `ReferenceStore` name, against the on-disk cache the writer makes of the same samples (seven shards)."""
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (40, 16), dtype=np.uint8)
    raw[1::4, :8] = raw[::4, :8]  # first-half collisions
    samples = {row.tobytes(): torch.rand(int(rng.integers(0, 9)), dtype=torch.float32) for row in raw}
    rows_of = {key: int(rng.integers(0, 30)) for key in samples} if visual == "per sample" else None
    layout = {"per_sample": True} if rows_of else None
    writer = ReferenceLossCacheWriter(
        tmp_path, reference="ref", tokenizer_fingerprint="fp", reference_mode="gap", dtype="float32",
        visual_tokens=None if rows_of else 7, visual_layout=layout, shard_samples=6,
    )  # fmt: skip
    for key, losses in samples.items():
        writer.add(key, losses, rows_of[key] if rows_of else None)
    disk = writer.close()
    memory = InMemoryReferenceStore.from_losses(
        samples, tokenizer_fingerprint="fp", reference="ref", visual_tokens=None if rows_of else 7, visual_rows=rows_of
    )
    assert len(disk.manifest.shards) == 7 and isinstance(disk, ReferenceStore) and isinstance(memory, ReferenceStore)
    absent = [bytes(16), raw[0, :8].tobytes() + bytes(8)]
    batch = [*list(samples)[::3], *absent, *list(samples)[1::5]]
    assert len(memory) == len(disk) == len(samples) and memory.tokens == disk.tokens
    assert list(memory.keys()) == list(disk.keys())
    assert all((key in memory) == (key in disk) for key in [*samples, *absent])
    rows = memory.locate(batch)
    assert np.array_equal(rows, disk.locate(batch)) and [r for r, k in zip(rows, batch) if k in absent] == [-1, -1]
    for got, want in zip(memory.spans(rows), disk.spans(rows)):
        assert np.array_equal(got, want)
    for width in (0, 1, 5, 12):
        assert np.array_equal(memory.losses_block(rows, width), disk.losses_block(rows, width), equal_nan=True)
    placeholders = np.arange(len(batch)) % 3
    assert np.array_equal(
        memory.expected_visual_rows(rows, placeholders), disk.expected_visual_rows(rows, placeholders)
    )
    for key in batch:
        got, want = memory.get(key), disk.get(key)
        assert (got is None and want is None) or torch.equal(got, want)
    assert torch.equal(memory[batch[0]], samples[batch[0]])
    with pytest.raises(MissingReferenceError, match="in-memory reference store"):
        memory[absent[0]]
    memory.check_tokenizer("fp")
    with pytest.raises(TokenizerMismatchError):
        memory.check_tokenizer("other")
    assert memory.directory is None and memory.manifest.samples == len(samples)
    again = InMemoryReferenceStore.from_losses(samples, tokenizer_fingerprint="fp", visual_rows=rows_of)
    assert again.layout_digest == memory.layout_digest != disk.layout_digest


def test_an_in_memory_store_refuses_what_the_writer_refuses():
    with pytest.raises(CacheError, match="16 bytes"):
        InMemoryReferenceStore.from_losses({b"short": torch.ones(2)}, tokenizer_fingerprint="fp")
    with pytest.raises(CacheError, match="non-finite"):
        InMemoryReferenceStore.from_losses({bytes(16): torch.tensor([1.0, float("nan")])}, tokenizer_fingerprint="fp")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_batch_reads_across_many_shards_equal_the_written_losses(tmp_path, dtype):
    """Shards mapped side by side, empty ones among them: each batch row equals what was written, in that dtype."""
    gen = torch.Generator().manual_seed(3)
    samples = {bytes([i, 7]) * 8: torch.rand(i % 9, generator=gen) * 5 for i in range(60)}
    _write(tmp_path, samples, dtype=dtype, shard_samples=1)  # 60 shards, seven of them empty
    cache = ReferenceLossCache(tmp_path)
    assert len(cache.manifest.shards) == 60
    keys = [*samples][::-1] + [bytes(16)]
    rows = cache.locate(keys)
    block = cache.losses_block(rows, 6)
    for b, key in enumerate(keys):
        want = samples.get(key, torch.zeros(0)).to(getattr(torch, dtype)).float()
        assert torch.equal(torch.from_numpy(block[b, : min(want.numel(), 6)]), want[:6])
        assert np.isnan(block[b, want.numel() :]).all()
        assert key not in samples or torch.equal(cache[key], want)
    assert torch.equal(cache.all_losses(), torch.cat([v.to(getattr(torch, dtype)).float() for v in samples.values()]))


@pytest.mark.parametrize("strategy", ["regate", "rho"])
def test_a_strategy_plans_the_same_from_an_in_memory_store_as_from_the_cache(tmp_path, strategy):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 90, (6, 20), generator=gen)
    labels = torch.where(torch.rand(6, 20, generator=gen) < 0.6, ids, IGNORE_INDEX)
    mask = (torch.arange(20) < torch.tensor([[20], [17], [20], [9], [14], [20]])).long()
    keys = batch_sample_keys(ids, labels, mask)
    targets = (shift_targets(labels, mask) != IGNORE_INDEX).sum(1).tolist()
    losses = {key: torch.rand(n, generator=gen) * 4 for key, n in zip(keys, targets)}
    _write(tmp_path, losses)
    memory = InMemoryReferenceStore.from_losses(losses, tokenizer_fingerprint="fp")
    cfg = ReGATEConfig(warmup_steps=0, dense_steps=0, keep_ratio=0.4)
    plans = [build_token_elision(strategy, cfg, reference=ref).plan(labels, mask, keys) for ref in (tmp_path, memory)]
    assert (plans[0].kept_mask & plans[0].candidates).sum() < plans[0].candidates.sum(), "a sparse step"
    assert torch.equal(plans[0].kept_mask, plans[1].kept_mask)
