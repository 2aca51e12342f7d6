"""`ZooError`: what every model_zoo failure a user can fix raises."""

from __future__ import annotations

from ..core.errors import UserError


class ZooError(UserError, ValueError):
    """A bad entry, an unknown name, a file that fails its hash, or a checkpoint that cannot be had here."""
