"""Bad training data and numeric edge cases on the data side (docs/RELIABILITY.md): strict JSON, non-UTF-8 bytes,
oversized images, empty videos, a float16 EMA fed a huge loss."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from regate_plugin.cli import main as regate
from regate_plugin.core import DifficultyEMA
from regate_plugin.data import DataError, iter_conversations


def test_a_float16_ema_saturates_at_its_largest_value_instead_of_holding_inf():
    """One loss above float16's range: the entry holds 65504, and later observations pull it back down as the
    EMA of the saturated value would (float32 reference: the same sequence with the huge loss replaced by 65504)."""
    big = 1e6
    half, reference = DifficultyEMA(beta=0.5, slots=2, vocab_size=3, dtype="float16"), DifficultyEMA(0.5, 2, 3)
    slots, ids = torch.tensor([0]), torch.tensor([1])
    half.update(slots, ids, torch.tensor([big]))
    reference.update(slots, ids, torch.tensor([65504.0]))
    assert half.values[0].item() == 65504.0 and torch.isfinite(half.values[:-1].nan_to_num(0)).all()
    for loss in (2.0, 3.0, 1.0):
        half.update(slots, ids, torch.tensor([loss]))
        reference.update(slots, ids, torch.tensor([loss]))
    assert torch.isfinite(half.values[0])
    torch.testing.assert_close(half.values[0].float(), reference.values[0], rtol=1e-3, atol=0)
    assert torch.isfinite(half.per_token[1])  # the per-token table is float32: the huge loss is kept as it is


SAMPLE = {"id": "s0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


def _sample(n: int) -> dict:
    return {**SAMPLE, "id": f"s{n}"}


@pytest.mark.parametrize(
    "text",
    [
        json.dumps([_sample(0), _sample(1)]) + "\n" + json.dumps([_sample(2)]),  # two lists one after another
        json.dumps([_sample(0)], indent=1) + "\n  junk\n",  # junk after the closing bracket
        json.dumps([_sample(0)]) + "]",
        "[" + json.dumps(_sample(0)) + "\n " + json.dumps(_sample(1)) + "]",  # a missing comma
        "[" + json.dumps(_sample(0)) + ",," + json.dumps(_sample(1)) + "]",  # a doubled comma
        "[" + json.dumps(_sample(0)) + ",\n]",  # a trailing comma
        "[,\n" + json.dumps(_sample(0)) + "]",
    ],
    ids=["two-lists", "junk", "bracket", "missing-comma", "double-comma", "trailing-comma", "leading-comma"],
)
def test_train_json_is_read_as_strictly_as_json_load(tmp_path, text):
    """Every file upstream's `json.load` refuses is refused, naming the file and the line and column json names."""
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as upstream:
        json.loads(text)
    with pytest.raises(DataError) as ours:
        list(iter_conversations(path))
    message = str(ours.value)
    assert "\n" not in message and str(path) in message
    assert message.startswith(f"{path}:{upstream.value.lineno}:")
    if "sample" not in message.split(": ")[1]:  # a break between samples: the column too
        assert message.startswith(f"{path}:{upstream.value.lineno}:{upstream.value.colno}: ")


