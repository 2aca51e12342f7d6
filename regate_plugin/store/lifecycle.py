"""What `regate precompute` does to its output directory: the lock, the ranks' `parts/`, the checks before it
writes, repair on resume, the merge, and the clean-up.

Layout while a run is going::

    OUT/precompute.lock          who is writing (host, pid, start, command); flock-ed for the whole run
    OUT/manifest.json, shard-*   the merged cache
    OUT/parts/rank-NNNNN/        each rank's committed shards, moved into OUT by rank 0 at the end

Nothing here deletes or replaces a file the precompute did not make unless `--overwrite` asks it to: a
`manifest.json` that is not a cache's, or anything in `parts/` other than rank directories of cache files, stops
the run naming that path.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.keys import SampleKey
from .errors import CacheError
from .manifest import MANIFEST_NAME, CacheManifest, read_manifest
from .shards import SET_ASIDE_SUFFIX, shard_files
from .writer import ReferenceLossCacheWriter, check_not_orphaned, committed_keys, repair_cache

logger = logging.getLogger(__name__)
PARTS_DIR = "parts"
LOCK_NAME = "precompute.lock"
_RANK_DIR = re.compile(r"rank-\d{5}")
_OURS_IN_PART = re.compile(
    rf"{re.escape(MANIFEST_NAME)}|shard-\d+\.safetensors({re.escape(SET_ASIDE_SUFFIX)}(\.\d+)?)?|\..+\.tmp"
)  # a part's manifest, its shards (or set aside), and the staging files of a write that was killed


class CacheLockedError(CacheError):
    """Another `regate precompute` is writing into the same directory."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a cache directory's lock."""

    host: str
    pid: int
    started: str
    command: str

    @classmethod
    def me(cls) -> LockHolder:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        return cls(socket.gethostname(), os.getpid(), started, " ".join(sys.argv))

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"


