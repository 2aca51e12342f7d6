"""Importing the LLaVA-NeXT re-creation (tests/llava_next_recreation) as `llava`, for one test module at a time."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .test_templates import REPO

RECREATION = REPO / "tests" / "llava_next_recreation"


@contextmanager
def llava_next_on_path() -> Iterator[None]:
    """`import llava` finds the re-creation inside the block; its modules are dropped afterwards."""
    sys.path.insert(0, str(RECREATION))
    try:
        yield
    finally:
        sys.path.remove(str(RECREATION))
        for name in [n for n in sys.modules if n == "llava" or n.startswith("llava.")]:
            del sys.modules[name]
