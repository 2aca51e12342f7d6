"""`ReferenceLossCacheWriter`: appends samples to a cache directory shard by shard, each committed shard at once
readable; and `repair_cache`, what a resumed precompute runs first on a directory it cannot yet trust.

Nothing here deletes a shard it did not write unless told to overwrite: a shard that fails its check on repair is
renamed to `<name>.corrupt`, and a directory whose shards lost their manifest is refused, or rebuilt by
`repair_cache`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from ..core.dtypes import DTYPES
from ..core.files import file_sha256, replaced_on_success
from ..core.keys import KEY_BYTES, SampleKey, format_key
from .errors import CacheError, CacheWriteError, CorruptShardError
from .index import ReferenceLossCache
from .manifest import MANIFEST_NAME, CacheManifest, Provenance, ShardInfo, read_manifest, shard_problem, write_manifest
from .shards import describe_shards, made_with, read_shard, set_aside, shard_files, shard_keys, shard_name, write_shard


def check_not_orphaned(directory: str | os.PathLike[str]) -> None:
    """Refuse a directory that holds shard files but no manifest (the manifest was lost: its shards are work)."""
    found = shard_files(directory)
    if found and not (Path(directory) / MANIFEST_NAME).is_file():
        raise CacheError(
            f"{Path(directory)} holds {describe_shards(found)} but no {MANIFEST_NAME}: "
            "`regate precompute --resume` rebuilds the manifest from them and continues; `--overwrite` replaces them"
        )


def committed_keys(directory: str | os.PathLike[str], manifest: CacheManifest | None = None) -> list[SampleKey]:
    """The sample keys of every shard a cache directory's manifest lists (no hashing, no losses read)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    return [key for shard in manifest.shards for key in shard_keys(directory / shard.file)]


def _refuse_made_differently(what: str, made: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise when the header a cache or a shard was made with (`made`) disagrees with the requested one."""
    diff = {k: (v, wanted.get(k)) for k, v in made.items() if wanted.get(k) != v}
    if diff:
        raise CacheError(
            f"{what} made differently ({diff}, as existing -> requested); pass overwrite=True (--overwrite) to "
            "replace it"
        )


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
        write_manifest(directory, manifest)


def _emptied(manifest: CacheManifest) -> CacheManifest:
    return dataclasses.replace(manifest, shards=[], samples=0, tokens=0, empty_samples=0)


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
        problem = shard_problem(directory, shard)
        if problem is None:
            kept.append(shard)
            continue
        path = directory / shard.file
        moved = f", moved to {set_aside(path).name}" if path.exists() else ""
        notes.append(f"{problem}{moved}: its {shard.samples} samples are scored again")
    if notes:
        manifest = _emptied(manifest)
        for shard in kept:
            manifest.add_shard(shard)
        _write_manifest(directory, manifest)
    return notes


def _rebuild_manifest(directory: Path, wanted: CacheManifest) -> list[str]:
    """A new manifest for the shard files of a directory that lost its own (see `repair_cache`)."""
    manifest = _emptied(wanted)
    notes = []
    for path in shard_files(directory):
        try:
            keys, offsets, losses, _ = read_shard(path)
            made = made_with(path)
        except CorruptShardError as err:
            notes.append(f"{err}, moved to {set_aside(path).name}: its samples are scored again")
            continue
        _refuse_made_differently(f"shard {path} was", made, wanted.header())
        empty = int((np.diff(offsets) == 0).sum())
        manifest.add_shard(ShardInfo(path.name, file_sha256(path), int(keys.shape[0]), int(losses.size), empty))
    _write_manifest(directory, manifest)
    return [
        f"{directory / MANIFEST_NAME} was missing: rebuilt from {len(manifest.shards)} shard files "
        f"({manifest.samples} samples)",
        *notes,
    ]


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
        overwrite: bool = False,
        provenance: Provenance | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise CacheError(f"cache dtype {dtype!r} is not one of {list(DTYPES)}")
        if shard_samples < 1:
            raise CacheError(f"shard_samples must be >= 1, got {shard_samples}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_samples = shard_samples
        wanted = CacheManifest(
            reference=reference,
            tokenizer_fingerprint=tokenizer_fingerprint,
            reference_mode=reference_mode,
            dtype=dtype,
            visual_tokens=visual_tokens,
            visual_layout=visual_layout,
            provenance=provenance,
        )
        if (self.directory / MANIFEST_NAME).exists() and not overwrite:
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

    @classmethod
    def like(cls, directory: str | os.PathLike[str], manifest: CacheManifest, overwrite: bool = False):
        """A writer into `directory` for the header and provenance of `manifest`."""
        return cls(directory, **manifest.header(), provenance=manifest.provenance, overwrite=overwrite)

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
        name = self._next_shard_name()
        visual = self.manifest.visual_layout is not None
        with _writing(self.directory / name), replaced_on_success(self.directory / name) as staging:
            tokens = write_shard(staging, self._pending, DTYPES[self.manifest.dtype], self.manifest.header(), visual)
            sha = file_sha256(staging)
        empty = sum(1 for _, v, _ in self._pending if v.numel() == 0)
        self.manifest.add_shard(ShardInfo(name, sha, len(self._pending), tokens, empty))
        self._pending = []
        self._write_manifest()

    def record(self, provenance: Provenance) -> None:
        """Replace the provenance the manifest records (how the samples were made)."""
        self.manifest.provenance = provenance
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
            self._known.update(shard_keys(self.directory / name))
            self.manifest.add_shard(ShardInfo(name, shard.sha256, shard.samples, shard.tokens, shard.empty))
            merged.add(shard.sha256)
            self._write_manifest()

    def _next_shard_name(self) -> str:
        """The first shard name, counting on from the number of listed shards, that the manifest does not list."""
        listed = {shard.file for shard in self.manifest.shards}
        number = len(self.manifest.shards)
        while (name := shard_name(number)) in listed:
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
