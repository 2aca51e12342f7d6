"""`regate demo`: the whole ReGATE story on a tiny video LLaVA, offline, in a few minutes on 2 CPU cores.

1. Make the task's data (`demo.tasks`): by default a small video-QA set drawn with PyAV (`demo.data`), or easy-VQA's
   images and questions (`--task easy-vqa`): train split in the LLaVA conversation format, test split in its
   benchmark's layout (MVBench's, GQA's).
2. Build a base LLM and train it on the text alone: the reference LLM. Build the video LLaVA student from it.
3. `regate precompute` the reference losses of the train split.
4. Train the student three ways from the same start on the same batches: `none`, `regate`, `random`.
5. Score each with the task's harness (MVBench's official protocol, GQA's rule) at several points, print a table,
   plot accuracy against answer tokens processed, and save the final checkpoints (HF format, with their results).
"""

from .clock import CLOCKS
from .collate import TrainSample, collate, encode_split, visual_targets
from .config import MODES, TEMPLATE, DemoConfig
from .evaluate import answer_token_metrics, evaluate
from .memory import SavedActivations
from .results import CurvePoint, DemoResult, Evaluation
from .train import DemoSetup, prepare, run_demo, train_mode, train_reference

__all__ = [
    "CLOCKS",
    "MODES",
    "TEMPLATE",
    "CurvePoint",
    "DemoConfig",
    "DemoResult",
    "DemoSetup",
    "Evaluation",
    "SavedActivations",
    "TrainSample",
    "answer_token_metrics",
    "collate",
    "encode_split",
    "evaluate",
    "prepare",
    "run_demo",
    "train_mode",
    "train_reference",
    "visual_targets",
]
