"""File helpers shared by the cache, the reference loader, the model zoo and the eval harness."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replaced_on_success(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """A fresh temporary file (or directory) beside `path` to write into; renamed onto `path` when the block
    succeeds and removed when it fails, so a reader never sees a half-written `path`.

    The result gets the mode a plain `open` (or `mkdir`) would give it under the umask, not the temporary's 0600
    (0700), so a cache or a converted model is as readable by others as any file its owner writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        staging = Path(name)
    try:
        yield staging
        os.chmod(staging, (0o777 if directory else 0o666) & ~_umask())
        os.replace(staging, path)
    except BaseException:
        if directory:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` through a synced temporary file and a rename."""
    with replaced_on_success(path) as staging, open(staging, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


MAX_LINE_BYTES = 1 << 20  # a JSON line longer than this is not read (no answer or label line comes near it)


def _byte_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | int]:
    """Each line of a binary file, newline included; a line longer than `limit` bytes as its length instead (it
    is skipped in chunks, never held in memory whole)."""
    while line := handle.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := handle.readline(limit)):
            size += len(line)
        yield size


def read_json_lines(
    path: str | os.PathLike[str],
    *,
    skip_invalid: bool = False,
    error: Callable[[str], Exception] = ValueError,
    skipped: list[str] | None = None,
) -> list[Any]:
    """The JSON value of every non-blank line of `path` (lines end at "\\n").

    A line that is not UTF-8, longer than `MAX_LINE_BYTES`, or not valid JSON is a problem "<path> line N: ...":
    `skip_invalid=True` drops such lines (a file a killed run was appending to, whose torn last line the resumed
    run completes) and appends each problem to `skipped` when given; otherwise the first one raises
    `error(problem)`.
    """
    records = []
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(_byte_lines(handle, MAX_LINE_BYTES), start=1):
            start, offset = offset, offset + (line if isinstance(line, int) else len(line))
            if isinstance(line, int):
                problem = f"{path} line {number}: too long ({line} bytes, over {MAX_LINE_BYTES}), left unread"
            elif not line.strip():
                continue
            else:
                try:
                    records.append(json.loads(line.decode("utf-8")))
                    continue
                except UnicodeDecodeError as err:
                    problem = f"{path} line {number}: not UTF-8 text (byte offset {start + err.start})"
                except json.JSONDecodeError as err:
                    problem = f"{path} line {number}: not valid JSON ({err})"
            if not skip_invalid:
                raise error(problem)
            if skipped is not None:
                skipped.append(problem)
    return records
