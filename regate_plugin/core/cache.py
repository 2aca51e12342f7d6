"""`ReferenceLossCache`: an on-disk, content-addressed store of per-answer-token reference losses.

Layout of a cache directory::

    manifest.json              reference, tokenizer fingerprint, visual mode, dtype, counts, and every shard's sha256
    shard-<prefix><n>.safetensors   keys uint8 [N, 16], offsets int64 [N + 1], losses <dtype> [T]

Row i of a shard holds the losses of sample keys[i] in losses[offsets[i]:offsets[i + 1]], one value per supervised
target (answer-token ordinal order). Shards and the manifest are written to a temporary name and renamed, so a
reader never sees a half-written file. Opening a cache checks every shard's sha256 once and indexes the keys in
sorted arrays; a lookup then reads only that sample's slice through a memory map.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .dtypes import DTYPES
from .errors import UserError
from .files import file_sha256, replaced_on_success, write_bytes_atomically
from .keys import KEY_BYTES, SampleKey, format_key

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "regate-reference-cache"
CACHE_VERSION = 1


class CacheError(UserError, RuntimeError):
    """The reference cache cannot be used as asked."""


class CorruptShardError(CacheError):
    """A shard's bytes do not match the sha256 recorded in the manifest, or it cannot be parsed."""


class TokenizerMismatchError(CacheError):
    """The cache was built with a tokenizer other than the student's."""


class MissingReferenceError(CacheError, LookupError):
    """A sample has no entry in the cache."""


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
    visual_tokens: int | None = None
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
            if raw.get("version") != CACHE_VERSION:
                raise CacheError(
                    f"{source} has cache format version {raw.get('version')}, this plugin reads {CACHE_VERSION}"
                )
            if "teacher" in raw and "reference" not in raw:  # its older name, in caches written before the rename
                raw["reference"] = raw.pop("teacher")
            raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise CacheError(f"{source} is not a valid cache manifest: {err}") from err

    def header(self) -> dict[str, Any]:
        """The fields that say what the losses mean (not how many there are)."""
        return {
            k: getattr(self, k)
            for k in ("reference", "tokenizer_fingerprint", "reference_mode", "dtype", "visual_tokens")
        }


def read_manifest(directory: str | os.PathLike[str]) -> CacheManifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"{Path(directory)} is not a ReGATE reference cache: {MANIFEST_NAME} is missing")
    return CacheManifest.from_json(path.read_text(encoding="utf-8"), path)


def _shard_keys(path: Path) -> list[SampleKey]:
    with safe_open(str(path), framework="pt") as handle:
        keys = handle.get_tensor("keys").numpy()
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


