"""`ReferenceLossCache`: an on-disk, content-addressed store of per-answer-token reference losses.

Layout of a cache directory::

    manifest.json              reference, tokenizer fingerprint, visual mode, dtype, counts, and every shard's sha256
    shard-<prefix><n>.safetensors   keys uint8 [N, 16], offsets int64 [N + 1], losses <dtype> [T],
                                    and, in a cache with per-sample visual rows, visual_rows int32 [N]

Row i of a shard holds the losses of sample keys[i] in losses[offsets[i]:offsets[i + 1]], one value per supervised
target (answer-token ordinal order). Shards and the manifest are written to a temporary name and renamed, so a
reader never sees a half-written file. Opening a cache checks every shard's sha256 once and indexes the keys in
sorted arrays; a lookup then reads only that sample's slice through a memory map.

Nothing here deletes a shard it did not write unless told to overwrite: a shard that fails its check on repair is
renamed to `<name>.corrupt`, and a directory whose shards lost their manifest is refused, or rebuilt by
`repair_cache`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .dtypes import DTYPES
from .errors import UserError
from .files import file_sha256, replaced_on_success, write_bytes_atomically
from .keys import KEY_BYTES, SampleKey, format_key

MANIFEST_NAME = "manifest.json"
VISUAL_ROWS = "visual_rows"  # the shard tensor of per-sample visual rows
CACHE_FORMAT = "regate-reference-cache"
CACHE_VERSION = 2  # 2 added per-sample visual rows (`visual_layout`); version 1 caches read as before
READABLE_VERSIONS = (1, 2)
SHARD_GLOB = "shard-*.safetensors"
SET_ASIDE_SUFFIX = ".corrupt"  # a shard that failed its check on repair, kept under this suffix


class CacheError(UserError, RuntimeError):
    """The reference cache cannot be used as asked."""


class CorruptShardError(CacheError):
    """A shard's bytes do not match the sha256 recorded in the manifest, or it cannot be parsed."""


class TokenizerMismatchError(CacheError):
    """The cache was built with a tokenizer other than the student's."""


class MissingReferenceError(CacheError, LookupError):
    """A sample has no entry in the cache."""


class CacheWriteError(CacheError):
    """A shard or the manifest could not be written (a full disk, a read-only mount); what is committed is intact."""


@dataclass
class ShardInfo:
    file: str
    sha256: str
    samples: int
    tokens: int
    empty: int = 0  # samples with no answer targets


@dataclass
class CacheManifest:
    reference: str  # the reference LLM that scored the samples
    tokenizer_fingerprint: str
    reference_mode: str
    dtype: str = "float16"
    visual_tokens: int | None = None  # rows per placeholder, when every placeholder has the same count
    visual_layout: dict[str, Any] | None = None  # the rule of per-sample counts (LLaVA-NeXT anyres), stored per sample
    samples: int = 0
    tokens: int = 0
    empty_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = CACHE_FORMAT
    version: int = CACHE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: Path) -> CacheManifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != CACHE_FORMAT:
                raise CacheError(f"{source} is not a ReGATE reference cache manifest (format={raw.get('format')!r})")
            if raw.get("version") not in READABLE_VERSIONS:
                raise CacheError(
                    f"{source} has cache format version {raw.get('version')}, this plugin reads versions "
                    f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade regate-plugin"
                )
            if "teacher" in raw and "reference" not in raw:  # its older name, in caches written before the rename
                raw["reference"] = raw.pop("teacher")
            raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise CacheError(f"{source} is not a valid cache manifest: {err}") from err

    @property
    def visual_rows(self) -> int | str | None:
        """What the cache says of visual rows: the count per placeholder, "per sample (anyres)", or None."""
        return self.visual_tokens if self.visual_layout is None else "per sample (anyres)"

    def header(self) -> dict[str, Any]:
        """The fields that say what the losses mean (not how many there are)."""
        return {
            k: getattr(self, k)
            for k in ("reference", "tokenizer_fingerprint", "reference_mode", "dtype", "visual_tokens", "visual_layout")
        }

    def add_shard(self, shard: ShardInfo) -> None:
        """List a committed shard and count its samples and losses."""
        self.shards.append(shard)
        self.samples += shard.samples
        self.tokens += shard.tokens
        self.empty_samples += shard.empty


