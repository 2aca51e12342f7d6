"""A cache's `manifest.json`: what the losses mean (the header), how they were made (the provenance), and the
shards that hold them, each with its sha256."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..core.files import file_sha256, write_bytes_atomically
from .errors import CacheError, CorruptShardError
from .shards import CACHE_FORMAT, describe_shards, read_shard, shard_files

MANIFEST_NAME = "manifest.json"
CACHE_VERSION = 3  # 2 added per-sample visual rows, 3 the typed provenance


TOKENIZING_PACKAGES = ("transformers", "tokenizers")
"""Packages whose version can change how the same tokenizer files tokenize a sample."""


def tokenization_versions() -> dict[str, str]:
    """The installed versions of `TOKENIZING_PACKAGES` (those installed)."""
    found = {}
    for name in TOKENIZING_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class Provenance:
    """How `regate precompute` made the samples it scored: what the pre-flight check compares with a training run."""

    template: str | None = None  # the plugin template the samples were tokenized with
    max_length: int | None = None  # where samples were truncated (None: nowhere)
    longest: int | None = None  # the longest sample before truncation, in the student's merged rows (None: unknown)
    image_token_id: int | None = None  # HF-native student: placeholders were expanded into this token
    image_folder: str | None = None
    data: tuple[str, ...] = ()  # the data files
    versions: dict[str, str] | None = field(default_factory=tokenization_versions)  # None: not recorded

    def truncates_like(self, max_length: int | None) -> bool:
        """Whether a run that truncates at `max_length` (None: nowhere) cuts every sample as these samples were
        cut: the same limit, or limits no sample reaches."""
        if max_length == self.max_length:
            return True
        limits = [limit for limit in (max_length, self.max_length) if limit is not None]
        return self.longest is not None and self.longest <= min(limits)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Provenance:
        return cls(**{"versions": None, **raw, "data": tuple(raw.get("data", ()))})


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
    provenance: Provenance | None = None  # None: the writer was not told (a cache not made by `regate precompute`)
    format: str = CACHE_FORMAT
    version: int = CACHE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: Path) -> CacheManifest:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
                found = raw.get("format") if isinstance(raw, dict) else None
                raise CacheError(f"{source} is not a ReGATE reference cache manifest (format={found!r})")
            if raw.get("version") != CACHE_VERSION:
                raise CacheError(
                    f"{source} has cache format version {raw.get('version')}, this plugin reads version "
                    f"{CACHE_VERSION}: re-run `regate precompute` with --overwrite, or use the plugin that wrote it"
                )
            raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
            made = raw.get("provenance")
            raw["provenance"] = None if made is None else Provenance.from_dict(made)
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise CacheError(f"{source} is not a valid cache manifest: {err}") from err

    @property
    def visual_rows(self) -> int | str | None:
        """What the cache says of visual rows: the count per placeholder, "per sample (anyres)", or None."""
        return self.visual_tokens if self.visual_layout is None else "per sample (anyres)"

    def header(self) -> dict[str, Any]:
        """The fields that say what the losses mean (not how many there are, nor how the samples were made)."""
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


def read_manifest(directory: str | os.PathLike[str]) -> CacheManifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        found = shard_files(directory)
        rebuild = (
            f"; it holds {describe_shards(found)}: `regate precompute --resume` rebuilds the manifest from them"
            if found
            else ""
        )
        raise CacheError(f"{Path(directory)} is not a ReGATE reference cache: {MANIFEST_NAME} is missing{rebuild}")
    return CacheManifest.from_json(path.read_text(encoding="utf-8"), path)


def write_manifest(directory: Path, manifest: CacheManifest) -> None:
    """Replace `directory`'s manifest atomically."""
    write_bytes_atomically(directory / MANIFEST_NAME, manifest.to_json().encode("utf-8"))


def shard_problem(directory: Path, shard: ShardInfo) -> str | None:
    """What is wrong with a shard the manifest lists (missing, other bytes, unreadable, other counts), or None."""
    path = directory / shard.file
    if not path.is_file():
        return f"{path}: missing"
    if (actual := file_sha256(path)) != shard.sha256:
        return f"{path}: sha256 {actual} != {shard.sha256} recorded in {MANIFEST_NAME}"
    try:
        keys, offsets, _, _ = read_shard(path)
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
    return [problem for shard in manifest.shards if (problem := shard_problem(directory, shard))]
