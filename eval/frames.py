"""Which frames a benchmark protocol samples, and readers for video files, GIFs and JPEG frame folders.

Two index rules, each reproducing its reference code (docs/EVAL.md):
`official_frame_indices` is VideoChat2's `get_index`, `videollama2_frame_indices` is VideoLLaMA2's `frame_sample`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image

from .base import BenchmarkError

Bound = tuple[float, float]
GIF_FPS = 25.0
FRAME_FOLDER_FPS = 3.0
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def official_frame_indices(
    max_frame: int, fps: float, num_segments: int, bound: Bound | None = None, first_idx: int = 0
) -> list[int]:
    """VideoChat2 `get_index`: segment midpoints between the bound, Python's half-to-even `round`."""
    start, end = bound if bound is not None else (-100000.0, 100000.0)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg = (end_idx - start_idx) / num_segments
    return [int(start_idx + seg / 2 + round(seg * i)) for i in range(num_segments)]


def videollama2_frame_indices(n_frames: int, fps: float, num_frames: int, bound: Bound | None = None) -> list[int]:
    """VideoLLaMA2 `frame_sample` ('uniform'): bound cleaned, `int` truncation, offsets round((i + 0.5) * seg)."""
    if bound is None:
        f_start, f_end = 0, n_frames - 1
    else:
        s, e = max(bound[0], 0.0), max(bound[1], 0.0)
        if s > e:
            s, e = e, s
        elif s == e:
            e = s + 1
        f_start = max(int(s * fps) - 1, 0)
        f_end = min(int(e * fps) - 1, n_frames - 1)
    seg = (f_end - f_start + 1 - 1) / num_frames
    return [f_start + round((i + 0.5) * seg + 1e-6) for i in range(num_frames)]


@contextmanager
def _video(path: Path) -> Iterator[Any]:
    """An open PyAV container of `path`'s video; an empty, damaged or video-less file is an error naming it."""
    import av

    if path.stat().st_size == 0:
        raise BenchmarkError(f"{path}: the video file is empty (0 bytes); download or extract it again")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BenchmarkError(f"{path}: holds no video stream")
            yield container
    except av.error.FFmpegError as err:
        raise BenchmarkError(f"{path}: cannot read the video ({err}); download or extract it again") from None


@dataclass(frozen=True)
class VisualSource:
    """A video file, a GIF, or a folder of frame images."""

    path: Path

    @property
    def kind(self) -> str:
        if self.path.is_dir():
            return "frames"
        return "gif" if self.path.suffix.lower() == ".gif" else "video"

    def frame_files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)

    def probe(self) -> tuple[int, float]:
        """(number of frames, frames per second); GIFs count as 25 fps and frame folders as 3, as the references do."""
        if self.kind == "frames":
            return len(self.frame_files()), FRAME_FOLDER_FPS
        if self.kind == "gif":
            with Image.open(self.path) as gif:
                return getattr(gif, "n_frames", 1), GIF_FPS
        with _video(self.path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            count = stream.frames or sum(1 for _ in container.decode(video=0))
            return count, float(rate)

    def read(self, indices: list[int]) -> list[Image.Image]:
        """RGB frames at 0-based decode positions (sorted-listing positions for a folder); repeats allowed."""
        if not indices:
            return []
        wanted = set(indices)
        found: dict[int, Image.Image] = {}
        if self.kind == "frames":
            files = self.frame_files()
            found = {i: Image.open(files[i]).convert("RGB") for i in wanted if 0 <= i < len(files)}
        elif self.kind == "gif":
            with Image.open(self.path) as gif:
                for i in sorted(wanted):
                    if i < getattr(gif, "n_frames", 1):
                        gif.seek(i)
                        found[i] = gif.convert("RGB")
        else:
            with _video(self.path) as container:
                for position, frame in enumerate(container.decode(video=0)):
                    if position in wanted:
                        found[position] = frame.to_image().convert("RGB")
                    if position >= max(wanted):
                        break
        missing = sorted(wanted - set(found))
        if missing:
            raise BenchmarkError(f"{self.path}: frame(s) {missing[:5]} are past the end ({self.kind})")
        return [found[i] for i in indices]


def sample_official(source: VisualSource, num_segments: int, bound: Bound | None) -> list[Image.Image]:
    """Official protocol: videos/GIFs by 0-based index (max_frame = n - 1); frame folders by 1-based file number
    `{k:05d}.jpg` with max_frame = n and first_idx = 1, as VideoChat2's `get_index` reads them."""
    n_frames, fps = source.probe()
    if source.kind == "frames":
        numbers = official_frame_indices(n_frames, fps, num_segments, bound, first_idx=1)
        return [Image.open(source.path / f"{k:05d}.jpg").convert("RGB") for k in numbers]
    return source.read(official_frame_indices(n_frames - 1, fps, num_segments, bound))


def sample_videollama2(
    source: VisualSource, num_frames: int, bound: Bound | None, max_frames: int = 32
) -> list[Image.Image]:
    """VideoLLaMA2 protocol: positions in decode order / sorted listing, capped at 32, padded with black frames."""
    num_frames = min(num_frames, max_frames)
    n_frames, fps = source.probe()
    indices = [i for i in videollama2_frame_indices(n_frames, fps, num_frames, bound) if i < n_frames]
    frames = source.read(indices)
    if frames and len(frames) < num_frames:
        frames += [Image.new("RGB", frames[0].size) for _ in range(num_frames - len(frames))]
    return frames