def shard_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every shard file in a cache directory, listed in its manifest or not, by name."""
    return sorted(Path(directory).glob(SHARD_GLOB))


def _names(paths: list[Path], most: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def read_manifest(directory: str | os.PathLike[str]) -> CacheManifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        found = shard_files(directory)
        rebuild = (
            f"; it holds {len(found)} shard files ({_names(found)}): `regate precompute --resume` rebuilds the "
            "manifest from them"
            if found
            else ""
        )
        raise CacheError(f"{Path(directory)} is not a ReGATE reference cache: {MANIFEST_NAME} is missing{rebuild}")
    return CacheManifest.from_json(path.read_text(encoding="utf-8"), path)


def check_not_orphaned(directory: str | os.PathLike[str]) -> None:
    """Refuse a directory that holds shard files but no manifest (the manifest was lost: its shards are work)."""
    found = shard_files(directory)
    if found and not (Path(directory) / MANIFEST_NAME).is_file():
        raise CacheError(
            f"{Path(directory)} holds {len(found)} shard files ({_names(found)}) but no {MANIFEST_NAME}: "
            "`regate precompute --resume` rebuilds the manifest from them and continues; `--overwrite` replaces them"
        )


def _shard_keys(path: Path) -> list[SampleKey]:
    keys = _read_shard(path)[0]
    return [keys[row].tobytes() for row in range(keys.shape[0])]


def committed_keys(directory: str | os.PathLike[str], manifest: CacheManifest | None = None) -> list[SampleKey]:
    """The sample keys of every shard a cache directory's manifest lists (no hashing, no losses read)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    return [key for shard in manifest.shards for key in _shard_keys(directory / shard.file)]


def key_halves(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 16] keys -> their two 8-byte halves as big-endian signed int64 (the index's sort order)."""
    halves = np.ascontiguousarray(keys, dtype=np.uint8).view(">i8").reshape(-1, 2).astype(np.int64)
    return halves[:, 0].copy(), halves[:, 1].copy()


_SIGN = 1 << 63  # adding it maps signed int64 order onto unsigned order
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16}  # bf16 read as its raw bits


def _map_tensor(path: Path, name: str) -> np.ndarray:
    """A 1-D tensor of a safetensors file as a read-only memory-mapped array (no copy into RAM)."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    info = header[name]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = (end - begin) // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + begin, shape=(count,)))


def _as_float32(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint16:  # bfloat16 bits are the top half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


@dataclass
class _ShardIndex:
    """One shard's part of the index: keys uint8 [N, 16], starts in token space, lengths, visual rows (or None)."""

    keys: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    visual: np.ndarray | None


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """A shard's keys, offsets, memory-mapped losses and per-sample visual rows (None when it has none), checked
    against each other (CorruptShardError if not)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = handle.get_tensor("keys").numpy()
            offsets = handle.get_tensor("offsets").numpy()
            visual = handle.get_tensor(VISUAL_ROWS).numpy() if VISUAL_ROWS in handle.keys() else None
        losses = _map_tensor(path, "losses")
    except Exception as err:  # safetensors raises several types on a damaged header, numpy on a truncated body
        raise CorruptShardError(f"shard {path} cannot be read: {err}") from err
    if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or offsets.shape != (keys.shape[0] + 1,):
        raise CorruptShardError(f"shard {path} has keys {keys.shape} and offsets {offsets.shape}: not a cache shard")
    if offsets[0] != 0 or offsets[-1] != losses.size or (np.diff(offsets) < 0).any():
        raise CorruptShardError(f"shard {path} has offsets that do not cover its {losses.size} losses")
    if visual is not None and visual.shape != (keys.shape[0],):
        raise CorruptShardError(f"shard {path} has {visual.shape} visual row counts for {keys.shape[0]} samples")
    return keys, offsets, losses, visual


def _shard_problem(directory: Path, shard: ShardInfo) -> str | None:
    """What is wrong with a shard the manifest lists (missing, other bytes, unreadable, other counts), or None."""
    path = directory / shard.file
    if not path.is_file():
        return f"{path}: missing"
    if (actual := file_sha256(path)) != shard.sha256:
        return f"{path}: sha256 {actual} != {shard.sha256} recorded in {MANIFEST_NAME}"
    try:
        keys, offsets, _, _ = _read_shard(path)
    except CorruptShardError as err:
        return str(err)
    if keys.shape[0] != shard.samples or int(offsets[-1]) != shard.tokens:
        return (
            f"{path}: holds {keys.shape[0]} samples and {int(offsets[-1])} losses, {MANIFEST_NAME} lists "
            f"{shard.samples} and {shard.tokens}"
        )
    return None


def verify_cache(directory: str | os.PathLike[str], manifest: CacheManifest | None = None) -> list[str]:
    """Re-hash and parse every shard the manifest lists; a message per problem (empty when all is well)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    return [problem for shard in manifest.shards if (problem := _shard_problem(directory, shard))]


