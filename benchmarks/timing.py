"""The clocks the benchmarks time with, and the two flags that choose them (`--clock`, `--threads`).

The benchmarks run as scripts (`python benchmarks/<name>.py`), so they import this module by its bare name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from regate_plugin.demo import CLOCKS

Clock = Callable[[], float]


def add_clock_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (the only clock for a GPU); cpu: the process's CPU time, which other jobs on a "
        "shared CPU machine barely disturb (use it with --threads 1, so that no thread waits on another)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")


def clock_from(args: argparse.Namespace) -> Clock:
    """The clock `args` ask for, after setting torch's thread count when they give one."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return CLOCKS[args.clock]
