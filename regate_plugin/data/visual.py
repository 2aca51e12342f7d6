"""How many visual rows the student splices in per placeholder, read off its `config.json` (docs/PRECOMPUTE.md)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .anyres import AnyresLayout, anyres_layout, is_anyres
from .conversations import DataError
from .hf_visual import QWEN_VL_TYPES

VisualRows = int | AnyresLayout  # rows per placeholder: one count for all, or LLaVA-NeXT's rule from each image's size

# Towers the upstream configs name by hub id: (image size, patch size).
KNOWN_TOWERS = {
    "clip-vit-large-patch14-336": (336, 14),
    "clip-vit-large-patch14": (224, 14),
    "siglip-so400m-patch14-384": (384, 14),
}
DEFAULT_FRAMES = 8  # VideoLLaMA2's NUM_FRAMES
SIZE_DEPENDENT_HF = (*QWEN_VL_TYPES, "internvl")  # HF-native students whose rows hf_visual.py counts per image
SINGLE_CROP_MERGES = {"spatial": 0, "spatial_unpad": 1}  # LLaVA-NeXT rows added to a lone crop: one newline


def tower_geometry(config: dict[str, Any], source: str) -> tuple[int, int]:
    """The vision tower's input side and patch size, in pixels."""
    vision = config.get("vision_config")
    if isinstance(vision, dict) and vision.get("image_size") and vision.get("patch_size"):
        return int(vision["image_size"]), int(vision["patch_size"])
    tower = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    for name, (size, patch) in KNOWN_TOWERS.items():
        if tower.rstrip("/").endswith(name):
            return size, patch
    match = re.search(r"patch(\d+)-(\d+)", tower)
    if match:
        return int(match.group(2)), int(match.group(1))
    raise DataError(
        f"{source}: cannot tell the vision tower's patch grid from {tower or 'the config'}; pass --visual-tokens"
    )


def _tower_grid(config: dict[str, Any], source: str) -> int:
    """Patches per side of the vision tower's feature map."""
    size, patch = tower_geometry(config, source)
    return size // patch


def _stc_out(n: int, padding: int) -> int:
    """Length along one axis after VideoLLaMA2's connector samplers: kernel 2, stride 2."""
    return (n + 2 * padding - 2) // 2 + 1


def visual_tokens_from_config(config: dict[str, Any], source: str = "student config") -> int:
    """Visual rows per `<image>`/`<video>` placeholder for LLaVA-1.5, HF-native LLaVA and VideoLLaMA2 configs."""
    aspect, merge = str(config.get("image_aspect_ratio", "")), str(config.get("mm_patch_merge_type", "flat"))
    single_crop = aspect in ("", "square", "pad")  # one tower crop per image: LLaVA-NeXT's merge adds no tiles
    size_dependent = aspect.startswith("anyres") or (merge != "flat" and not single_crop)
    if size_dependent or merge not in ("flat", *SINGLE_CROP_MERGES):
        raise DataError(
            f"{source}: image_aspect_ratio {aspect!r} / mm_patch_merge_type {merge!r} (LLaVA-NeXT anyres, "
            "spatial_unpad) give each image a row count that depends on its size, which one --visual-tokens cannot "
            "describe; pass --student-config, which counts each image's rows from its size"
        )
    grid = _tower_grid(config, source)
    cls_row = (
        1
        if config.get("mm_vision_select_feature") == "cls_patch"
        or config.get("vision_feature_select_strategy") == "full"
        else 0
    )
    projector = str(config.get("mm_projector_type", "linear"))
    if "tc_connector" in projector or "tp_connector" in projector:
        frames = int(config.get("num_frames") or DEFAULT_FRAMES)
        # stc_connector: Conv3d(kernel 2, stride 2, padding 1); stc_connector_v35: padding 0; stp_connector:
        # AvgPool3d((2, 2, 2)) without padding. Each halves time and both spatial sides.
        padding = 1 if projector == "stc_connector" else 0
        return _stc_out(frames, padding) * _stc_out(grid, padding) ** 2
    if projector in ("linear", "identity") or re.fullmatch(r"mlp\d+x_gelu", projector):
        return grid * grid + cls_row + SINGLE_CROP_MERGES.get(merge, 0)
    raise DataError(f"{source}: projector {projector!r} has no known token count; pass --visual-tokens")


def visual_rows_from_config(config: dict[str, Any], source: str = "student config") -> VisualRows:
    """The anyres layout of a LLaVA-NeXT anyres / anyres_max_N config, else `visual_tokens_from_config`."""
    if config.get("model_type") in SIZE_DEPENDENT_HF:
        raise DataError(
            f"{source}: a {config['model_type']} student's processor gives each image a row count that depends on "
            "its size; pass the student's directory (with its preprocessor_config.json) to --student-config, or "
            "PrecomputeConfig(processor_rows=hf_visual_rows(<student dir>)) "
            "(docs/TRAINING.md, 'Qwen2.5-VL, Qwen3-VL and InternVL'), or --visual-tokens only if every image has "
            "one size"
        )
    if is_anyres(str(config.get("image_aspect_ratio", ""))):
        return anyres_layout(config, *tower_geometry(config, source), source)
    return visual_tokens_from_config(config, source)


def visual_rows_from_path(path: str | os.PathLike[str]) -> VisualRows:
    """`visual_rows_from_config` of a `config.json` file or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the student config: {err}") from err
    return visual_rows_from_config(config, str(path))