def set_aside(path: Path) -> Path:
    """Rename a shard that cannot be trusted to `<name>.corrupt` (`.corrupt.N` if taken): out of the cache, not lost."""
    target, n = path.with_name(path.name + SET_ASIDE_SUFFIX), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{SET_ASIDE_SUFFIX}.{n}")
    os.replace(path, target)
    return target


_LOSS_DTYPE_NAMES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32", np.dtype(np.uint16): "bfloat16"}


def _refuse_made_differently(what: str, made: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise when the header a cache or a shard was made with (`made`) disagrees with the requested one."""
    diff = {k: (v, wanted.get(k)) for k, v in made.items() if wanted.get(k) != v}
    if diff:
        raise CacheError(
            f"{what} made differently ({diff}, as existing -> requested); pass overwrite=True (--overwrite) to "
            "replace it"
        )


def _made_with(path: Path, losses: np.ndarray) -> dict[str, Any]:
    """The header a shard records it was made with; for a shard written before shards recorded it, its dtype."""
    with safe_open(str(path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get("header")
    if not recorded:
        return {"dtype": _LOSS_DTYPE_NAMES[losses.dtype]}
    made = json.loads(recorded)
    made.pop("format", None)
    return made


def repair_cache(directory: str | os.PathLike[str], wanted: CacheManifest) -> list[str]:
    """Make a cache directory safe to resume into; returns a message per change.

    Every shard the manifest lists is re-hashed and parsed; one that is missing, altered, truncated or unreadable
    is dropped from the manifest and its file set aside (`set_aside`), so its samples are scored again. A missing
    manifest is rebuilt from the shard files that parse (sha256 recomputed), for the header of `wanted`; a shard
    made differently is refused, not adopted."""
    directory = Path(directory)
    if not (directory / MANIFEST_NAME).is_file():
        return _rebuild_manifest(directory, wanted) if shard_files(directory) else []
    manifest = read_manifest(directory)
    _refuse_made_differently(f"{directory} already holds a cache", manifest.header(), wanted.header())
    kept, notes = [], []
    for shard in manifest.shards:
        problem = _shard_problem(directory, shard)
        if problem is None:
            kept.append(shard)
            continue
        path = directory / shard.file
        moved = f", moved to {set_aside(path).name}" if path.exists() else ""
        notes.append(f"{problem}{moved}: its {shard.samples} samples are scored again")
    if notes:
        manifest = dataclasses.replace(manifest, shards=[], samples=0, tokens=0, empty_samples=0)
        for shard in kept:
            manifest.add_shard(shard)
        _write_manifest(directory, manifest)
    return notes


def _rebuild_manifest(directory: Path, wanted: CacheManifest) -> list[str]:
    """A new manifest for the shard files of a directory that lost its own (see `repair_cache`)."""
    manifest = dataclasses.replace(wanted, shards=[], samples=0, tokens=0, empty_samples=0)
    notes = []
    for path in shard_files(directory):
        try:
            keys, offsets, losses, _ = _read_shard(path)
        except CorruptShardError as err:
            notes.append(f"{err}, moved to {set_aside(path).name}: its samples are scored again")
            continue
        _refuse_made_differently(f"shard {path} was", _made_with(path, losses), wanted.header())
        empty = int((np.diff(offsets) == 0).sum())
        manifest.add_shard(ShardInfo(path.name, file_sha256(path), int(keys.shape[0]), int(losses.size), empty))
    _write_manifest(directory, manifest)
    return [
        f"{directory / MANIFEST_NAME} was missing: rebuilt from {len(manifest.shards)} shard files "
        f"({manifest.samples} samples)",
        *notes,
    ]


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write (a full disk, a read-only mount) into a CacheWriteError that says what to do."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        raise CacheWriteError(
            f"cannot write {path}: {err}. What was committed before it is intact and the cache can be resumed: "
            "free space (or make the directory writable) and re-run `regate precompute` with `--resume`"
        ) from err


def _write_manifest(directory: Path, manifest: CacheManifest) -> None:
    with _writing(directory / MANIFEST_NAME):
        write_bytes_atomically(directory / MANIFEST_NAME, manifest.to_json().encode("utf-8"))


class ReferenceLossCache:
    """Read-only view of a cache directory: `cache[key]` returns that sample's reference losses (float32).

    In memory it holds only sorted key arrays and spans, about 30 B per sample: the keys' two 8-byte halves (big
    endian, signed int64, sorted together), each sample's start in the cache's token space (the shards' losses
    concatenated in manifest order), its length and its shard; 4 B more in a cache with per-sample visual rows.
    Batch lookups are `searchsorted` over the first half, single-key lookups a scan of one bucket of a table over the
    keys' top bits (1 B per sample); the losses stay in the shard files, memory-mapped. A key stored twice keeps its
    first occurrence in shard order.
    """

    def __init__(self, directory: str | os.PathLike[str], verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self._losses: list[np.ndarray] = []
        self._bases: list[int] = []
        parts: list[_ShardIndex] = []
        for shard in self.manifest.shards:
            parts.append(self._open_shard(shard, verify))
        self.tokens = sum(losses.size for losses in self._losses)  # size of the token space
        self._index(parts)

    def _open_shard(self, shard: ShardInfo, verify: bool) -> _ShardIndex:
        """Check and map one shard; returns its keys, starts in token space, lengths and visual rows."""
        path = self.directory / shard.file
        if not path.is_file():
            raise CorruptShardError(f"shard {path} is listed in {MANIFEST_NAME} but missing")
        if verify:
            actual = file_sha256(path)
            if actual != shard.sha256:
                raise CorruptShardError(
                    f"shard {path} is corrupted: sha256 {actual} != {shard.sha256} recorded in {MANIFEST_NAME}; "
                    "re-run `regate precompute --resume` to rebuild it"
                )
        keys, offsets, losses, visual = _read_shard(path)
        if (visual is None) != (self.manifest.visual_layout is None):
            raise CorruptShardError(
                f"shard {path} {'lacks' if visual is None else 'has'} per-sample visual rows, its manifest says "
                f"{'it has them' if visual is None else 'it has none'}"
            )
        base = sum(array.size for array in self._losses)
        self._bases.append(base)
        self._losses.append(losses)
        starts, lengths = offsets[:-1].astype(np.int64) + base, np.diff(offsets).astype(np.int32)
        return _ShardIndex(keys, starts, lengths, visual)

    def _index(self, parts: list[_ShardIndex]) -> None:
        if len(parts) >= np.iinfo(np.uint16).max:
            raise CacheError(f"{self.directory} has {len(parts)} shards; at most 65534 are supported")
        keys = np.concatenate([p.keys for p in parts]) if parts else np.zeros((0, KEY_BYTES), np.uint8)
        hi, lo = key_halves(keys)
        order = np.lexsort((lo, hi))  # stable: equal keys stay in shard order, so the first one is kept
        hi, lo = hi[order], lo[order]
        first = np.ones(hi.size, dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        order = order[first]
        self._hi, self._lo = hi[first], lo[first]
        self._start = np.concatenate([p.starts for p in parts])[order] if parts else np.zeros(0, np.int64)
        self._length = np.concatenate([p.lengths for p in parts])[order] if parts else np.zeros(0, np.int32)
        shard_of = [np.full(p.keys.shape[0], i, np.uint16) for i, p in enumerate(parts)]
        self._shard = np.concatenate(shard_of)[order] if parts else np.zeros(0, np.uint16)
        # Rows of the keys whose first half has each top-`bits` prefix, about 4 keys a bucket (1 B a sample): a
        # single-key lookup scans one bucket instead of bisecting.
        bits = max(int(self._hi.size).bit_length() - 2, 1)
        self._bucket_shift = 64 - bits
        top = (self._hi.view(np.uint64) ^ np.uint64(_SIGN)) >> np.uint64(self._bucket_shift)  # (hi + _SIGN) >> shift
        bucket = np.searchsorted(top, np.arange((1 << bits) + 1, dtype=np.uint64))
        self._bucket = bucket.astype(np.int32 if self._hi.size < 2**31 else np.int64)
        self._visual = None  # per-sample visual rows, in index order, when the cache records them
        if self.manifest.visual_layout is not None:
            self._visual = np.concatenate([p.visual for p in parts])[order] if parts else np.zeros(0, np.int32)

    @functools.cached_property
    def layout_digest(self) -> str:
        """Identifies the token space (its shards, in order): state aligned to it is only valid for this digest."""
        return hashlib.sha256(",".join(s.sha256 for s in self.manifest.shards).encode()).hexdigest()[:32]

    def _find(self, key: SampleKey) -> int:
        """Row of `key` in the sorted index, -1 when absent."""
        if len(key) != KEY_BYTES:
            return -1
        hi = int.from_bytes(key[:8], "big", signed=True)
        lo = int.from_bytes(key[8:], "big", signed=True)
        his, los, buckets = self._scalar[:3]
        bucket = (hi + _SIGN) >> self._bucket_shift
        for row in range(buckets[bucket], buckets[bucket + 1]):
            if his[row] == hi and los[row] == lo:
                return row
        return -1

    @functools.cached_property
    def _scalar(self) -> tuple[memoryview, ...]:
        """hi, lo, bucket, start, length, shard as memoryviews: one key at a time they index as Python ints, several
        times faster than numpy scalars."""
        return tuple(
            memoryview(getattr(self, f"_{name}")) for name in ("hi", "lo", "bucket", "start", "length", "shard")
        )

    def locate(self, keys: list[SampleKey]) -> np.ndarray:
        """Index rows of a batch of keys (int64 [B], -1 where the cache has no such sample), vectorised."""
        if not keys:
            return np.zeros(0, np.int64)
        if any(len(k) != KEY_BYTES for k in keys):
            raise CacheError(f"sample keys are {KEY_BYTES} bytes")
        hi, lo = key_halves(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES))
        rows = np.minimum(self._hi.searchsorted(hi), max(self._hi.size - 1, 0)).astype(np.int64)
        if self._hi.size == 0:
            return np.full(len(keys), -1, np.int64)
        same_hi = self._hi[rows] == hi
        found = same_hi & (self._lo[rows] == lo)
        for i in np.flatnonzero(same_hi & ~found):  # first-half collisions: rare, resolved one by one
            rows[i] = self._find(keys[i])
            found[i] = rows[i] >= 0
        return np.where(found, rows, -1)

    def spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start in token space, number of losses) of located rows; (-1, 0) where a row is -1."""
        found = rows >= 0
        safe = np.where(found, rows, 0)
        if self._start.size == 0:
            return np.full(rows.shape, -1, np.int64), np.zeros(rows.shape, np.int64)
        return np.where(found, self._start[safe], -1), np.where(found, self._length[safe], 0).astype(np.int64)

    def expected_visual_rows(self, rows: np.ndarray, placeholders: np.ndarray) -> np.ndarray:
        """Int64 [B]: the visual rows each located sample was scored with (its own count, or `placeholders` x the
        cache's rows per placeholder); -1 where a row is -1 or the cache records no count."""
        found = rows >= 0
        if self._visual is not None:
            counts = self._visual[np.where(found, rows, 0)] if self._visual.size else np.zeros(rows.shape, np.int32)
        elif self.manifest.visual_tokens is not None:
            counts = placeholders * self.manifest.visual_tokens
        else:
            counts = np.full(rows.shape, -1)
        return np.where(found, counts, -1).astype(np.int64)

    def losses_block(self, rows: np.ndarray, width: int) -> np.ndarray:
        """float32 [B, width]: each located row's first `width` losses, NaN past its length and where it is -1."""
        out = np.full((rows.size, width), np.nan, dtype=np.float32)
        starts, lengths = self.spans(rows)
        lengths = np.minimum(lengths, width)
        columns = np.arange(width)
        for shard in np.unique(self._shard[rows[rows >= 0]]):
            in_shard = (rows >= 0) & (self._shard[np.maximum(rows, 0)] == shard)
            take = in_shard[:, None] & (columns[None, :] < lengths[:, None])
            local = (starts[:, None] - self._bases[shard] + columns[None, :])[take]
            out[take] = _as_float32(self._losses[shard][local])
        return out

    def __len__(self) -> int:
        return int(self._hi.size)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._find(key) >= 0

    def keys(self) -> Iterator[SampleKey]:
        """Every sample key, in index (sorted) order."""
        halves = np.stack([self._hi, self._lo], axis=1).astype(">i8")
        return (halves[row].tobytes() for row in range(halves.shape[0]))

    def get(self, key: SampleKey) -> torch.Tensor | None:
        """The losses of `key` as float32 [n_targets], or None when the cache has no such sample."""
        row = self._find(key)
        if row < 0:
            return None
        starts, lengths, shards = self._scalar[3:]
        shard = shards[row]
        start = starts[row] - self._bases[shard]
        return torch.from_numpy(_as_float32(self._losses[shard][start : start + lengths[row]]))

    def __getitem__(self, key: SampleKey) -> torch.Tensor:
        losses = self.get(key)
        if losses is None:
            raise MissingReferenceError(
                f"sample {format_key(key)} is not in reference cache {self.directory} "
                f"({len(self)} samples from reference LLM {self.manifest.reference!r}); the cache was built from other "
                "data, another template or tokenizer, or the precompute did not finish"
            )
        return losses

    def all_losses(self) -> torch.Tensor:
        """Every stored loss of every shard, float32, in shard order (for statistics)."""
        return torch.from_numpy(_as_float32(np.concatenate(self._losses))) if self._losses else torch.zeros(0)

    def check_tokenizer(self, fingerprint: str) -> None:
        """Refuse a student whose tokenizer differs from the one the cache was built with."""
        if fingerprint != self.manifest.tokenizer_fingerprint:
            raise TokenizerMismatchError(
                f"reference cache {self.directory} was built with tokenizer fingerprint "
                f"{self.manifest.tokenizer_fingerprint}, the student's tokenizer has {fingerprint}; per-token losses "
                "only line up when both tokenizers are identical"
            )

    def verify(self) -> list[str]:
        """Re-hash and parse every shard (`verify_cache`); a message per problem (empty when all is well)."""
        return verify_cache(self.directory, self.manifest)


