"""What every harness shares: the prompt a runner renders, the request it answers, the runner interface, and the
resumable JSON-lines prediction file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from PIL import Image

from ..core.errors import UserError
from ..core.files import MAX_LINE_BYTES, read_json_lines

SHOWN_UNREADABLE = 5  # unreadable lines a results table lists by name; metrics.json keeps them all


class BenchmarkError(UserError, ValueError):
    """Malformed or missing benchmark data or predictions: the message names the file and the record."""


@dataclass(frozen=True)
class Prompt:
    """What a model runner renders with its own chat template: system text, the user text that follows the
    visual input, and the start of the assistant's turn."""

    user: str
    system: str | None = None
    prefill: str = ""
    max_new_tokens: int = 100
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """Images (none, one, or a clip's frames when `video`) and the prompt that follows them."""

    images: tuple[Image.Image, ...]
    prompt: Prompt
    video: bool = False


class ModelRunner(Protocol):
    def generate(self, requests: Sequence[Request]) -> list[str]:
        """Greedy continuations after each `prompt.prefill`, cut at the prompt's stop strings."""
        ...


@dataclass
class PredictionFile:
    """A JSON-lines prediction (answer) file: its records in file order, and the lines that do not parse.

    A line that does not parse (the torn line of a killed run, a damaged file) is never guessed at or re-paired:
    the question it held has no answer in this file, so it counts as unanswered under the benchmark's rule, and
    the line is reported by file and number (`unreadable`). Rerunning the eval command answers such questions
    again."""

    path: Path
    records: list[dict[str, Any]]
    unreadable: list[str]

    @classmethod
    def read(cls, path: str | Path, missing_ok: bool = False) -> PredictionFile:
        """The file at `path`; with `missing_ok`, one that does not exist yet has no records."""
        path = Path(path)
        unreadable: list[str] = []
        if missing_ok and not path.exists():
            return cls(path, [], unreadable)
        return cls(path, read_json_lines(path, skip_invalid=True, skipped=unreadable), unreadable)

    def by_key(self, key: Callable[[dict[str, Any]], Hashable]) -> dict[Hashable, dict[str, Any]]:
        """Each record under its question's `key`; two records for one question are an error naming the file
        and the question (neither is taken over the other: which one was meant cannot be known)."""
        found: dict[Hashable, dict[str, Any]] = {}
        position: dict[Hashable, int] = {}
        for n, record in enumerate(self.records, start=1):
            k = key(record)
            if k in found:
                raise BenchmarkError(
                    f"{self.path}: question {k!r} is answered twice (records {position[k]} and {n}); keep one of "
                    "the two lines, or answer again into a new file"
                )
            found[k], position[k] = record, n
        return found

    def require(self, *fields: str, kind: str) -> PredictionFile:
        """Itself, once every record is checked to be a JSON object with `fields` (else an error naming it)."""
        for n, record in enumerate(self.records, start=1):
            if not isinstance(record, dict) or not set(fields) <= set(record):
                raise BenchmarkError(f"{self.path} record {n}: not {kind} (needs {', '.join(fields)})")
        return self


def unreadable_lines(unreadable: list[str]) -> list[str]:
    """Results-table lines naming a prediction file's unreadable lines (the first few, then how many more)."""
    if not unreadable:
        return []
    lines = [f"unreadable: {len(unreadable)} line(s) skipped; a question answered only there counts as unanswered"]
    lines += [f"  {problem}" for problem in unreadable[:SHOWN_UNREADABLE]]
    if len(unreadable) > SHOWN_UNREADABLE:
        lines.append(f"  ... and {len(unreadable) - SHOWN_UNREADABLE} more (all in metrics.json)")
    return lines


SHOWN_MISSING = 20


def missing_report(benchmark: str, root: Path, missing: list[Path]) -> str:
    """What `--check-data` prints: that `root` is complete, or the paths it lacks (the first few, then how many
    more)."""
    if not missing:
        return f"{benchmark}: {root} holds every file and folder it needs"
    lines = [f"{benchmark}: {root} lacks {len(missing)} path(s) (docs/EVAL.md has the layout):"]
    lines += [f"  {path}" for path in missing[:SHOWN_MISSING]]
    if len(missing) > SHOWN_MISSING:
        lines.append(f"  ... and {len(missing) - SHOWN_MISSING} more")
    return "\n".join(lines)


T = TypeVar("T")


def _last_line_start(handle: BinaryIO, size: int) -> int:
    """The offset after the last newline of a file (0 if none), found by reading back from its end in blocks."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        handle.seek(start)
        newline = handle.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _end_cleanly(path: Path) -> None:
    """A killed run can leave its last line half written: cut it off when it does not parse (that question was
    not done, so it is asked again), or end it with a newline when it does, so the next record starts clean.
    Only the last line is read."""
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = _last_line_start(handle, size)
        if start == size:
            return
        try:
            if size - start > MAX_LINE_BYTES:
                raise ValueError("longer than a line may be")
            handle.seek(start)
            json.loads(handle.read().decode("utf-8"))
        except ValueError:  # JSONDecodeError, bytes cut inside a UTF-8 character, or an over-long line
            handle.truncate(start)
            return
        handle.seek(0, os.SEEK_END)
        handle.write(b"\n")


def _append(handle: BinaryIO, data: bytes, out: Path) -> None:
    """Write all of `data` to an unbuffered file; a failed write (a full disk) is an error naming `out`: what was
    written before it stays, a torn last line included, which the rerun cuts off."""
    written = 0
    try:
        while written < len(data):
            written += handle.write(data[written:])
    except OSError as err:
        raise BenchmarkError(
            f"cannot write {out}: {err.strerror or err}. The answers written before it are kept: free space (or "
            "fix the cause) and rerun the same command, which answers the rest"
        ) from None


def run_resumable(
    items: Sequence[T],
    key: Callable[[T], Hashable],
    done: Iterable[Hashable],
    request: Callable[[T], Request],
    record: Callable[[T, str], dict[str, Any]],
    runner: ModelRunner,
    out: Path,
    batch_size: int = 1,
    desc: str = "eval",
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Answer every item whose key is not in `done`, `batch_size` requests per runner call; each batch's records
    are appended to `out` as they come (unbuffered), so a killed run loses at most one batch. Yields the new
    records."""
    from tqdm.auto import tqdm

    finished = set(done)
    todo = [item for item in items if key(item) not in finished]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        _end_cleanly(out)
    with (
        out.open("ab", buffering=0) as f,
        tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            outputs = runner.generate([request(item) for item in batch])
            lines = [record(item, output) for item, output in zip(batch, outputs, strict=True)]
            _append(f, "".join(json.dumps(line) + "\n" for line in lines).encode(), out)
            yield from lines
            bar.update(len(batch))
