"""What every harness shares: the prompt a runner renders, the request it answers, the runner interface, and the
resumable JSON-lines prediction file."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PIL import Image


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


T = TypeVar("T")


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
    """Answer every item whose key is not in `done`, `batch_size` requests per runner call; each record is
    appended to `out` and flushed as it comes, so a killed run loses at most one batch. Yields the new records."""
    from tqdm.auto import tqdm

    finished = set(done)
    todo = [item for item in items if key(item) not in finished]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and out.read_bytes()[-1:] not in (b"", b"\n"):
        with out.open("a") as f:  # a killed run can leave half a line: end it so the next record starts clean
            f.write("\n")
    with (
        out.open("a") as f,
        tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            outputs = runner.generate([request(item) for item in batch])
            for item, output in zip(batch, outputs, strict=True):
                line = record(item, output)
                f.write(json.dumps(line) + "\n")
                yield line
            f.flush()
            bar.update(len(batch))
