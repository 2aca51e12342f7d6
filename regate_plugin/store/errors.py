"""The errors of the reference store."""

from __future__ import annotations

from ..core.errors import UserError


class CacheError(UserError, RuntimeError):
    """The reference cache cannot be used as asked."""


class CorruptShardError(CacheError):
    """A shard's bytes do not match the sha256 recorded in the manifest, or it cannot be parsed."""


class TokenizerMismatchError(CacheError):
    """The cache was built with a tokenizer other than the student's."""


class MissingReferenceError(CacheError, LookupError):
    """A sample has no entry in the cache."""


class CacheWriteError(CacheError):
    """A shard or the manifest could not be written (a full disk, a read-only mount); what is committed is intact."""
