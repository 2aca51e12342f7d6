"""Shard files: `shard-NNNNN.safetensors` holding keys uint8 [N, 16], offsets int64 [N + 1], losses <dtype> [T],
and, in a cache with per-sample visual rows, visual_rows int32 [N]; written whole, read checked, losses mapped.

Row i holds the losses of sample keys[i] in losses[offsets[i]:offsets[i + 1]], one per supervised target (answer
token ordinal order). The losses are memory-mapped through the safetensors header, parsed here by hand, so a
lookup reads only its slice. A shard records, in its metadata, the header of the cache it was made for."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.keys import KEY_BYTES, SampleKey
from .errors import CorruptShardError

SHARD_GLOB = "shard-*.safetensors"
VISUAL_ROWS = "visual_rows"  # the shard tensor of per-sample visual rows
SET_ASIDE_SUFFIX = ".corrupt"  # a shard that failed its check on repair, kept under this suffix
CACHE_FORMAT = "regate-reference-cache"  # the `format` of a manifest and of the header a shard records
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16}  # bf16 read as its raw bits


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def shard_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every shard file in a cache directory, listed in its manifest or not, by name."""
    return sorted(Path(directory).glob(SHARD_GLOB))


def describe_shards(paths: list[Path], most: int = 5) -> str:
    """ "N shard files (a, b, ... and M more)"."""
    shown = ", ".join(p.name for p in paths[:most])
    return f"{len(paths)} shard files ({shown}" + (f" and {len(paths) - most} more)" if len(paths) > most else ")")


