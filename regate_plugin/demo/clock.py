"""Which clock the demo's training seconds count, decided from what the run measured.

Every run times its training steps on both clocks (`Stopwatch`): the wall clock (elapsed time) and the process's CPU
time. `--clock wall|cpu` reports the one named; `--clock auto` (the default) reports the wall clock only when it was
the process's own, by this rule (`choose_clock`; README.md, "The demo"):

    share = CPU seconds / (wall seconds x torch threads)      over the timed training steps
    share >= 0.9  ->  wall clock;   share < 0.9  ->  CPU time

A training step does no I/O, so a process that has its cores runs for all of the wall time it is timed for: its
share is about 1. Every slice below that is time the kernel gave another job (or a CPU quota withheld) while the wall
clock kept counting it against the run; 0.9 leaves room for the process's other threads and the scheduler's own
costs. The 1-minute load average and the machine's cores, read as each mode starts training, are printed beside the
share to explain it but do not decide: a load above the cores takes nothing from a process that still ran all of its
time, and a CPU quota takes time without showing in the load. Where the rule errs it errs towards CPU time, which is
what the run computed; a shared wall clock counts other jobs' time (one user's "34% of the training seconds" was 99%
in CPU time). With several threads, time a thread waits between parallel sections also lowers the share; `--clock
wall` forces the wall clock there, and on a GPU, whose work CPU time does not count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# The two clocks (here and in benchmarks/): CPU time is what a shared machine barely disturbs, with one torch thread
# (a waiting thread's time counts too).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_CHOICES = ("auto", *CLOCKS)
CLOCK_NAMES = {"wall": "wall-clock time", "cpu": "CPU time"}
MIN_SHARE = 0.9  # the least share of wall x threads a process runs for when the wall clock is its own


def machine_load() -> tuple[float, int]:
    """The machine's 1-minute load average (this process included) and its cores."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return load, os.cpu_count() or 1


@dataclass(frozen=True)
class Usage:
    """What a run's timed steps measured on both clocks, and the machine they ran on."""

    wall_seconds: float
    cpu_seconds: float
    threads: int  # torch threads
    load: float  # 1-minute load average as training began (the highest over combined runs)
    cores: int  # the machine's (the load average counts jobs on all of them)

    @property
    def share(self) -> float:
        """The process's CPU time over the wall time of its threads: about 1 when the wall clock was its own."""
        return self.cpu_seconds / (self.wall_seconds * self.threads) if self.wall_seconds > 0 else 1.0

    @classmethod
    def combined(cls, usages: Iterable[Usage]) -> Usage:
        """Several runs of one process (the demo's modes) as one: seconds summed, the highest load."""
        runs = list(usages)
        return cls(
            sum(u.wall_seconds for u in runs),
            sum(u.cpu_seconds for u in runs),
            max(u.threads for u in runs),
            max(u.load for u in runs),
            min(u.cores for u in runs),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Usage:
        return cls(**values)


@dataclass(frozen=True)
class ClockChoice:
    clock: str  # "wall" or "cpu": what the reported seconds count
    reason: str  # one line: the measurements and what they decided


def choose_clock(requested: str, usage: Usage) -> ClockChoice:
    """The clock to report for `--clock requested` (auto, wall or cpu), given what the run measured."""
    measured = (
        f"the process ran {usage.share:.0%} of the wall time of its {_count(usage.threads, 'thread')}: "
        f"{usage.cpu_seconds:.1f} CPU-s in {usage.wall_seconds:.1f} s; load {usage.load:.1f} on "
        f"{_count(usage.cores, 'core')}"
    )
    if requested in CLOCKS:
        return ClockChoice(requested, f"--clock {requested}: reporting {CLOCK_NAMES[requested]} ({measured})")
    if usage.share < MIN_SHARE:
        return ClockChoice("cpu", f"wall clock shared with other jobs ({measured}); reporting {CLOCK_NAMES['cpu']}")
    return ClockChoice("wall", f"wall clock the process's own ({measured}); reporting {CLOCK_NAMES['wall']}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


class Stopwatch:
    """Adds the wall and CPU seconds of each `with` block. Both reads cost 12 µs a block on a loaded 2-core machine,
    against the tenths of a second of a demo training step."""

    def __init__(self) -> None:
        self.wall_seconds = 0.0
        self.cpu_seconds = 0.0
        self._began = (0.0, 0.0)

    def __enter__(self) -> Stopwatch:
        self._began = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        # Read in the reverse order of __enter__, so the wall interval encloses the CPU one: a process preempted
        # while reading its CPU time (a system call) has that wait counted by the wall clock.
        wall, cpu = self._began
        self.cpu_seconds += time.process_time() - cpu
        self.wall_seconds += time.perf_counter() - wall
