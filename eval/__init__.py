"""Benchmark harnesses scored like the official scripts (docs/EVAL.md): MVBench (`mvbench`) and the LLaVA-1.5
image benchmarks (`image`, one module per benchmark under `benchmarks`)."""

from .base import ModelRunner, Prompt, Request
from .image import BENCHMARKS, BenchmarkError, ImageBenchmark, ImageQuestion, Score, get_benchmark, register_benchmark
from .mvbench import (
    PROTOCOLS,
    TASKS,
    MVBenchData,
    MVBenchError,
    MVBenchResult,
    aggregate,
    check_ans,
    get_protocol,
    load_mvbench,
    load_prediction_file,
    predict,
    read_predictions,
)

__all__ = [
    "BENCHMARKS",
    "PROTOCOLS",
    "TASKS",
    "BenchmarkError",
    "ImageBenchmark",
    "ImageQuestion",
    "MVBenchData",
    "MVBenchError",
    "MVBenchResult",
    "ModelRunner",
    "Prompt",
    "Request",
    "Score",
    "aggregate",
    "check_ans",
    "get_benchmark",
    "get_protocol",
    "load_mvbench",
    "load_prediction_file",
    "predict",
    "read_predictions",
    "register_benchmark",
]
