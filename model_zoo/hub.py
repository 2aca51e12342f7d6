"""Where a checkpoint comes from: a shipped entry (hash-checked), the local HF cache, or the hub when it can be
reached; `locate` decides what a `--model` names before anything loads."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .catalog import closest_entries, entries, verify_files
from .errors import ZooError
from .schema import ZooEntry

# A hub model id: owner/name, each of letters, digits, '-', '_' and '.' (what the hub accepts, less the legacy
# owner-less names, which no multimodal checkpoint uses).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def _local_snapshot(repo_id: str) -> Path | None:
    """The local HF cache's snapshot of `repo_id`, or None when it holds none (the hub is never asked)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: not in the local cache
        return None


def _not_cached(what: str, repo_id: str, reason: str) -> ZooError:
    cache_dir = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    return ZooError(
        f"{what}: {repo_id} is not in the local HF cache ({cache_dir}) and {reason}. "
        f"Download it where the hub is reachable: `huggingface-cli download {repo_id}`, then copy "
        "the cache, or pass the downloaded directory instead of the name"
    )


def resolve(entry: ZooEntry) -> Path:
    """A local directory holding `entry`'s files (verified, for shipped entries)."""
    if entry.availability == "announced":
        raise ZooError(
            f"{entry.name} is announced by its authors ({entry.location}) but not public yet; "
            f"see {entry.card} for what is known"
        )
    if entry.availability == "shipped":
        return verify_files(entry)
    cached = _local_snapshot(entry.location)
    if cached is not None:
        return cached
    if _hub_offline():
        raise _not_cached(entry.name, entry.location, "the hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(entry.location))
    except Exception as err:  # noqa: BLE001
        raise _not_cached(entry.name, entry.location, f"the hub cannot be reached ({type(err).__name__})") from None


def locate(model: str, what: str = "--model") -> tuple[str, ZooEntry | None]:
    """What a `--model` names, decided before anything loads: a local directory; a model_zoo entry (resolved,
    hash-checked when shipped); or a hub id (owner/name), which with the hub switched off must be in the local
    HF cache. Anything else is an error naming the closest zoo entries. Returns the path or hub id to load, and
    the entry."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser()), None
    if model in entries():
        return str(resolve(entries()[model])), entries()[model]
    if HUB_ID.fullmatch(model) and ".." not in model:
        if _hub_offline() and _local_snapshot(model) is None:
            raise _not_cached(
                f"{what} {model}",
                model,
                "the hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); it is no local directory either",
            )
        return model, None
    close = closest_entries(model)
    hint = f"; did you mean the model_zoo entry {' or '.join(close)}?" if close else ""
    raise ZooError(
        f"{what} {model!r} is not a checkpoint directory, a model_zoo entry (`regate zoo list`), or a hub id "
        f"(owner/name){hint}"
    )