class ReferenceLossCacheWriter:
    """Appends samples to a cache directory shard by shard; every committed shard is immediately readable.

    Re-opening an existing directory with the same header continues it (its keys are skipped), which is what a
    resumed precompute needs. A directory made for another reference LLM, tokenizer, mode or dtype, or one whose
    shards have lost their manifest (see `repair_cache`), is refused unless `overwrite=True`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        reference: str,
        tokenizer_fingerprint: str,
        reference_mode: str,
        dtype: str = "float16",
        visual_tokens: int | None = None,
        visual_layout: dict[str, Any] | None = None,
        shard_samples: int = 4096,
        shard_prefix: str = "",
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise CacheError(f"cache dtype {dtype!r} is not one of {list(DTYPES)}")
        if shard_samples < 1:
            raise CacheError(f"shard_samples must be >= 1, got {shard_samples}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_samples = shard_samples
        self.shard_prefix = shard_prefix
        wanted = CacheManifest(
            reference=reference,
            tokenizer_fingerprint=tokenizer_fingerprint,
            reference_mode=reference_mode,
            dtype=dtype,
            visual_tokens=visual_tokens,
            visual_layout=visual_layout,
            extra=dict(extra or {}),
        )
        manifest_path = self.directory / MANIFEST_NAME
        if manifest_path.exists() and not overwrite:
            existing = read_manifest(self.directory)
            _refuse_made_differently(f"{self.directory} already holds a cache", existing.header(), wanted.header())
            self.manifest = existing
        else:
            if overwrite:
                for stale in shard_files(self.directory):
                    stale.unlink()
            check_not_orphaned(self.directory)
            self.manifest = wanted
            self._write_manifest()
        self._known: set[SampleKey] = set(committed_keys(self.directory, self.manifest))
        self._pending: list[tuple[SampleKey, torch.Tensor, int]] = []

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def add(self, key: SampleKey, losses: torch.Tensor | np.ndarray, visual_rows: int | None = None) -> None:
        """Queue one sample's per-target losses (and, in a cache with per-sample visual rows, the rows the student
        splices into it); a shard is committed every `shard_samples` samples."""
        if len(key) != KEY_BYTES:
            raise CacheError(f"sample keys are {KEY_BYTES} bytes, got {len(key)}")
        if key in self._known:
            return
        values = torch.as_tensor(losses, dtype=torch.float32).reshape(-1)
        if not torch.isfinite(values).all():
            raise CacheError(f"sample {format_key(key)} has non-finite reference losses")
        per_sample = self.manifest.visual_layout is not None
        if per_sample != (visual_rows is not None) or (visual_rows is not None and visual_rows < 0):
            want = "its visual rows (>= 0)" if per_sample else "no visual rows (the cache has one count for all)"
            raise CacheError(f"sample {format_key(key)}: this cache records {want}, got {visual_rows!r}")
        self._known.add(key)
        self._pending.append((key, values, visual_rows or 0))
        if len(self._pending) >= self.shard_samples:
            self.flush()

    def flush(self) -> None:
        """Commit queued samples as one shard, then the manifest that lists it."""
        if not self._pending:
            return
        keys = np.frombuffer(b"".join(k for k, _, _ in self._pending), dtype=np.uint8).reshape(-1, KEY_BYTES)
        lengths = torch.tensor([0] + [v.numel() for _, v, _ in self._pending], dtype=torch.int64)
        tensors = {
            "keys": torch.tensor(keys),
            "offsets": torch.cumsum(lengths, 0),
            "losses": torch.cat([v for _, v, _ in self._pending]).to(DTYPES[self.manifest.dtype]),
        }
        if self.manifest.visual_layout is not None:
            tensors[VISUAL_ROWS] = torch.tensor([rows for _, _, rows in self._pending], dtype=torch.int32)
        losses = tensors["losses"]
        name = self._next_shard_name()
        # One metadata key: safetensors writes several in a per-process random order, and a shard's bytes (so its
        # sha256, and the layout digest of every state aligned to the cache) must depend on its content alone.
        metadata = {"header": json.dumps({"format": CACHE_FORMAT, **self.manifest.header()}, sort_keys=True)}
        with _writing(self.directory / name), replaced_on_success(self.directory / name) as staging:
            save_file(tensors, staging, metadata=metadata)
            sha = file_sha256(staging)
        empty = sum(1 for _, v, _ in self._pending if v.numel() == 0)
        self.manifest.add_shard(ShardInfo(name, sha, len(self._pending), losses.numel(), empty))
        self._pending = []
        self._write_manifest()

    def absorb(self, part: str | os.PathLike[str]) -> None:
        """Move the committed shards of another cache directory with the same header into this one.

        Idempotent and safe to interrupt: a shard is linked in under a new name, then listed in the manifest, and
        a shard already listed (same sha256) is skipped, so re-running after a crash never duplicates one.
        """
        self.flush()
        part = Path(part)
        other = read_manifest(part)
        if other.header() != self.manifest.header():
            raise CacheError(f"{part} was made differently from {self.directory} and cannot be merged into it")
        merged = {shard.sha256 for shard in self.manifest.shards}
        for shard in other.shards:
            if shard.sha256 in merged:
                continue
            source = part / shard.file
            if not source.is_file():
                raise CacheError(f"{source} is listed in {part / MANIFEST_NAME} but missing")
            name = self._next_shard_name()
            staging = self.directory / f".{name}.tmp"
            with _writing(self.directory / name):
                staging.unlink(missing_ok=True)
                os.link(source, staging)
                os.replace(staging, self.directory / name)
            self._known.update(_shard_keys(self.directory / name))
            self.manifest.add_shard(ShardInfo(name, shard.sha256, shard.samples, shard.tokens, shard.empty))
            merged.add(shard.sha256)
            self._write_manifest()

    def _next_shard_name(self) -> str:
        """The first shard name, counting on from the number of listed shards, that the manifest does not list."""
        listed = {shard.file for shard in self.manifest.shards}
        number = len(self.manifest.shards)
        while (name := f"shard-{self.shard_prefix}{number:05d}.safetensors") in listed:
            number += 1
        return name

    def _write_manifest(self) -> None:
        _write_manifest(self.directory, self.manifest)

    def close(self) -> ReferenceLossCache:
        """Commit what is queued and open the finished cache for reading."""
        self.flush()
        return ReferenceLossCache(self.directory)

    def __enter__(self) -> ReferenceLossCacheWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.flush()
