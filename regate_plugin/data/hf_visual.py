"""Visual rows per image for the HF-native processors whose count depends on the image's size.

- Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the image processor resizes each image so that both sides are multiples of
  `patch_size * merge_size` and its area lies in [min_pixels, max_pixels] (`smart_resize`), and the processor
  expands `<|image_pad|>` into one row per merged patch: `(h / factor) * (w / factor)` rows.
- InternVL (InternVL3 / 3.5 `-hf` conversions): with `crop_to_patches` (which `InternVLProcessor` passes to its
  image processor unless the call says otherwise) the image is cut into the tile grid whose
  aspect ratio is closest to the image's (`min_patches..max_patches` tiles), plus one thumbnail tile when there is
  more than one; the processor expands `<IMG_CONTEXT>` into `<img>`, `image_seq_length` rows per tile, `</img>`.

The arithmetic follows transformers 5.25's `Qwen2VLImageProcessor` / `GotOcr2ImageProcessor` and is checked
against the processors themselves on generated images (`tests/test_hf_visual_rows.py`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from .anyres import Size
from .conversations import DataError

QWEN_VL_TYPES = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}  # model_type -> the image processor's patch size
MAX_ASPECT = 200  # smart_resize refuses a longer side over 200 times the shorter


@dataclass(frozen=True)
class QwenVLRows:
    """Rows per image of a Qwen2-VL-family processor (`smart_resize`, then one row per merged patch)."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    def rows(self, size: Size) -> int:
        width, height = size
        if width <= 0 or height <= 0:
            raise DataError(f"image size {size} is not a positive (width, height)")
        if max(width, height) / min(width, height) > MAX_ASPECT:
            raise DataError(f"image size {size}: the Qwen-VL processor refuses an aspect ratio over {MAX_ASPECT}")
        factor = self.patch_size * self.merge_size
        h, w = round(height / factor) * factor, round(width / factor) * factor
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return (h // factor) * (w // factor)

    wrap: ClassVar[tuple[str, str] | None] = None  # the processor adds no tokens around an image's rows

    def describe(self) -> dict[str, Any]:
        return {"processor": "qwen_vl", **asdict(self)}


def tile_grid(size: Size, tile: Size, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of tiles whose aspect ratio is closest to the image's; ties go to more tiles while the image
    covers more than half of them."""
    width, height = size
    grids = [(c, n // c) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) if n % c == 0]
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class InternVLRows:
    """Rows per image of an InternVL processor: `image_seq_length` per tile (the `<img>`/`</img>` pair aside)."""

    tile_width: int
    tile_height: int
    image_seq_length: int
    crop_to_patches: bool
    min_patches: int
    max_patches: int
    wrap: tuple[str, str] = ("<img>", "</img>")  # the tokenizer's start_image_token, end_image_token

    def tiles(self, size: Size) -> int:
        if size[0] <= 0 or size[1] <= 0:
            raise DataError(f"image size {size} is not a positive (width, height)")
        if not self.crop_to_patches or self.max_patches <= 1:
            return 1
        cols, rows = tile_grid(size, (self.tile_width, self.tile_height), self.min_patches, self.max_patches)
        return 1 if cols * rows == 1 else cols * rows + 1  # the grid, and a thumbnail of the whole image

    def rows(self, size: Size) -> int:
        return self.image_seq_length * self.tiles(size)

    def describe(self) -> dict[str, Any]:
        return {"processor": "internvl", **asdict(self), "wrap": list(self.wrap)}  # as JSON reads it back


HFVisualRows = QwenVLRows | InternVLRows


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file() and not required:
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the student's {path.name}: {err}") from err


def hf_visual_rows(directory: str | Path) -> HFVisualRows | None:
    """The per-image rule of an HF-native Qwen-VL or InternVL checkpoint directory (its `config.json` and
    `preprocessor_config.json`, the image processor's defaults where a key is absent); None for other models."""
    directory = Path(directory)
    config = _read_json(directory / "config.json", required=True)
    model_type = config.get("model_type")
    if model_type not in (*QWEN_VL_TYPES, "internvl"):
        return None
    pre = _read_json(directory / "preprocessor_config.json", required=False)
    size = pre.get("size") or {}
    if model_type in QWEN_VL_TYPES:
        return QwenVLRows(
            patch_size=int(pre.get("patch_size", QWEN_VL_TYPES[model_type])),
            merge_size=int(pre.get("merge_size", 2)),
            min_pixels=int(pre.get("min_pixels", size.get("shortest_edge", 56 * 56))),
            max_pixels=int(pre.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
        )
    processor = _read_json(directory / "processor_config.json", required=False)
    tokenizer = _read_json(directory / "tokenizer_config.json", required=False)
    tokens = {  # where transformers 4 (`extra_special_tokens`) and 5 (top level) save the tokenizer's named tokens
        **(extra if isinstance(extra := tokenizer.get("extra_special_tokens"), dict) else {}),
        **tokenizer,
    }
    return InternVLRows(
        tile_width=int(size.get("width", 384)),
        tile_height=int(size.get("height", 384)),
        image_seq_length=int(processor.get("image_seq_length", config.get("image_seq_length", 256))),
        # InternVLProcessor passes crop_to_patches=True to its image processor, whatever the preprocessor's file says
        crop_to_patches=True,
        min_patches=int(pre.get("min_patches", 1)),
        max_patches=int(pre.get("max_patches", 12)),
        wrap=(str(tokens.get("start_image_token", "<img>")), str(tokens.get("end_image_token", "</img>"))),
    )