def test_a_well_formed_train_json_reads_as_json_load_reads_it(tmp_path):
    samples = [_sample(n) for n in range(3)]
    for text in (json.dumps(samples), json.dumps(samples, indent=2) + "\n\n", " [ ]\n", "[\n]"):
        path = tmp_path / "train.json"
        path.write_text(text)
        assert [c.sample_id for c in iter_conversations(path)] == [s["id"] for s in json.loads(text)]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_non_utf8_bytes_in_training_data_are_named_by_file_and_byte_offset(tmp_path, suffix):
    turns = [{"from": "human", "value": "caf\u00e9"}, SAMPLE["conversations"][1]]
    samples = [_sample(0), {**_sample(1), "conversations": turns}]
    text = (
        json.dumps(samples, indent=1, ensure_ascii=False)
        if suffix == ".json"
        else "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    )
    data = text.encode("utf-8").replace("caf\u00e9".encode(), "caf\u00e9".encode("latin-1"))  # a latin-1 é
    assert data != text.encode("utf-8")
    path = tmp_path / f"train{suffix}"
    path.write_bytes(data)
    offset = data.index(b"caf") + 3
    with pytest.raises(UnicodeDecodeError):
        json.loads(data)  # upstream's json.load fails on it too
    with pytest.raises(DataError) as err:
        list(iter_conversations(path))
    message = str(err.value)
    line = data.count(b"\n", 0, offset) + 1
    assert "\n" not in message and message.startswith(f"{path}:{line}: not UTF-8")
    assert f"byte offset {offset}" in message


def write_bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims side x side pixels (10^10 for the default): PIL refuses it on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" + b"\0" * 3)  # one row of one pixel: far too little, never read
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_an_image_header_claiming_10_billion_pixels_is_named(tmp_path):
    from PIL import Image

    from regate_plugin.data.anyres import read_image_size

    bomb = write_bomb_png(tmp_path / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)  # what upstream's loader meets
    with pytest.raises(DataError) as err:
        read_image_size(bomb)
    assert str(err.value).startswith(f"{bomb}: ") and "\n" not in str(err.value)
    assert read_image_size(write_bomb_png(tmp_path / "fine.png", 64)) == (64, 64)


@pytest.fixture(scope="module")
def anyres_bomb_setup(tmp_path_factory):
    """A tiny reference, an anyres student config, and 6 samples; the image of the first is a bomb."""
    from PIL import Image

    from .llava_data import conversation_samples, write_tiny_reference
    from .test_anyres_precompute import STUDENT
    from .tokenizers_fixture import write_sentencepiece_llama

    root = tmp_path_factory.mktemp("bomb")
    reference = write_tiny_reference(root / "reference", write_sentencepiece_llama(root / "tok"))
    (root / "student").mkdir()
    (root / "student" / "config.json").write_text(json.dumps(STUDENT))
    samples = [s for s in conversation_samples(8, seed=3) if "image" in s][:6]
    for n, sample in enumerate(samples):
        if n == 0:
            write_bomb_png(root / "images" / sample["image"])
        else:
            Image.new("RGB", (40 + 8 * n, 30), (n, 2 * n, 3 * n)).save(root / "images" / sample["image"], "PNG")
    return root, reference, samples


def _precompute(setup, out: Path, data: Path, *extra: str) -> int:
    root, reference, _ = setup
    return regate(
        [
            "precompute",
            "--no-progress",
            "--dtype",
            "float32",
            "--data",
            str(data),
            "--reference",
            str(reference),
            "--template",
            "v1",
            "--out",
            str(out),
            "--max-length",
            "160",
            "--student-config",
            str(root / "student"),
            "--image-folder",
            str(root / "images"),
            *extra,
        ]
    )


def test_precompute_names_an_image_bomb_and_skips_it_with_skip_bad(anyres_bomb_setup, tmp_path, capsys):
    """A DecompressionBombError traceback with or without --skip-bad; now one line naming the file, and with
    --skip-bad the sample is skipped: the cache equals one made without it."""
    from regate_plugin.store import ReferenceLossCache

    from .llava_data import write_json

    root, _, samples = anyres_bomb_setup
    bomb = root / "images" / samples[0]["image"]
    data = write_json(tmp_path / "train.json", samples)
    assert _precompute(anyres_bomb_setup, tmp_path / "a", data) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the reference's loading progress bar
    assert err.startswith("regate precompute: error: ") and f"{bomb}: " in err and "decompression bomb" in err

    assert _precompute(anyres_bomb_setup, tmp_path / "b", data, "--skip-bad") == 0
    skipped_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped: ")]
    assert len(skipped_lines) == 1 and f"{bomb}: " in skipped_lines[0]
    without = write_json(tmp_path / "without.json", samples[1:])
    assert _precompute(anyres_bomb_setup, tmp_path / "c", without) == 0
    skipped, reference = ReferenceLossCache(tmp_path / "b"), ReferenceLossCache(tmp_path / "c")
    assert sorted(skipped.keys()) == sorted(reference.keys()) and len(list(reference.keys())) == 5
    for key in reference.keys():
        torch.testing.assert_close(skipped[key], reference[key])
