"""LLaVA-NeXT's visual rows per image under `anyres` / `anyres_max_N` tiling, from the image's size alone.

The arithmetic follows LLaVA-VL/LLaVA-NeXT at b42941c: the tiling that `process_anyres_image` picks, the grid that
`get_anyres_image_grid_shape` reports, and the rows the `spatial` / `spatial_unpad` merge of
`prepare_inputs_labels_for_multimodal` keeps (docs/PRECOMPUTE.md, "Visual rows per placeholder").
"""

from __future__ import annotations

import ast
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from .conversations import DataError

Size = tuple[int, int]  # (width, height), as PIL reports it
RANGE_TILES = (224, 336, 384, 448, 512)  # tower sides upstream allows for the "(1x1),...,(NxM)" pinpoint form
MERGES = ("flat", "spatial", "spatial_unpad")


def is_anyres(aspect: str) -> bool:
    """Whether an `image_aspect_ratio` makes LLaVA-NeXT tile each image (upstream tests `"anyres_max" in ...`)."""
    return aspect == "anyres" or "anyres_max" in aspect


def candidate_resolutions(pinpoints: Any, tile: int, source: str) -> tuple[Size, ...]:
    """The (width, height) canvases of `image_grid_pinpoints`: a list, its literal string, or "(1x1),...,(6x6)"."""
    if isinstance(pinpoints, str) and "x" in pinpoints:
        if tile not in RANGE_TILES:
            raise DataError(f"{source}: the range form of image_grid_pinpoints needs a tower side in {RANGE_TILES}")
        ranges = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if not ranges:
            raise DataError(f"{source}: cannot read image_grid_pinpoints {pinpoints!r}")
        (c0, r0), (c1, r1) = (tuple(map(int, ranges[0])), tuple(map(int, ranges[-1])))
        return tuple((c * tile, r * tile) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1))
    if isinstance(pinpoints, str):
        try:
            pinpoints = ast.literal_eval(pinpoints)
        except (ValueError, SyntaxError) as err:
            raise DataError(f"{source}: cannot read image_grid_pinpoints {pinpoints!r}: {err}") from err
    if not pinpoints or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pinpoints):
        raise DataError(f"{source}: anyres needs image_grid_pinpoints as [[width, height], ...], got {pinpoints!r}")
    return tuple((int(w), int(h)) for w, h in pinpoints)


def best_resolution(size: Size, resolutions: tuple[Size, ...]) -> Size:
    """The canvas keeping most of the image once fitted inside it, ties broken by the least padding."""
    width, height = size
    best, best_kept, best_waste = resolutions[0], -1, math.inf
    for cw, ch in resolutions:
        scale = min(cw / width, ch / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (cw, ch), kept, waste
    return best


def unpadded_shape(height: int, width: int, size: Size) -> tuple[int, int]:
    """(height, width) of a feature map of the padded canvas after the padding bands of `size` are cut off."""
    orig_w, orig_h = size
    if orig_w / orig_h > width / height:  # padded above and below
        band = (height - int(orig_h * (width / orig_w))) // 2
        return height - 2 * band, width
    band = (width - int(orig_w * (height / orig_h))) // 2
    return height, width - 2 * band


@dataclass(frozen=True)
class AnyresLayout:
    """What fixes a LLaVA-NeXT student's per-image row count: tiling canvases, tower side and grid, merge."""

    resolutions: tuple[Size, ...]
    tile: int  # the tower's input side in pixels
    grid: int  # feature rows/columns per tile
    merge: str  # mm_patch_merge_type
    max_tiles: int | None = None  # N of anyres_max_N

    def describe(self) -> dict[str, Any]:
        """The layout as plain JSON values (how a cache manifest records it)."""
        resolutions = [list(r) for r in self.resolutions]
        return {
            "resolutions": resolutions,
            "tile": self.tile,
            "grid": self.grid,
            "merge": self.merge,
            "max_tiles": self.max_tiles,
        }

    def padded_rows(self) -> int:
        """Rows of an image processed as one padded crop, as LLaVA-NeXT's dataset does every image of a sample that
        has more than one (`process_image(f, "pad")`): the grid, and one newline row under `spatial_unpad`."""
        return self.grid * self.grid + (self.merge == "spatial_unpad")

    def rows(self, size: Size) -> int:
        """Visual rows the merge puts in for one image of `size` (width, height)."""
        if size[0] <= 0 or size[1] <= 0:
            raise DataError(f"image size {size} is not a positive (width, height)")
        canvas_w, canvas_h = best_resolution(size, self.resolutions)
        cols, rows = canvas_w // self.tile, canvas_h // self.tile
        base = self.grid * self.grid
        if self.merge != "spatial_unpad":  # flat and spatial keep every row of the base image and each tile
            return base + cols * rows * base
        h, w = unpadded_shape(rows * self.grid, cols * self.grid, size)
        if self.max_tiles is not None:
            times = math.sqrt(h * w / (self.max_tiles * self.grid**2))
            if times > 1.1:
                h, w = int(h // times), int(w // times)
        return base + h * (w + 1)  # one newline row closes each feature row


def anyres_layout(config: dict[str, Any], tile: int, patch: int, source: str) -> AnyresLayout:
    """The `AnyresLayout` of a LLaVA-NeXT config whose `image_aspect_ratio` is anyres or anyres_max_N."""
    aspect, merge = str(config.get("image_aspect_ratio", "")), str(config.get("mm_patch_merge_type", "flat"))
    if merge not in MERGES:
        raise DataError(f"{source}: mm_patch_merge_type {merge!r} has no known row count (known: {', '.join(MERGES)})")
    max_tiles = None
    if "anyres_max" in aspect:
        match = re.match(r"anyres_max_(\d+)", aspect)
        if not match:
            raise DataError(f"{source}: cannot read the tile limit of image_aspect_ratio {aspect!r}")
        max_tiles = int(match.group(1)) if merge == "spatial_unpad" else None
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise DataError(f"{source}: anyres needs mm_vision_select_feature 'patch' (the merge assumes a square grid)")
    resolutions = candidate_resolutions(config.get("image_grid_pinpoints"), tile, source)
    return AnyresLayout(resolutions, tile, tile // patch, merge, max_tiles)


def read_image_size(path: str | os.PathLike[str]) -> Size:
    """(width, height) of an image file from its header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: {err} Upstream's loader refuses it too: replace or drop the image") from None
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: cannot read the image size: {err}") from err
