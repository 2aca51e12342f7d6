"""A student's evaluation: the task's benchmark score and the answer-token metrics of the test split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core import IGNORE_INDEX
from ..eval.runners import HFRunner
from .collate import TrainSample, collate
from .results import Evaluation

if TYPE_CHECKING:
    from .train import DemoSetup


@torch.no_grad()
def answer_token_metrics(model: torch.nn.Module, test: list[TrainSample], pad_id: int) -> tuple[float, float]:
    """Visual-token accuracy and whole-answer exact match (%), by teacher forcing: the argmax at each answer
    position against its token. An answer is matched when every argmax is right, which is exactly when greedy
    decoding from the prompt writes it, EOS included."""
    correct_visual = total_visual = matched = 0
    for i in range(0, len(test), 16):
        rows = test[i : i + 16]
        batch = collate(rows, pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        right = logits[:, :-1].argmax(-1) == labels[:, 1:]
        supervised = labels[:, 1:] != IGNORE_INDEX
        for b, row in enumerate(rows):
            hits = right[b][supervised[b]]
            visual = torch.tensor(row.visual, dtype=torch.bool)
            correct_visual += int(hits[visual].sum())
            total_visual += int(visual.sum())
            matched += bool(hits.all())
    return 100.0 * correct_visual / max(total_visual, 1), 100.0 * matched / len(test)


def evaluate(model: torch.nn.Module, setup: DemoSetup, out: Path, progress: bool) -> Evaluation:
    """The task's benchmark score of the demo's test split, and the answer-token metrics of the same questions;
    predictions and metrics go to `out`."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    was_training = model.training
    model.eval()
    runner = HFRunner(model, setup.processor)
    accuracy, result = setup.task.score(runner, setup.splits, setup.cfg.num_frames, out, progress)
    visual_accuracy, exact_match = answer_token_metrics(
        model, setup.test_samples, setup.processor.tokenizer.pad_token_id
    )
    model.train(was_training)
    metrics = {**result, "visual_accuracy": visual_accuracy, "exact_match": exact_match}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return Evaluation(accuracy, visual_accuracy, exact_match)
