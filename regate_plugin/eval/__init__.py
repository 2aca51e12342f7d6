"""Benchmark harnesses, scored like the official scripts (EVAL_SPEC.md). MVBench so far; the image benchmarks
are to come."""

from .mvbench import (
    PROTOCOLS,
    TASKS,
    MVBenchData,
    MVBenchError,
    MVBenchResult,
    Prompt,
    aggregate,
    check_ans,
    get_protocol,
    load_mvbench,
    load_prediction_file,
    predict,
    read_predictions,
)

__all__ = [
    "PROTOCOLS",
    "TASKS",
    "MVBenchData",
    "MVBenchError",
    "MVBenchResult",
    "Prompt",
    "aggregate",
    "check_ans",
    "get_protocol",
    "load_mvbench",
    "load_prediction_file",
    "predict",
    "read_predictions",
]
