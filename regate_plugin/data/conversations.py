"""Training data in the LLaVA conversation format: a JSON list or JSON lines of samples.

    {"id": "000001", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}

Turns may also be `{"role": "user"|"assistant"|"system", "content": ...}`, as LLaVA-NeXT reads them. `video`
instead of `image` marks a video sample (VideoLLaMA2); neither marks a text-only one. Every problem is
reported with the file, the line the sample starts on, and its id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError

ROLES = ("human", "gpt", "system")
# LLaVA-NeXT's `preprocess_qwen` also reads {"role", "content"} turns, with chat roles or the LLaVA ones.
CHAT_ROLES = {"user": "human", "assistant": "gpt", "system": "system", "human": "human", "gpt": "gpt"}
JSON_SPACE = " \t\r\n"


class DataError(UserError, ValueError):
    """A sample or file that cannot be used; the message names the file, line and sample id."""


@dataclass
class Conversation:
    """One training sample: its turns as (role, text) pairs, and which visual modality it carries."""

    sample_id: str
    turns: list[tuple[str, str]]
    modality: str | None  # "image", "video", or None for text-only
    source: str = ""  # "file:line", for error messages
    visual_files: tuple[str, ...] = ()  # the sample's image or video paths, as the data file gives them

    def where(self) -> str:
        return f"{self.source} (sample id {self.sample_id!r})"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _skip_space(text: str, offset: int) -> int:
    """The offset of the first character at or after `offset` that is not JSON whitespace."""
    while offset < len(text) and text[offset] in JSON_SPACE:
        offset += 1
    return offset


def _syntax_error(path: Path, text: str, offset: int, problem: str) -> DataError:
    where = json.JSONDecodeError(problem, text, offset)  # counts the line and column
    return DataError(f"{path}:{where.lineno}:{where.colno}: {problem}")


def _check_nothing_after(path: Path, text: str, offset: int) -> None:
    """Refuse anything but whitespace after the closing bracket of a JSON list, as `json.load` does."""
    if (rest := _skip_space(text, offset)) < len(text):
        raise _syntax_error(
            path,
            text,
            rest,
            "more data after the closing bracket of the JSON list (a second list, or junk); upstream's json.load "
            "refuses the file: keep one list, or write one sample per line as .jsonl",
        )


def _turn(turn: Any) -> tuple[Any, Any]:
    """(role in ROLES, text) of a {"from", "value"} or a {"role", "content"} turn; (None, None) for anything else."""
    if not isinstance(turn, dict):
        return None, None
    if "from" in turn or "value" in turn:
        return turn.get("from"), turn.get("value")
    role = turn.get("role")
    return CHAT_ROLES.get(role) if isinstance(role, str) else None, turn.get("content")


def parse_sample(raw: Any, index: int, source: str) -> Conversation:
    """Validate one decoded sample; `source` is "file:line"."""
    sample_id = str(raw.get("id", index)) if isinstance(raw, dict) else str(index)
    where = f"{source} (sample id {sample_id!r})"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(raw).__name__}")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    parsed: list[tuple[str, str]] = []
    for n, turn in enumerate(turns):
        role, text = _turn(turn)
        if role not in ROLES or not isinstance(text, str):
            raise DataError(
                f"{where}: turn {n} must be {{'from': one of {list(ROLES)}, 'value': <string>}} or {{'role': one of "
                f"{list(CHAT_ROLES)}, 'content': <string>}}, got {turn!r:.200}"
            )
        parsed.append((role, text))
    modalities = [m for m in ("image", "video") if raw.get(m) is not None]
    if len(modalities) > 1:
        raise DataError(f"{where}: a sample has either 'image' or 'video', not both")
    if not modalities:
        return Conversation(sample_id, parsed, None, source)
    files = raw[modalities[0]]
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise DataError(f"{where}: {modalities[0]!r} must be a path or a non-empty list of paths, got {files!r:.200}")
    return Conversation(sample_id, parsed, modalities[0], source, tuple(files))


def iter_conversations(
    path: str | os.PathLike[str], skip_bad: bool = False, bad: list[str] | None = None
) -> Iterator[Conversation]:
    """Samples of a `.json` list or a `.jsonl` file, in file order.

    With `skip_bad`, an invalid sample is appended to `bad` (its error message) instead of raised. A JSON list
    whose syntax breaks cannot be read past the break, so that is an error either way.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte offset {err.start}: {data[err.start : err.start + 4]!r}); JSON "
            "data must be UTF-8: re-encode the file (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    decoder = json.JSONDecoder()

    def checked(raw: Any, index: int, line: int) -> Conversation | None:
        try:
            return parse_sample(raw, index, f"{path}:{line}")
        except DataError as err:
            if not skip_bad:
                raise
            if bad is not None:
                bad.append(str(err))
            return None

    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "[":
        # read as strictly as upstream's `json.load`: samples separated by single commas, nothing after the list
        offset, index = _skip_space(text, start + 1), 0
        line, counted_to = 1, 0  # line numbers are counted incrementally: the file can be a gigabyte
        if text[offset : offset + 1] == "]":
            _check_nothing_after(path, text, offset + 1)
            return
        while True:
            line += text.count("\n", counted_to, offset)
            counted_to = offset
            try:
                raw, offset = decoder.raw_decode(text, offset)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{_line_of(text, err.pos)}: invalid JSON in sample {index}: {err.msg}") from err
            if (sample := checked(raw, index, line)) is not None:
                yield sample
            index += 1
            offset = _skip_space(text, offset)
            if offset >= len(text):
                raise DataError(f"{path}: the JSON list is not closed")
            if text[offset] == "]":
                _check_nothing_after(path, text, offset + 1)
                return
            if text[offset] != ",":
                raise _syntax_error(path, text, offset, f"expected ',' or ']' after sample {index - 1}")
            offset = _skip_space(text, offset + 1)
    index = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            problem = DataError(f"{path}:{line_number}: invalid JSON line (sample {index}): {err.msg}")
            if not skip_bad:
                raise problem from err
            if bad is not None:
                bad.append(str(problem))
            index += 1
            continue
        if (sample := checked(raw, index, line_number)) is not None:
            yield sample
        index += 1
