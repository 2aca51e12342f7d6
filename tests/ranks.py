"""Helpers for tests that start several ranks: a free port for their process group, and what each rank said as it
exited (tests/rank_observer goes on their PYTHONPATH)."""

import socket
from pathlib import Path

OBSERVER = Path(__file__).parent / "rank_observer"


def free_port() -> int:
    """A free local TCP port, so that a port another job holds never fails a test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_every_rank_closed_its_process_group(exits: Path, world: int) -> None:
    """Each rank exited with the default process group closed (REGATE_RANK_EXIT_DIR=exits)."""
    said = {rank: (exits / f"rank{rank}.exit").read_text() for rank in range(world)}
    assert said == dict.fromkeys(range(world), "closed"), said
