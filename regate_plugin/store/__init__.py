"""The reference store: per-answer-token reference losses by sample key, on disk (`ReferenceLossCache`, written by
`ReferenceLossCacheWriter`) or in memory (`InMemoryReferenceStore`), both `ReferenceStore`s."""

from .errors import CacheError, CacheWriteError, CorruptShardError, MissingReferenceError, TokenizerMismatchError
from .index import ReferenceLossCache
from .manifest import MANIFEST_NAME, CacheManifest, Provenance, ShardInfo, read_manifest, verify_cache
from .memory import InMemoryReferenceStore
from .protocol import ReferenceStore, open_store
from .writer import ReferenceLossCacheWriter, repair_cache

__all__ = [
    "CacheError",
    "CacheManifest",
    "CacheWriteError",
    "CorruptShardError",
    "InMemoryReferenceStore",
    "MANIFEST_NAME",
    "MissingReferenceError",
    "open_store",
    "Provenance",
    "read_manifest",
    "ReferenceLossCache",
    "ReferenceLossCacheWriter",
    "ReferenceStore",
    "repair_cache",
    "ShardInfo",
    "TokenizerMismatchError",
    "verify_cache",
]