def _losses_location(path: Path) -> tuple[np.dtype, int, int]:
    """(dtype, byte offset in the file, count) of a shard's losses, read off its safetensors header."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    info = header["losses"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    return dtype, 8 + header_size + begin, (end - begin) // dtype.itemsize


def map_losses(path: Path) -> np.ndarray:
    """A shard's losses as a read-only memory-mapped array (no copy into RAM); bfloat16 as its uint16 bits."""
    dtype, offset, count = _losses_location(path)
    if count == 0:
        return np.zeros(0, dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED = 0x10  # the same on Linux and macOS; Python's mmap module exports neither this nor PROT_NONE
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(address: int | None, size: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _libc.mmap(address, size, prot, flags, fd, offset)
    if result in (None, _MAP_FAILED) or (address is not None and result != address):
        raise OSError(ctypes.get_errno(), f"mmap failed: {os.strerror(ctypes.get_errno())}")
    return result


class SideBySide:
    """Every shard's losses memory-mapped next to each other in one range of virtual memory, read as one array.

    Shard k's losses start at element `gaps[k]` + (their start in the token space): each file is mapped from the
    page holding its first loss into its own page-aligned slot, so a batch read is a single gather however many
    shards it touches. Nothing is read into RAM; the range is unmapped when `array` and every view of it are gone."""

    def __init__(self, paths: list[Path]) -> None:
        located = [_losses_location(path) for path in paths]
        dtypes = {dtype for dtype, _, _ in located}
        if len(dtypes) > 1:
            raise CorruptShardError(f"the shards of {paths[0].parent} store their losses in {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float16)
        page, slots, self.gaps = mmap.PAGESIZE, [], []
        size = tokens = 0
        for path, (_, offset, count) in zip(paths, located):
            lead = offset % page
            if lead % self.dtype.itemsize:
                raise CorruptShardError(f"shard {path}: its losses are not aligned to their {self.dtype} elements")
            slots.append((path, size, offset - lead, -(-(lead + count * self.dtype.itemsize) // page) * page))
            self.gaps.append((size + lead) // self.dtype.itemsize - tokens)
            size, tokens = size + slots[-1][3], tokens + count
        self.size = max(size, page)
        self.address = _mmap(None, self.size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        unmap = weakref.finalize(self, _libc.munmap, self.address, self.size)  # until the array holds the range
        for path, slot, file_offset, length in slots:
            if length:
                fd = os.open(path, os.O_RDONLY)
                try:
                    _mmap(self.address + slot, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, file_offset)
                finally:
                    os.close(fd)
        self.array = np.frombuffer((ctypes.c_char * self.size).from_address(self.address), dtype=self.dtype)
        self.array.flags.writeable = False
        unmap.detach()
        weakref.finalize(self.array, _libc.munmap, self.address, self.size)  # when no view of it is left


def as_float32(values: np.ndarray) -> np.ndarray:
    """Stored losses (float16, float32, or bfloat16 bits) as float32."""
    if values.dtype == np.uint16:  # bfloat16 bits are the top half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """A shard's keys, offsets, memory-mapped losses and per-sample visual rows (None when it has none), checked
    against each other (CorruptShardError if not)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = handle.get_tensor("keys").numpy()
            offsets = handle.get_tensor("offsets").numpy()
            visual = handle.get_tensor(VISUAL_ROWS).numpy() if VISUAL_ROWS in handle.keys() else None
        losses = map_losses(path)
    except Exception as err:  # safetensors raises several types on a damaged header, numpy on a truncated body
        raise CorruptShardError(f"shard {path} cannot be read: {err}") from err
    if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or offsets.shape != (keys.shape[0] + 1,):
        raise CorruptShardError(f"shard {path} has keys {keys.shape} and offsets {offsets.shape}: not a cache shard")
    if offsets[0] != 0 or offsets[-1] != losses.size or (np.diff(offsets) < 0).any():
        raise CorruptShardError(f"shard {path} has offsets that do not cover its {losses.size} losses")
    if visual is not None and visual.shape != (keys.shape[0],):
        raise CorruptShardError(f"shard {path} has {visual.shape} visual row counts for {keys.shape[0]} samples")
    return keys, offsets, losses, visual


def shard_keys(path: Path) -> list[SampleKey]:
    keys = read_shard(path)[0]
    return [keys[row].tobytes() for row in range(keys.shape[0])]


def made_with(path: Path) -> dict[str, Any]:
    """The cache header a shard records it was made for."""
    with safe_open(str(path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get("header")
    if not recorded:
        raise CorruptShardError(f"shard {path} records no header: it was not written by regate precompute")
    made = json.loads(recorded)
    made.pop("format", None)
    return made


def write_shard(
    path: Path,
    samples: list[tuple[SampleKey, torch.Tensor, int]],
    dtype: torch.dtype,
    header: dict[str, Any],
    visual: bool,
) -> int:
    """Write (key, losses, visual rows) samples as one shard at `path`; returns its number of losses.

    One metadata key: safetensors writes several in a per-process random order, and a shard's bytes (so its sha256,
    and the layout digest of every state aligned to the cache) must depend on its content alone."""
    keys = np.frombuffer(b"".join(k for k, _, _ in samples), dtype=np.uint8).reshape(-1, KEY_BYTES)
    lengths = torch.tensor([0] + [v.numel() for _, v, _ in samples], dtype=torch.int64)
    tensors = {
        "keys": torch.tensor(keys),
        "offsets": torch.cumsum(lengths, 0),
        "losses": torch.cat([v for _, v, _ in samples]).to(dtype),
    }
    if visual:
        tensors[VISUAL_ROWS] = torch.tensor([rows for _, _, rows in samples], dtype=torch.int32)
    save_file(tensors, path, metadata={"header": json.dumps({"format": CACHE_FORMAT, **header}, sort_keys=True)})
    return tensors["losses"].numel()


def set_aside(path: Path) -> Path:
    """Rename a shard that cannot be trusted to `<name>.corrupt` (`.corrupt.N` if taken): out of the cache, not lost."""
    target, n = path.with_name(path.name + SET_ASIDE_SUFFIX), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{SET_ASIDE_SUFFIX}.{n}")
    os.replace(path, target)
    return target
