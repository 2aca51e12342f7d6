"""LLaVA-NeXT anyres row counts from an image's header, against the re-created merge run on real tiles."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from regate_plugin.data import DataError
from regate_plugin.data.anyres import anyres_layout, read_image_size
from regate_plugin.data.visual import tower_geometry, visual_tokens_from_config

from .llava_next import llava_next_on_path

TILE, PATCH = 32, 4  # a tiny tower: 32-pixel input, 8x8 feature grid
OV_PINPOINTS = [[c * TILE, r * TILE] for c in range(1, 7) for r in range(1, 7)]  # OneVision's (1x1)..(6x6)
NEXT_PINPOINTS = [[2 * TILE, TILE], [TILE, 2 * TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
SIZES = {  # (width, height)
    "portrait": (30, 90),
    "landscape": (100, 40),
    "square": (64, 64),
    "tiny": (5, 3),
    "very wide": (400, 20),
    "odd": (97, 61),
    "tall big": (150, 700),
    "large": (800, 600),
}
CASES = [
    ("anyres", "spatial_unpad", NEXT_PINPOINTS),
    ("anyres", "spatial_unpad", OV_PINPOINTS),
    ("anyres_max_9", "spatial_unpad", OV_PINPOINTS),
    ("anyres_max_4", "spatial_unpad", OV_PINPOINTS),
    ("anyres", "spatial", NEXT_PINPOINTS),
    ("anyres_max_9", "flat", OV_PINPOINTS),
]


@pytest.fixture(scope="module")
def next_llava():
    """The re-creation's `llava.mm_utils` and `llava.model.llava_arch`."""
    with llava_next_on_path():
        from llava import mm_utils
        from llava.model import llava_arch

        yield mm_utils, llava_arch


class _Processor:
    """A tower preprocessor for TILE-pixel inputs: PIL image -> [1, 3, TILE, TILE] floats."""

    size = {"shortest_edge": TILE}
    crop_size = {"height": TILE, "width": TILE}

    def preprocess(self, image, return_tensors="pt"):
        pixels = torch.from_numpy(np.asarray(image.convert("RGB").resize((TILE, TILE)), dtype=np.float32))
        return {"pixel_values": pixels.permute(2, 0, 1)[None] / 255}


def _tiny_model(llava_arch, aspect, merge, pinpoints):
    """The re-created merge on a patch-mean 'tower' (TILE pixels -> (TILE/PATCH)^2 rows of 3 features)."""

    class Tower(torch.nn.Module):
        image_size, num_patches_per_side = TILE, TILE // PATCH

        def forward(self, images):
            return torch.nn.functional.avg_pool2d(images, PATCH).flatten(2).transpose(1, 2)

    inner = SimpleNamespace(
        get_vision_tower=lambda: Tower(),
        mm_projector=torch.nn.Identity(),
        image_newline=torch.zeros(3),
        embed_tokens=lambda ids: torch.zeros(ids.shape[0], 3),
    )
    model = llava_arch.LlavaMetaForCausalLM()
    model.config = SimpleNamespace(image_aspect_ratio=aspect, mm_patch_merge_type=merge, image_grid_pinpoints=pinpoints)
    model.get_model = lambda: inner
    return model


@pytest.mark.parametrize(("aspect", "merge", "pinpoints"), CASES)
def test_counts_from_the_header_equal_the_merged_rows(next_llava, tmp_path, aspect, merge, pinpoints):
    """Images through process_anyres_image and the merge, one per sample; rows = merged length minus the text."""
    mm_utils, llava_arch = next_llava
    config = {
        "mm_vision_tower": f"tiny-patch{PATCH}-{TILE}",
        "image_aspect_ratio": aspect,
        "mm_patch_merge_type": merge,
        "image_grid_pinpoints": pinpoints,
    }
    layout = anyres_layout(config, *tower_geometry(config, "cfg"), "cfg")
    images, sizes, counted = [], [], []
    for name, (w, h) in SIZES.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        with Image.open(path) as image:
            images.append(mm_utils.process_anyres_image(image.convert("RGB"), _Processor(), pinpoints))
        sizes.append(image.size)
        counted.append(layout.rows(read_image_size(path)))
    ids = torch.tensor([[1, -200, 2]] * len(images))
    _, _, mask, _, embeds, _ = _tiny_model(llava_arch, aspect, merge, pinpoints).prepare_inputs_labels_for_multimodal(
        ids,
        None,
        torch.ones_like(ids, dtype=torch.bool),
        None,
        ids.clamp(min=-100),
        images,
        ["image"] * len(images),
        sizes,
    )
    merged = (mask.sum(1) - 2).tolist()
    assert dict(zip(SIZES, counted)) == dict(zip(SIZES, merged))
    assert len(set(merged)) > 1  # the sizes really give different counts


@pytest.mark.parametrize("merge", ["spatial", "spatial_unpad"])
def test_single_crop_count_equals_the_merged_rows(next_llava, merge):
    """image_aspect_ratio pad: one crop per image, so one count (grid^2, plus a newline row under unpad) fits all."""
    _, llava_arch = next_llava
    config = {"mm_vision_tower": f"tiny-patch{PATCH}-{TILE}", "mm_projector_type": "mlp2x_gelu"}
    config |= {"image_aspect_ratio": "pad", "mm_patch_merge_type": merge}
    ids = torch.tensor([[1, -200, 2]] * 2)
    images = [torch.rand(3, TILE, TILE), torch.rand(3, TILE, TILE)]
    _, _, mask, _, _, _ = _tiny_model(llava_arch, "pad", merge, None).prepare_inputs_labels_for_multimodal(
        ids, None, torch.ones_like(ids, dtype=torch.bool), None, ids.clamp(min=-100), images, ["image"] * 2, None
    )
    assert (mask.sum(1) - 2).tolist() == [visual_tokens_from_config(config)] * 2


def test_resize_and_pad_rounds_as_upstream(next_llava):
    """Upstream scales by `side * (target / side)`: 800 * (672 / 600) is 896.0000000000001, so an 800x600 image on a
    1008x672 canvas is 897 pixels wide (ceil), pasted at x = (1008 - 897) // 2; dividing last would give 896 at 56."""
    mm_utils, _ = next_llava
    canvas = np.asarray(mm_utils.resize_and_pad_image(Image.new("RGB", (800, 600), (255, 255, 255)), (1008, 672)))
    filled = np.flatnonzero(canvas[336, :, 0])
    assert (filled[0], len(filled)) == (55, 897)


def test_header_read_and_bad_input(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (321, 123)).save(path)
    assert read_image_size(path) == (321, 123)
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="b.jpg"):
        read_image_size(tmp_path / "b.jpg")
    base = {"mm_vision_tower": "x-patch4-32", "image_aspect_ratio": "anyres", "image_grid_pinpoints": OV_PINPOINTS}
    with pytest.raises(DataError, match="maxpool2x2"):
        anyres_layout({**base, "mm_patch_merge_type": "spatial_unpad_maxpool2x2"}, 32, 4, "cfg")
    with pytest.raises(DataError, match="image_grid_pinpoints"):
        anyres_layout({**base, "image_grid_pinpoints": None}, 32, 4, "cfg")
    with pytest.raises(DataError, match="tower side"):
        anyres_layout({**base, "image_grid_pinpoints": "(1x1),...,(6x6)"}, 32, 4, "cfg")
