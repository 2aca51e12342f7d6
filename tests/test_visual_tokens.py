"""Visual rows per placeholder from a student config, against the conv/patch arithmetic done by hand."""

import json
import subprocess

import pytest

from regate_plugin.data import DataError
from regate_plugin.data.anyres import AnyresLayout
from regate_plugin.data.visual import visual_rows_from_config, visual_rows_from_path, visual_tokens_from_config

from .tiny import IMAGE_ROWS, tiny_llava


def test_upstream_configs():
    llava15 = {
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_feature": "patch",
    }
    assert visual_tokens_from_config(llava15) == 24 * 24
    assert visual_tokens_from_config({**llava15, "mm_vision_select_feature": "cls_patch"}) == 24 * 24 + 1
    clip = {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "num_frames": 8}
    # Conv3d kernel 2 stride 2: padding 1 gives (8+2-2)/2+1 = 5 frames and (24+2-2)/2+1 = 13 per side.
    assert visual_tokens_from_config({**clip, "mm_projector_type": "stc_connector"}) == 5 * 13 * 13
    assert visual_tokens_from_config({**clip, "mm_projector_type": "stc_connector_v35"}) == 4 * 12 * 12
    siglip = {
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "num_frames": 16,
        "mm_projector_type": "stc_connector_v35",
    }
    assert visual_tokens_from_config(siglip) == 8 * 13 * 13
    with pytest.raises(DataError, match="projector 'spatial_conv'.*--visual-tokens"):
        visual_tokens_from_config({**clip, "mm_projector_type": "spatial_conv"})
    with pytest.raises(DataError, match="patch grid"):
        visual_tokens_from_config({"mm_vision_tower": "my/tower"})


def test_hf_native_config_matches_the_model(tmp_path):
    model = tiny_llava()
    model.config.save_pretrained(tmp_path)
    assert visual_rows_from_path(tmp_path) == IMAGE_ROWS
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    with pytest.raises(DataError, match="bad/config.json"):
        visual_rows_from_path(tmp_path / "bad")
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["patch_size"] == 14


CONNECTOR_ROWS = """
import json, sys, torch
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
from videollama2.model.videollama2_arch import CONNECTORS
rows = {}
for name, connector in CONNECTORS.items():
    for frames, grid in ((8, 24), (4, 6), (5, 7), (16, 27)):
        torch.manual_seed(0)
        module = connector(SimpleNamespace(mm_hidden_size=4, hidden_size=8))
        rows[f"{name}/{frames}/{grid}"] = module(torch.randn(1, frames, grid * grid, 4)).shape[1]
print(json.dumps(rows))
"""


def test_videollama2_connector_counts_equal_the_connectors_outputs():
    """STC, STC-v35 and STP connectors of the re-creation (upstream's samplers) on several frame counts and grids."""
    from .test_templates import REPO, VIDEOLLAMA2_PYTHON

    recreation = REPO / "tests" / "videollama2_recreation"
    done = subprocess.run(
        [str(VIDEOLLAMA2_PYTHON), "-c", CONNECTOR_ROWS, str(recreation)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for case, rows in json.loads(done.stdout.strip().splitlines()[-1]).items():
        name, frames, grid = case.split("/")
        config = {"mm_projector_type": name, "num_frames": int(frames), "mm_vision_tower": f"x-patch1-{grid}"}
        assert visual_tokens_from_config(config) == rows, case


@pytest.mark.parametrize(
    "fields",
    [
        {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"},
        {"image_aspect_ratio": "anyres_max_9", "mm_patch_merge_type": "spatial_unpad"},
        {"image_aspect_ratio": "highres", "mm_patch_merge_type": "spatial_unpad"},
    ],
)
def test_size_dependent_llava_next_counts_are_refused_not_guessed(fields):
    """LLaVA-OneVision's config: one count per placeholder would be wrong for every image size but one."""
    config = {"mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu", **fields}
    with pytest.raises(DataError, match="depends on its size"):
        visual_tokens_from_config(config)
    if config["image_aspect_ratio"].startswith("anyres"):  # counted per image instead (tests/test_anyres_rows.py)
        pinpoints = {"image_grid_pinpoints": [[384, 768], [768, 384]]}
        assert isinstance(visual_rows_from_config({**config, **pinpoints}), AnyresLayout)
    else:
        with pytest.raises(DataError, match="depends on its size"):
            visual_rows_from_config(config)
    assert visual_tokens_from_config({**config, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}) == 729
