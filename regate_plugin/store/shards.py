"""Shard files: `shard-NNNNN.safetensors` holding keys uint8 [N, 16], offsets int64 [N + 1], losses <dtype> [T],
and, in a cache with per-sample visual rows, visual_rows int32 [N]; written whole, read checked, losses mapped.

Row i holds the losses of sample keys[i] in losses[offsets[i]:offsets[i + 1]], one per supervised target (answer
token ordinal order). The losses are memory-mapped through the safetensors header, parsed here by hand, so a
lookup reads only its slice. A shard records, in its metadata, the header of the cache it was made for."""

from __future__ import annotations

import json
import os
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


def map_losses(path: Path) -> np.ndarray:
    """A shard's losses as a read-only memory-mapped array (no copy into RAM); bfloat16 as its uint16 bits."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    info = header["losses"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = (end - begin) // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + begin, shape=(count,)))


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
