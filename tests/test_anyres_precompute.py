"""LLaVA-NeXT anyres end to end: `regate precompute --student-config` scores each sample at the positions its own
images give it (rows counted by the re-created merge on real tiles), records each sample's rows, and the adapters'
check refuses a merged batch whose rows differ from those a sample was scored with, naming the sample."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from regate_plugin.adapters.upstream import MergedBatch, visual_rows
from regate_plugin.cli import main as regate
from regate_plugin.core.keys import format_key
from regate_plugin.store import CacheError, ReferenceLossCache
from regate_plugin.strategies import ReGATEElision

from .llava_data import conversation_samples, write_json, write_tiny_reference
from .llava_next import llava_next_on_path
from .test_anyres_rows import OV_PINPOINTS, PATCH, SIZES, TILE, _Processor, _tiny_model
from .test_precompute import MAX_LEN, _brute_force, _cache_dict, encoded_samples
from .tokenizers_fixture import write_sentencepiece_llama

ASPECT, MERGE = "anyres_max_9", "spatial_unpad"
STUDENT = {
    "mm_vision_tower": f"tiny-patch{PATCH}-{TILE}",
    "mm_projector_type": "mlp2x_gelu",
    "image_aspect_ratio": ASPECT,
    "mm_patch_merge_type": MERGE,
    "image_grid_pinpoints": OV_PINPOINTS,
}


def _merged_rows(paths) -> list[int]:
    """Each image through the re-created `process_anyres_image` and merge: its rows in the merged sequence."""
    with llava_next_on_path():
        from llava import mm_utils
        from llava.model import llava_arch

        images, sizes = [], []
        for path in paths:
            with Image.open(path) as image:
                images.append(mm_utils.process_anyres_image(image.convert("RGB"), _Processor(), OV_PINPOINTS))
                sizes.append(image.size)
        ids = torch.tensor([[1, -200, 2]] * len(images))
        merge = _tiny_model(llava_arch, ASPECT, MERGE, OV_PINPOINTS).prepare_inputs_labels_for_multimodal
        mask = torch.ones_like(ids, dtype=torch.bool)
        _, _, mask, _, _, _ = merge(ids, None, mask, None, ids.clamp(min=-100), images, ["image"] * len(ids), sizes)
    return (mask.sum(1) - 2).tolist()


@pytest.fixture(scope="module")
def anyres_setup(tmp_path_factory):
    """Tiny reference, an anyres student config, and 20 samples whose images have 8 different sizes."""
    root = tmp_path_factory.mktemp("anyres")
    reference = write_tiny_reference(root / "reference", write_sentencepiece_llama(root / "tok"))
    (root / "student").mkdir()
    (root / "student" / "config.json").write_text(json.dumps(STUDENT))
    (root / "images").mkdir()
    samples = conversation_samples(20, seed=11)
    files = [s["image"] for s in samples if "image" in s]
    for n, name in enumerate(files):
        w, h = list(SIZES.values())[n % len(SIZES)]
        Image.fromarray(np.random.default_rng(n).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / name
        )
    rows = dict(zip(files, _merged_rows([root / "images" / name for name in files])))
    return root, reference, write_json(root / "train.json", samples), rows


def _precompute(setup, out, *extra) -> int:
    root, reference, data, _ = setup
    argv = ["precompute", "--no-progress", "--dtype", "float32", "--data", str(data), "--reference", str(reference)]
    return regate([*argv, "--template", "v1", "--out", str(out), "--max-length", str(MAX_LEN), *map(str, extra)])


@pytest.fixture(scope="module")
def anyres_cache(anyres_setup, tmp_path_factory):
    root = anyres_setup[0]
    out = tmp_path_factory.mktemp("anyres_cache") / "cache"
    assert _precompute(anyres_setup, out, "--student-config", root / "student", "--image-folder", root / "images") == 0
    return out


def test_each_sample_is_scored_at_its_own_positions(anyres_setup, anyres_cache):
    _, reference, data, rows = anyres_setup
    assert len(set(rows.values())) > 3  # the sizes really give different counts
    image_rows = lambda sample: [rows[name] for name in sample.visual_files]  # noqa: E731
    want = _brute_force(reference, data, "gap", image_rows=image_rows)
    got = _cache_dict(anyres_cache)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-5)
    cache = ReferenceLossCache(anyres_cache)
    by_key = {key: sum(image_rows(sample)) for sample, key, _, _ in encoded_samples(reference, data)}
    keys = list(by_key)
    recorded = cache.expected_visual_rows(cache.locate(keys), np.zeros(len(keys), np.int64))
    assert recorded.tolist() == list(by_key.values())
    assert regate(["cache", "verify", str(anyres_cache)]) == 0


def test_missing_images_are_found_before_anything_is_written(anyres_setup, tmp_path, capsys):
    student = anyres_setup[0] / "student"
    assert _precompute(anyres_setup, tmp_path / "a", "--student-config", student, "--image-folder", tmp_path) != 0
    assert "0000.jpg does not exist" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert _precompute(anyres_setup, tmp_path / "b", "--visual-tokens", 16, "--image-folder", tmp_path) != 0
    assert "0000.jpg does not exist" in capsys.readouterr().err and not (tmp_path / "b").exists()


def _batch(anyres_setup, merged_rows):
    """Two image samples as the adapter sees them: pre-merge ids (one placeholder each) and the merged batch."""
    _, reference, data, _ = anyres_setup
    picked = [(key, ids) for sample, key, ids, _ in encoded_samples(reference, data) if sample.visual_files][:2]
    width = max(len(ids) for _, ids in picked) + max(merged_rows)
    input_ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    merged_mask = torch.zeros(2, width, dtype=torch.bool)
    for row, ((_, ids), rows) in enumerate(zip(picked, merged_rows)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = True
        merged_mask[row, : len(ids) - 1 + rows] = True
    merged = MergedBatch(torch.zeros(2, width, 4), merged_mask, None, torch.zeros(2, width, dtype=torch.long))
    return [key for key, _ in picked], visual_rows(input_ids, mask, merged, None)


def test_rows_other_than_scored_fail_naming_the_sample(anyres_setup, anyres_cache):
    _, reference, data, rows = anyres_setup
    elision = ReGATEElision(reference=anyres_cache)
    firsts = [s for s, *_ in encoded_samples(reference, data) if s.visual_files][:2]
    scored = [rows[s.visual_files[0]] for s in firsts]
    keys, counts = _batch(anyres_setup, scored)
    elision.check_visual_rows(keys, *counts)  # what the cache was scored with: passes
    keys, counts = _batch(anyres_setup, [scored[0], scored[1] + 1])
    with pytest.raises(CacheError, match=format_key(keys[1])):
        elision.check_visual_rows(keys, *counts)


def test_a_sample_with_several_images_counts_one_padded_crop_each(anyres_setup, tmp_path):
    """LLaVA-NeXT's dataset pads every image of a multi-image sample to one crop (`process_image(f, "pad")`); the
    re-created merge of such crops gives the rows precompute counts for them."""
    from regate_plugin.data import parse_sample
    from regate_plugin.data.visual import visual_rows_from_path
    from regate_plugin.reference.precompute import PrecomputeConfig, placeholder_rows

    root = anyres_setup[0]
    raw = {"image": ["0000.jpg", "0001.jpg"], "conversations": [{"from": "human", "value": "<image>\n<image>\nSame?"}]}
    cfg = PrecomputeConfig(
        data=[], reference="r", template="qwen_1_5", out=tmp_path, anyres=visual_rows_from_path(root / "student"),
        image_folder=root / "images",
    )  # fmt: skip
    counted = placeholder_rows(cfg, parse_sample(raw, 0, "mem"))
    with llava_next_on_path():
        from llava.model import llava_arch

        crops = [torch.rand(3, TILE, TILE) for _ in raw["image"]]  # what the pad path hands the model: one crop each
        ids = torch.tensor([[1, -200, -200, 2]])
        merge = _tiny_model(llava_arch, ASPECT, MERGE, OV_PINPOINTS).prepare_inputs_labels_for_multimodal
        mask = torch.ones_like(ids, dtype=torch.bool)
        _, _, mask, _, _, _ = merge(ids, None, mask, None, ids.clamp(min=-100), crops, ["image"] * 2, [(32, 32)] * 2)
    assert sum(counted) == int(mask.sum()) - 2 and len(counted) == 2
