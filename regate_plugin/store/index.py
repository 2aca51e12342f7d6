"""The read side of the reference store: a sorted index over every sample's key, and its losses in one token space.

Every store (on disk, `ReferenceLossCache`, or in memory, `InMemoryReferenceStore`) is an `IndexedStore`: the
keys' two 8-byte halves (big endian, signed int64) sorted together, each sample's address (where its losses are in
the one array that holds every shard's), its length, its shard, and its visual rows when the store records them
per sample; about 31 B a sample. The losses stay where they are: the shard files, memory-mapped side by side into
one range of virtual memory (`SideBySide`), or one array in memory. The token space (what `spans` and `tokens`
describe, and the EMA is aligned to) is the shards' losses end to end; an address is a sample's start there plus
its shard's gap. Batch lookups are one `searchsorted`, a batch read one gather at addresses computed for the whole
batch, whatever the number of shards. A key stored twice keeps its first occurrence in token-space order.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.files import file_sha256
from ..core.keys import KEY_BYTES, SampleKey, format_key
from .errors import CacheError, CorruptShardError, MissingReferenceError, TokenizerMismatchError
from .manifest import MANIFEST_NAME, CacheManifest, ShardInfo, read_manifest, verify_cache
from .shards import SideBySide, as_float32, read_shard

_SIGN = 1 << 63  # adding it maps signed int64 order onto unsigned order
_LOW = (1 << 64) - 1


def key_halves(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 16] keys -> their two 8-byte halves as big-endian signed int64 (the index's sort order)."""
    halves = np.ascontiguousarray(keys, dtype=np.uint8).view(">i8").reshape(-1, 2).astype(np.int64)
    return halves[:, 0].copy(), halves[:, 1].copy()