class ReferenceLossCache:
    """Read-only view of a cache directory: `cache[key]` returns that sample's reference losses (float32).

    In memory it holds only sorted key arrays and spans, about 30 B per sample: the keys' two 8-byte halves (big
    endian, signed int64, sorted together), each sample's start in the cache's token space (the shards' losses
    concatenated in manifest order), its length and its shard. Lookups are `searchsorted` over the first half; the
    losses stay in the shard files, memory-mapped. A key stored twice keeps its first occurrence in shard order.
    """

    def __init__(self, directory: str | os.PathLike[str], verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self._losses: list[np.ndarray] = []
        self._bases: list[int] = []
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for shard in self.manifest.shards:
            parts.append(self._open_shard(shard, verify))
        self.tokens = sum(losses.size for losses in self._losses)  # size of the token space
        self._index(parts)

    def _open_shard(self, shard: ShardInfo, verify: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check and map one shard; returns its (keys, starts in token space, lengths)."""
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
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = handle.get_tensor("keys").numpy()
                offsets = handle.get_tensor("offsets").numpy()
            losses = _map_tensor(path, "losses")
        except Exception as err:  # safetensors raises several types on a damaged header
            raise CorruptShardError(f"shard {path} cannot be read: {err}") from err
        if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or offsets.shape != (keys.shape[0] + 1,):
            raise CorruptShardError(
                f"shard {path} has keys {keys.shape} and offsets {offsets.shape}: not a cache shard"
            )
        if offsets[0] != 0 or offsets[-1] != losses.size or (np.diff(offsets) < 0).any():
            raise CorruptShardError(f"shard {path} has offsets that do not cover its {losses.size} losses")
        base = sum(array.size for array in self._losses)
        self._bases.append(base)
        self._losses.append(losses)
        return keys, offsets[:-1].astype(np.int64) + base, np.diff(offsets).astype(np.int32)

    def _index(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        if len(parts) >= np.iinfo(np.uint16).max:
            raise CacheError(f"{self.directory} has {len(parts)} shards; at most 65534 are supported")
        keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, KEY_BYTES), np.uint8)
        hi, lo = key_halves(keys)
        order = np.lexsort((lo, hi))  # stable: equal keys stay in shard order, so the first one is kept
        hi, lo = hi[order], lo[order]
        first = np.ones(hi.size, dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        order = order[first]
        self._hi, self._lo = hi[first], lo[first]
        self._start = np.concatenate([p[1] for p in parts])[order] if parts else np.zeros(0, np.int64)
        self._length = np.concatenate([p[2] for p in parts])[order] if parts else np.zeros(0, np.int32)
        shard_of = [np.full(p[0].shape[0], i, np.uint16) for i, p in enumerate(parts)]
        self._shard = np.concatenate(shard_of)[order] if parts else np.zeros(0, np.uint16)

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
        row = int(self._hi.searchsorted(hi))
        while row < self._hi.size and self._hi[row] == hi:  # more than one row only if first halves collide
            if self._lo[row] == lo:
                return row
            row += 1
        return -1

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
        shard = int(self._shard[row])
        start = int(self._start[row]) - self._bases[shard]
        return torch.from_numpy(_as_float32(self._losses[shard][start : start + int(self._length[row])]))

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
        """Re-hash every shard; return a message per problem (empty when all is well)."""
        problems = []
        for shard in self.manifest.shards:
            path = self.directory / shard.file
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif (actual := file_sha256(path)) != shard.sha256:
                problems.append(f"{path}: sha256 {actual} != {shard.sha256}")
        return problems


class ReferenceLossCacheWriter:
    """Appends samples to a cache directory shard by shard; every committed shard is immediately readable.

    Re-opening an existing directory with the same header continues it (its keys are skipped), which is what a
    resumed precompute needs. A directory made for another reference LLM, tokenizer, mode or dtype is refused unless
    `overwrite=True`.
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
            extra=dict(extra or {}),
        )
        manifest_path = self.directory / MANIFEST_NAME
        if manifest_path.exists() and not overwrite:
            existing = read_manifest(self.directory)
            if existing.header() != wanted.header():
                diff = {k: (existing.header()[k], v) for k, v in wanted.header().items() if existing.header()[k] != v}
                raise CacheError(
                    f"{self.directory} already holds a cache made differently ({diff}, as existing -> requested); "
                    "pass overwrite=True (--overwrite) to replace it"
                )
            self.manifest = existing
        else:
            for stale in self.directory.glob("shard-*.safetensors"):
                stale.unlink()
            self.manifest = wanted
            self._write_manifest()
        self._known: set[SampleKey] = set(committed_keys(self.directory, self.manifest))
        self._pending: list[tuple[SampleKey, torch.Tensor]] = []

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def add(self, key: SampleKey, losses: torch.Tensor | np.ndarray) -> None:
        """Queue one sample's per-target losses; a shard is committed every `shard_samples` samples."""
        if len(key) != KEY_BYTES:
            raise CacheError(f"sample keys are {KEY_BYTES} bytes, got {len(key)}")
        if key in self._known:
            return
        values = torch.as_tensor(losses, dtype=torch.float32).reshape(-1)
        if not torch.isfinite(values).all():
            raise CacheError(f"sample {format_key(key)} has non-finite reference losses")
        self._known.add(key)
        self._pending.append((key, values))
        if len(self._pending) >= self.shard_samples:
            self.flush()

    def flush(self) -> None:
        """Commit queued samples as one shard, then the manifest that lists it."""
        if not self._pending:
            return
        keys = torch.tensor(np.frombuffer(b"".join(k for k, _ in self._pending), dtype=np.uint8).reshape(-1, KEY_BYTES))
        lengths = torch.tensor([0] + [v.numel() for _, v in self._pending], dtype=torch.int64)
        offsets = torch.cumsum(lengths, 0)
        losses = torch.cat([v for _, v in self._pending]).to(DTYPES[self.manifest.dtype])
        name = f"shard-{self.shard_prefix}{len(self.manifest.shards):05d}.safetensors"
        with replaced_on_success(self.directory / name) as staging:
            save_file({"keys": keys, "offsets": offsets, "losses": losses}, staging, metadata={"format": CACHE_FORMAT})
            sha = file_sha256(staging)
        empty = sum(1 for _, v in self._pending if v.numel() == 0)
        self.manifest.shards.append(ShardInfo(name, sha, len(self._pending), losses.numel(), empty))
        self.manifest.samples += len(self._pending)
        self.manifest.tokens += losses.numel()
        self.manifest.empty_samples += empty
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
            name = f"shard-{self.shard_prefix}{len(self.manifest.shards):05d}.safetensors"
            staging = self.directory / f".{name}.tmp"
            staging.unlink(missing_ok=True)
            os.link(source, staging)
            os.replace(staging, self.directory / name)
            self._known.update(_shard_keys(self.directory / name))
            self.manifest.shards.append(ShardInfo(name, shard.sha256, shard.samples, shard.tokens, shard.empty))
            self.manifest.samples += shard.samples
            self.manifest.tokens += shard.tokens
            self.manifest.empty_samples += shard.empty
            merged.add(shard.sha256)
            self._write_manifest()

    def _write_manifest(self) -> None:
        write_bytes_atomically(self.directory / MANIFEST_NAME, self.manifest.to_json().encode("utf-8"))

    def close(self) -> ReferenceLossCache:
        """Commit what is queued and open the finished cache for reading."""
        self.flush()
        return ReferenceLossCache(self.directory)

    def __enter__(self) -> ReferenceLossCacheWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.flush()
