"""`none`: every step dense, still with logits only where a target exists."""

from __future__ import annotations

from .base import Capabilities, TokenElision


class NoElision(TokenElision):
    """The reference point: trains on every answer token, through the same loss as the other strategies."""

    name = "none"
    capabilities = Capabilities(always_dense=True)