class IndexedStore:
    """Reference losses by sample key over one token space; see the module docstring. Subclasses build the index
    with `_index` and say what identifies their token space (`layout_digest`)."""

    directory: Path | None  # where the losses live; None for a store in memory
    manifest: CacheManifest
    tokens: int  # size of the token space

    def _index(
        self,
        keys: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        shard_of: np.ndarray,
        visual: np.ndarray | None,
        shard_tokens: list[int],
        space: np.ndarray,
        gaps: list[int],
    ) -> None:
        """Index samples (keys uint8 [N, 16], starts within their shard, lengths, shard numbers, visual rows or None,
        in token-space order) of shards holding `shard_tokens` losses each; shard k's losses are `space` from
        element `gaps[k]` + its start in the token space."""
        if len(shard_tokens) >= np.iinfo(np.uint16).max:
            raise CacheError(f"{self._where} has {len(shard_tokens)} shards; at most 65534 are supported")
        self._space, self._gaps = space, np.asarray(gaps, np.int64)
        bases = np.cumsum([0, *shard_tokens[:-1]]).astype(np.int64)
        self.tokens = int(sum(shard_tokens))
        self._shard_spans = [(int(b) + g, n) for b, g, n in zip(bases, gaps, shard_tokens)]  # in `space`
        hi, lo = key_halves(keys)
        order = np.lexsort((lo, hi))  # stable: equal keys stay in token-space order, so the first one is kept
        hi, lo = hi[order], lo[order]
        first = np.ones(hi.size, dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        order = order[first]
        self._hi, self._lo = hi[first], lo[first]
        self._shard = shard_of.astype(np.uint16)[order]
        self._address = starts.astype(np.int64)[order] + (bases + self._gaps)[self._shard]  # in `space`
        self._length = lengths.astype(np.int32)[order]
        self._visual = None if visual is None else visual.astype(np.int32)[order]
        # Rows of the keys whose first half has each top-`bits` prefix, about 4 keys a bucket (1 B a sample): a
        # single-key lookup scans one bucket instead of bisecting.
        bits = max(int(self._hi.size).bit_length() - 2, 1)
        self._bucket_shift = 64 - bits
        top = (self._hi.view(np.uint64) ^ np.uint64(_SIGN)) >> np.uint64(self._bucket_shift)  # (hi + _SIGN) >> shift
        bucket = np.searchsorted(top, np.arange((1 << bits) + 1, dtype=np.uint64))
        self._bucket = bucket.astype(np.int32 if self._hi.size < 2**31 else np.int64)
        # The same arrays as memoryviews: one key at a time they index as Python ints, several times faster than
        # numpy scalars.
        self._his, self._los = memoryview(self._hi.view(np.uint64)), memoryview(self._lo.view(np.uint64))
        self._buckets = memoryview(self._bucket)
        self._bfloat16 = space.dtype == np.uint16  # stored as bfloat16 bits, converted by `as_float32`
        self._addresses, self._lengths = memoryview(self._address), memoryview(self._length)

    @property
    def _where(self) -> str:
        return f"reference cache {self.directory}" if self.directory is not None else "in-memory reference store"

    @property
    def layout_digest(self) -> str:
        """Identifies the token space: state aligned to it is only valid for this digest."""
        raise NotImplementedError

    def _find(self, key: SampleKey) -> int:
        """Row of `key` in the sorted index, -1 when absent."""
        if len(key) != KEY_BYTES:
            return -1
        value = int.from_bytes(key, "big")
        hi, lo = value >> 64, value & _LOW  # the halves unsigned, as `_his` and `_los` read them
        his, los, buckets = self._his, self._los, self._buckets
        bucket = (hi ^ _SIGN) >> self._bucket_shift  # the sorted (signed) order
        for row in range(buckets[bucket], buckets[bucket + 1]):
            if his[row] == hi and los[row] == lo:
                return row
        return -1

    def locate(self, keys: Sequence[SampleKey]) -> np.ndarray:
        """Index rows of a batch of keys (int64 [B], -1 where the store has no such sample), vectorised."""
        if not keys:
            return np.zeros(0, np.int64)
        if any(len(k) != KEY_BYTES for k in keys):
            raise CacheError(f"sample keys are {KEY_BYTES} bytes")
        if self._hi.size == 0:
            return np.full(len(keys), -1, np.int64)
        hi, lo = key_halves(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES))
        rows = np.minimum(self._hi.searchsorted(hi), self._hi.size - 1).astype(np.int64)
        same_hi = self._hi[rows] == hi
        found = same_hi & (self._lo[rows] == lo)
        for i in np.flatnonzero(same_hi & ~found):  # first-half collisions: rare, resolved one by one
            rows[i] = self._find(keys[i])
            found[i] = rows[i] >= 0
        return np.where(found, rows, -1)

    def spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start in token space, number of losses) of located rows; (-1, 0) where a row is -1."""
        found = rows >= 0
        if self._address.size == 0:
            return np.full(rows.shape, -1, np.int64), np.zeros(rows.shape, np.int64)
        safe = np.where(found, rows, 0)
        starts = self._address[safe] - self._gaps[self._shard[safe]]
        return np.where(found, starts, -1), np.where(found, self._length[safe], 0).astype(np.int64)

    def expected_visual_rows(self, rows: np.ndarray, placeholders: np.ndarray) -> np.ndarray:
        """Int64 [B]: the visual rows each located sample was scored with (its own count, or `placeholders` x the
        store's rows per placeholder); -1 where a row is -1 or the store records no count."""
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
        if self._address.size == 0:
            return out
        found = rows >= 0
        safe = np.where(found, rows, 0)
        take = np.arange(width) < np.where(found, self._length[safe], 0)[:, None]
        addresses = self._address[safe][:, None] + np.arange(width)
        out[take] = as_float32(self._space[addresses[take]])
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
        """The losses of `key` as float32 [n_targets], or None when the store has no such sample."""
        row = self._find(key)
        if row < 0:
            return None
        address = self._addresses[row]
        values = self._space[address : address + self._lengths[row]]
        return torch.from_numpy(as_float32(values) if self._bfloat16 else values.astype(np.float32))

    def __getitem__(self, key: SampleKey) -> torch.Tensor:
        losses = self.get(key)
        if losses is None:
            raise MissingReferenceError(
                f"sample {format_key(key)} is not in {self._where} ({len(self)} samples from reference LLM "
                f"{self.manifest.reference!r}); the cache was built from other data, another template or "
                "tokenizer, or the precompute did not finish"
            )
        return losses

    def check_tokenizer(self, fingerprint: str) -> None:
        """Refuse a student whose tokenizer differs from the one the losses were computed with."""
        if fingerprint != self.manifest.tokenizer_fingerprint:
            raise TokenizerMismatchError(
                f"{self._where} was built with tokenizer fingerprint {self.manifest.tokenizer_fingerprint}, the "
                f"student's tokenizer has {fingerprint}; per-token losses only line up when both tokenizers are "
                "identical"
            )


class ReferenceLossCache(IndexedStore):
    """Read-only view of a cache directory: `cache[key]` returns that sample's reference losses (float32).

    Opening it checks every shard's sha256 once (unless `verify=False`) and indexes the keys; the losses stay in the
    shard files, memory-mapped, and a lookup reads only that sample's slice."""

    def __init__(self, directory: str | os.PathLike[str], verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        opened = [self._open_shard(shard, verify) for shard in self.manifest.shards]
        counts = [keys.shape[0] for keys, _, _ in opened]
        side = SideBySide([self.directory / shard.file for shard in self.manifest.shards])
        per_sample = self.manifest.visual_layout is not None
        self._index(
            np.concatenate([k for k, _, _ in opened]) if opened else np.zeros((0, KEY_BYTES), np.uint8),
            np.concatenate([o[:-1] for _, o, _ in opened]) if opened else np.zeros(0),
            np.concatenate([np.diff(o) for _, o, _ in opened]) if opened else np.zeros(0),
            np.repeat(np.arange(len(opened)), counts),
            (np.concatenate([v for _, _, v in opened]) if opened else np.zeros(0)) if per_sample else None,
            [int(o[-1]) for _, o, _ in opened],
            side.array,
            side.gaps,
        )

    def _open_shard(self, shard: ShardInfo, verify: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Check one shard: its keys, offsets and visual rows."""
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
        keys, offsets, _, visual = read_shard(path)
        if (visual is None) != (self.manifest.visual_layout is None):
            raise CorruptShardError(
                f"shard {path} {'lacks' if visual is None else 'has'} per-sample visual rows, its manifest says "
                f"{'it has them' if visual is None else 'it has none'}"
            )
        return keys, offsets, visual

    @functools.cached_property
    def layout_digest(self) -> str:
        """Identifies the token space (its shards, in order): state aligned to it is only valid for this digest."""
        return hashlib.sha256(",".join(s.sha256 for s in self.manifest.shards).encode()).hexdigest()[:32]

    def all_losses(self) -> torch.Tensor:
        """Every stored loss of every shard, float32, in shard order (for statistics)."""
        spans = [self._space[a : a + n] for a, n in self._shard_spans]
        return torch.from_numpy(as_float32(np.concatenate(spans))) if spans else torch.zeros(0)

    def verify(self) -> list[str]:
        """Re-hash and parse every shard (`verify_cache`); a message per problem (empty when all is well)."""
        return verify_cache(self.directory, self.manifest)
