"""Which data-parallel process this is: from `torch.distributed` once it is initialised, else from the
environment `torchrun` sets (RANK, WORLD_SIZE), else a single process."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def process_group_size() -> int:
    """Processes in the initialised default group (1 without one): how many ranks a collective reaches."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def destroy_process_group() -> None:
    """Close the default process group, if one is up, before the process exits: a rank whose interpreter shuts down
    with a gloo group still open can abort in its teardown ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