def _read_holder(fd: int) -> LockHolder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    try:
        return LockHolder(**json.loads(text))
    except (json.JSONDecodeError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def locked(directory: str | os.PathLike[str]) -> Iterator[LockHolder]:
    """Hold `directory`'s precompute lock for the block; a second writer is refused at once, naming the holder.

    The lock is an flock on `precompute.lock`, so the kernel releases it when its process dies; the file records the
    holder. A lock file left by a run that is gone (killed on this host: the flock is free and its pid is dead) is
    taken over with a warning; one left by a run on another host is refused, since its pid cannot be checked. A
    directory the lock had to create is removed again when the run leaves nothing else in it."""
    path = Path(directory) / LOCK_NAME
    created = not path.parent.exists()  # removed again at the end if the run left nothing in it
    path.parent.mkdir(parents=True, exist_ok=True)
    me = LockHolder.me()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CacheLockedError(
                f"{path.parent} is being written by another regate precompute ({holder or 'holder not recorded yet'});"
                " wait for it to finish, or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # released and removed between our open and our flock
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _read_holder(fd)
        if previous is not None:
            if previous.host != me.host:
                raise CacheLockedError(
                    f"{path} records a regate precompute on another host ({previous}); if that run is gone, remove "
                    f"{path} and run again"
                )
            if previous.pid != me.pid and _alive(previous.pid):
                raise CacheLockedError(f"{path.parent} is being written by another regate precompute ({previous})")
            logger.warning("taking over %s from a run that is gone (%s)", path, previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(asdict(me)).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield me
    finally:  # removed while still flock-ed: a run that opened the file meanwhile sees another inode and retries
        path.unlink(missing_ok=True)
        os.close(fd)
        if created and not any(path.parent.iterdir()):
            path.parent.rmdir()


def part_dirs(out: Path) -> list[Path]:
    """Every rank's part directory under `out/parts` (of any earlier world size)."""
    parts = out / PARTS_DIR
    return sorted(p for p in parts.iterdir() if p.is_dir()) if parts.is_dir() else []


def _refuse_foreign(out: Path) -> None:
    """Stop before touching `out` when its manifest or anything under `parts/` was not made by a precompute."""
    fix = f"move it away, or pass --overwrite to replace what {out} holds"
    if (out / MANIFEST_NAME).exists():
        try:
            read_manifest(out)
        except CacheError as err:
            raise CacheError(f"{err}: the precompute did not make it; {fix}") from None
    parts = out / PARTS_DIR
    if parts.exists() and not parts.is_dir():
        raise CacheError(f"{parts} is not a precompute's parts folder; {fix}")
    for entry in sorted(parts.iterdir()) if parts.is_dir() else []:
        if not (entry.is_dir() and not entry.is_symlink() and _RANK_DIR.fullmatch(entry.name)):
            raise CacheError(f"{entry} was not made by regate precompute; {fix}")
        for item in sorted(entry.iterdir()):
            if not (item.is_file() and not item.is_symlink() and _OURS_IN_PART.fullmatch(item.name)):
                raise CacheError(f"{item} was not made by regate precompute; {fix}")
        if (entry / MANIFEST_NAME).exists():
            try:
                read_manifest(entry)
            except CacheError as err:
                raise CacheError(f"{err}: the precompute did not make it; {fix}") from None


def prepare_output(out: Path, wanted: CacheManifest, *, resume: bool, overwrite: bool) -> None:
    """Rank 0: make `out` ready to write into, and create or check its manifest.

    --overwrite replaces whatever cache is there. A directory holding no shard file (a run that failed or was killed
    before its first shard) counts as absent. Otherwise the cache is refused unless resuming, and a resumed one is
    repaired first (`repair_cache`, in `out` and in every part): shards it cannot trust are set aside and scored
    again, a lost manifest is rebuilt. A manifest or a file in `parts/` that is not the precompute's is refused."""
    if not overwrite:
        _refuse_foreign(out)
    directories = [out, *part_dirs(out)]
    if overwrite:
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    if overwrite or not any(shard_files(directory) for directory in directories):
        _remove_parts(out)
        ReferenceLossCacheWriter.like(out, wanted, overwrite=True)
        return
    if not resume:
        for directory in directories:
            check_not_orphaned(directory)
        committed = sum(read_manifest(d).samples for d in directories if (d / MANIFEST_NAME).is_file())
        raise CacheError(
            f"{out} already holds a reference cache ({committed} samples committed): pass --resume to continue it "
            "or --overwrite to replace it"
        )
    for directory in directories:
        for note in repair_cache(directory, wanted):
            logger.warning(note)
    ReferenceLossCacheWriter.like(out, wanted)


def known_keys(out: Path) -> set[SampleKey]:
    """Keys already committed: in the merged cache and in every rank's parts (any earlier world size)."""
    known: set[SampleKey] = set(committed_keys(out))
    for part in part_dirs(out):
        if (part / MANIFEST_NAME).is_file():
            known.update(committed_keys(part))
    return known


def merge_parts(out: Path, wanted: CacheManifest) -> None:
    """Rank 0, after every rank is done: move each rank's committed shards into `out`, record `wanted`'s provenance
    in its manifest, and remove the parts."""
    merged = ReferenceLossCacheWriter.like(out, wanted)
    for directory in part_dirs(out):
        merged.absorb(directory)
    merged.record(wanted.provenance)
    _remove_parts(out)


def _remove_parts(out: Path) -> None:
    """Delete the parts' files, all made by a precompute (`_refuse_foreign`), except shards set aside as corrupt;
    then every folder left empty."""
    for part in part_dirs(out):
        for item in part.iterdir():
            if SET_ASIDE_SUFFIX not in item.name:
                item.unlink()
        if not any(part.iterdir()):
            part.rmdir()
    if (out / PARTS_DIR).is_dir() and not any((out / PARTS_DIR).iterdir()):
        (out / PARTS_DIR).rmdir()
