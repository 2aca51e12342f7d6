"""Visual rows per image for the HF-native processors whose count depends on the image's size.

- Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the image processor resizes each image so that both sides are multiples of
  `patch_size * merge_size` and its area lies in [min_pixels, max_pixels] (`smart_resize`), and the processor
  expands `<|image_pad|>` into one row per merged patch: `(h / factor) * (w / factor)` rows.
- InternVL (InternVL3 / 3.5 `-hf` conversions): with `crop_to_patches` (which `InternVLProcessor` passes to its
  image processor unless the call says otherwise) the image is cut into the tile grid whose
  aspect ratio is closest to the image's (`min_patches..max_patches` tiles), plus one thumbnail tile when there is
  more than one; the processor expands `<IMG_CONTEXT>` into `<img>`, `image_seq_length` rows per tile, `</img>`.

Visual rows per video (`num_frames` frames sampled from the file, `eval/frames.py`'s VideoLLaMA2 rule):

- LLaVA-NeXT-Video: the video processor resizes (and centre-crops) every frame, and the processor expands `<video>`
  into `(H / patch) * (W / patch) // 4` rows per processed H x W frame (the model pools each frame's grid 2x2).

The arithmetic follows transformers 5.25's `Qwen2VLImageProcessor` / `GotOcr2ImageProcessor` /
`LlavaNextVideoProcessor` and is checked against the processors themselves on generated images and videos
(`tests/test_hf_visual_rows.py`, `tests/test_hf_dataset_video.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from PIL import Image

from .anyres import Size
from .conversations import DataError

_T = TypeVar("_T")

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


@dataclass(frozen=True)
class LlavaNextVideoRows:
    """Rows per video of a LLaVA-NeXT-Video processor: `num_frames` frames, each resized (to `height` x `width`, or
    its shorter side to `shortest_edge`) and centre-cropped to `crop` (height, width) where the processor crops, then
    `(H / patch) * (W / patch) // 4` rows per frame."""

    num_frames: int
    patch_size: int
    shortest_edge: int | None = None
    height: int | None = None
    width: int | None = None
    crop: tuple[int, int] | None = None

    def frame_size(self, size: Size) -> tuple[int, int]:
        """(height, width) of a processed frame of a `size` = (width, height) video."""
        width, height = size
        if width <= 0 or height <= 0:
            raise DataError(f"video frame size {size} is not a positive (width, height)")
        if self.crop is not None:
            return self.crop
        if self.height is not None and self.width is not None:
            return self.height, self.width
        if self.shortest_edge is not None:  # transformers' get_resize_output_image_size(default_to_square=False)
            short, long = min(width, height), max(width, height)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_long, new_short) if height > width else (new_short, new_long)
        return height, width

    def rows(self, size: Size) -> int:
        height, width = self.frame_size(size)
        return self.num_frames * ((height // self.patch_size) * (width // self.patch_size) // 4)

    def describe(self) -> dict[str, Any]:
        crop = list(self.crop) if self.crop is not None else None  # as JSON reads it back
        return {"processor": "llava_next_video", **asdict(self), "crop": crop}


HFVideoRows = LlavaNextVideoRows


def _video_resize(settings: dict[str, Any]) -> dict[str, Any]:
    """The resize and crop keywords of `LlavaNextVideoRows` from a video processor's settings (its attributes or its
    saved json), with `LlavaNextVideoVideoProcessor`'s defaults where one is absent."""
    size = dict(settings.get("size") or {"shortest_edge": 224})
    crop = dict(settings.get("crop_size") or {"height": 224, "width": 224})
    resized = settings.get("do_resize", True)
    return {
        "shortest_edge": size.get("shortest_edge") if resized else None,
        "height": size.get("height") if resized else None,
        "width": size.get("width") if resized else None,
        "crop": (int(crop["height"]), int(crop["width"])) if settings.get("do_center_crop", True) else None,
    }


def video_rows_of(processor: Any, num_frames: int) -> HFVideoRows:
    """The per-video rule of a loaded HF processor (its `video_processor`'s settings and its patch size)."""
    name = type(processor).__name__
    video = getattr(processor, "video_processor", None)
    if name != "LlavaNextVideoProcessor" or video is None or not getattr(processor, "patch_size", None):
        raise DataError(
            f"video samples need a processor whose video rows are known (LlavaNextVideoProcessor with its "
            f"video_processor and patch_size); got {name}"
        )
    settings = {key: getattr(video, key, None) for key in ("size", "crop_size", "do_resize", "do_center_crop")}
    settings = {key: value for key, value in settings.items() if value is not None}
    return LlavaNextVideoRows(num_frames, int(processor.patch_size), **_video_resize(settings))


def hf_video_rows(directory: str | Path, num_frames: int) -> HFVideoRows | None:
    """The per-video rule of an HF-native LLaVA-NeXT-Video checkpoint directory; None for other models. The video
    processor's settings are looked up where transformers 5 loads them from: `processor_config.json`'s nested
    `video_processor`, else `video_preprocessor_config.json`, else `preprocessor_config.json`."""
    directory = Path(directory)
    config = _read_json(directory / "config.json", required=True)
    if config.get("model_type") != "llava_next_video":
        return None
    processor = _read_json(directory / "processor_config.json", required=False)
    vision = config.get("vision_config") or {}
    patch = int(processor.get("patch_size") or vision.get("patch_size", 14))
    video = processor.get("video_processor")
    if not isinstance(video, dict):
        video = _read_json(directory / "video_preprocessor_config.json", required=False) or _read_json(
            directory / "preprocessor_config.json", required=False
        )
    return LlavaNextVideoRows(num_frames, patch, **_video_resize(video))


def video_frames(path: Path, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames of a video file, read with PyAV and sampled by VideoLLaMA2's uniform rule
    (`eval/frames.py`; a shorter video is padded with black frames), so every video gives exactly `num_frames`."""
    from ..eval.frames import VisualSource, sample_videollama2

    return _reading(path, lambda: sample_videollama2(VisualSource(path), num_frames, None, max_frames=num_frames))


def video_frame_size(path: Path) -> Size:
    """(width, height) of a video file's frames: what a video's rows depend on, read off its first frame."""
    from ..eval.frames import VisualSource

    return _reading(path, lambda: VisualSource(path).read([0])[0].size)


def _reading(path: Path, read: Callable[[], _T]) -> _T:
    """`read()`, with an empty, damaged or unreadable video reported as a DataError naming the file."""
    from ..eval.base import BenchmarkError

    try:
        return read()
    except BenchmarkError as err:  # it names the file and says what to do
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the video: {err}") from None
