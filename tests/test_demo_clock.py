"""The demo's clock: both clocks measured every run, and `--clock auto` reporting CPU time when the wall clock was
shared. The rule is checked on hand-computed numbers; the measuring path under real competition for one core."""

import os
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from regate_plugin.core.errors import UserError
from regate_plugin.demo import DemoConfig
from regate_plugin.demo.clock import Stopwatch, Usage, choose_clock, machine_load
from regate_plugin.demo.report import clock_line, takeaways
from regate_plugin.demo.results import CurvePoint, DemoResult


def usage(wall: float, cpu: float, threads: int = 1, load: float = 1.0, cores: int = 2) -> Usage:
    return Usage(wall, cpu, threads, load, cores)


@pytest.mark.parametrize(
    ("wall", "cpu", "threads", "clock"),
    [
        (100.0, 34.0, 1, "cpu"),  # the shared machine: 34% of its one thread's wall time
        (100.0, 99.0, 1, "wall"),  # a core of its own
        (100.0, 89.0, 1, "cpu"),  # just under 0.9
        (100.0, 90.0, 1, "wall"),  # 0.9 is enough
        (100.0, 170.0, 2, "cpu"),  # two threads, 85% of 200 thread-seconds
        (100.0, 195.0, 2, "wall"),
        (100.0, 101.0, 1, "wall"),  # a helper thread's few CPU-seconds on top
        (0.0, 0.0, 1, "wall"),  # nothing timed: nothing says the clock was shared
    ],
)
def test_auto_reports_cpu_time_when_the_process_ran_under_nine_tenths_of_its_wall_time(wall, cpu, threads, clock):
    assert choose_clock("auto", usage(wall, cpu, threads)).clock == clock


def test_the_reason_names_the_measurements_that_decided():
    reason = choose_clock("auto", usage(100.0, 34.0, load=3.1, cores=2)).reason
    assert reason.startswith("wall clock shared with other jobs") and reason.endswith("reporting CPU time")
    assert "34%" in reason and "load 3.1 on 2 cores" in reason and "34.0 CPU-s in 100.0 s" in reason
    own = choose_clock("auto", usage(100.0, 99.0, load=0.2)).reason
    assert own.startswith("wall clock the process's own") and own.endswith("reporting wall-clock time")


@pytest.mark.parametrize("forced", ["wall", "cpu"])
def test_a_named_clock_is_reported_whatever_was_measured(forced):
    for measured in (usage(100.0, 30.0), usage(100.0, 100.0)):
        choice = choose_clock(forced, measured)
        assert choice.clock == forced and choice.reason.startswith(f"--clock {forced}: reporting")


def test_the_demos_modes_are_decided_together():
    modes = [usage(10.0, 9.9, load=0.5), usage(10.0, 2.0, load=3.0), usage(10.0, 9.9, load=1.0)]
    combined = Usage.combined(modes)
    assert (combined.wall_seconds, combined.cpu_seconds, combined.load) == (30.0, 21.8, 3.0)
    assert choose_clock("auto", combined).clock == "cpu"  # 21.8 / 30 = 0.73: one shared mode shares the table


def test_a_result_reports_the_seconds_of_the_chosen_clock():
    points = [CurvePoint(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), CurvePoint(5, 40, 0.0, 1.0, 2.0, 3.0, 8.0, 3.0)]
    result = DemoResult("none", "", 1.0, 40, 1.0, 0.0, 1.0, 1.0, 0.5, points, usage=usage(8.0, 3.0))
    on_cpu = result.timed_by(choose_clock("cpu", result.usage))
    assert (on_cpu.seconds, [p.train_seconds for p in on_cpu.curve]) == (3.0, [0.0, 3.0])
    on_wall = result.timed_by(choose_clock("wall", result.usage))
    assert (on_wall.seconds, [p.train_seconds for p in on_wall.curve]) == (8.0, [0.0, 8.0])
    assert on_cpu.clock == "cpu" and on_cpu.clock_reason.startswith("--clock cpu")
    assert DemoResult.from_dict(asdict(on_cpu)) == on_cpu
    one_clock = DemoResult("none", "", 1.0, 40, 1.0, 3.0, 1.0, 1.0, 0.5, [CurvePoint(5, 40, 3.0, 1.0, 2.0, 3.0)])
    with pytest.raises(ValueError, match="both clocks"):  # a run timed on one clock cannot be reported on another
        one_clock.timed_by(choose_clock("wall", usage(8.0, 3.0)))


def test_the_printout_says_which_clock_and_why():
    def run(mode: str) -> DemoResult:
        curve = [CurvePoint(0, 0, 0.0, 25.0, 0.0, 0.0, 0.0, 0.0), CurvePoint(100, 900, 0.0, 50.0, 0.0, 0.0, 30.0, 10.0)]
        return DemoResult(mode, "", 1.0, 900, 1.0, 0.0, 0, 0, 0, curve, usage=usage(30.0, 10.0, load=3.1))

    choice = choose_clock("auto", usage(30.0, 10.0, load=3.1))
    results = [run("none").timed_by(choice), run("regate").timed_by(choice)]
    assert "100% of the training seconds (CPU time) none needed for it" in takeaways(results)[0]
    assert clock_line(results).startswith("training seconds: wall clock shared with other jobs (the process ran 33%")


def test_an_unknown_clock_is_a_one_line_user_error_naming_the_flag():
    with pytest.raises(UserError, match=r"^--clock must be one of auto, wall, cpu, got 'sun'$"):
        DemoConfig(clock="sun")
    assert DemoConfig().clock == "auto"


BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins processes to one core (Linux)")
def test_auto_chooses_cpu_time_beside_busy_processes_on_the_same_core():
    """Two busy processes pinned to this process's core leave it at most about half of the wall time (a third under
    a fair scheduler), far under 0.9, whatever else the machine runs: `auto` must report CPU time."""
    allowed = os.sched_getaffinity(0)
    core = min(allowed)
    busy: list[subprocess.Popen] = []
    try:
        busy += [subprocess.Popen([sys.executable, "-c", BUSY, str(core)]) for _ in range(2)]
        os.sched_setaffinity(0, {core})
        time.sleep(0.3)  # the competitors are spinning
        load, cores = machine_load()
        watch, total = Stopwatch(), 0
        while watch.wall_seconds < 1.0:  # the demo's timing path around a CPU-bound step
            with watch:
                total += sum(i * i for i in range(20_000))
        measured = Usage(watch.wall_seconds, watch.cpu_seconds, 1, load, cores)
    finally:
        os.sched_setaffinity(0, allowed)
        for process in busy:
            process.kill()
            process.wait()
    choice = choose_clock("auto", measured)
    assert choice.clock == "cpu" and choice.reason.startswith("wall clock shared with other jobs"), choice
