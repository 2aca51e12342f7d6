"""What elision does to each answer token, run by run: on sparse steps, how often each token is kept as a target
(its loss term) and as an input (context for the tokens after it); at each evaluation, each token's teacher-forced
accuracy on the test split, and its reference loss and student EMA on a fixed set of training samples.

    python benchmarks/elision_audit.py --task refer-back --seeds 0 --runs none regate:target regate:with_input

Tokens are grouped by role: the word (colour words as `colour`, big/small as `size`, digit words as `numeral`,
even/odd as `parity`, ...) and which mention of it in the answer it is (`colour#1` states the colour, `colour#2`
refers back to it). Every run starts from the seed's student and sees the same batches, as in
`benchmarks/sample_efficiency.py`, whose variants (`--runs regate:<variant>`) it shares. Writes `--out` (JSON) and
prints a table per run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from sample_efficiency import (
    VARIANTS,
    current_settings,
    load_records,
    record_of,
    run_key,
    settings_of,
    write_records,
)

from regate_plugin.adapters import enable_token_elision
from regate_plugin.core import IGNORE_INDEX
from regate_plugin.core.keys import SampleKey, sample_key
from regate_plugin.demo import (
    CLOCKS,
    CurvePoint,
    DemoConfig,
    DemoResult,
    DemoSetup,
    TrainSample,
    collate,
    digits,
    easy_vqa,
    evaluate,
    prepare,
    scenes,
)
from regate_plugin.demo import data as squares
from regate_plugin.demo.models import student_parameter_groups
from regate_plugin.demo.tasks import TASKS
from regate_plugin.strategies import build_token_elision
from regate_plugin.strategies.scored import ReferenceScoredElision, ema_slots

WORDS = {
    **{c: "colour" for c in (*scenes.COLOURS, *squares.COLOURS, *easy_vqa.COLOURS)},
    "left": "side",
    "right": "side",
    "top": "row",
    "bottom": "row",
    **{s: "size" for s in scenes.SIZES},
    **{b: "background" for b in scenes.BACKGROUNDS},
    **{letter: "letter" for letter in "ABCD"},
    **{word: "numeral" for word in digits.WORDS},
    "even": "parity",
    "odd": "parity",
}
AUDITED = 64  # training samples whose reference loss and EMA are read at each evaluation


def roles(sample: TrainSample, tokenizer: Any) -> list[str]:
    """Per supervised label, in answer order: its word's role and which mention of that role it is."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for label in sample.labels:
        if label == IGNORE_INDEX:
            continue
        word = tokenizer.decode([label]).strip()
        role = WORDS.get(word, word or "␣")
        seen[role] += 1
        out.append(f"{role}#{seen[role]}")
    return out


@torch.no_grad()
def token_accuracy(model: torch.nn.Module, test: list[TrainSample], test_roles: list[list[str]], pad_id: int):
    """Teacher-forced accuracy (%) per role on the test split."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(test), 16):
        rows = test[i : i + 16]
        batch = collate(rows, pad_id)
        labels = batch.pop("labels")
        right = model(**batch).logits[:, :-1].argmax(-1) == labels[:, 1:]
        supervised = labels[:, 1:] != IGNORE_INDEX
        for b, row_roles in enumerate(test_roles[i : i + 16]):
            for role, hit in zip(row_roles, right[b][supervised[b]].tolist()):
                hits[role].append(hit)
    return {role: 100.0 * sum(v) / len(v) for role, v in hits.items()}


def difficulty(elision: ReferenceScoredElision, key: SampleKey, targets: torch.Tensor) -> list[float]:
    """The student EMA of one sample's answer tokens (by ordinal and target id); NaN where unseen."""
    elision.sync()
    (start,), _ = elision.reference.spans(elision.reference.locate([key]))
    device = elision.ema.device
    ordinals = torch.arange(len(targets), device=device).unsqueeze(0)
    slots = ema_slots(torch.tensor([start], device=device), ordinals, torch.ones_like(ordinals, dtype=torch.bool))
    return elision.ema.lookup(slots[0], targets.to(device)).tolist()


def scores(
    elision: ReferenceScoredElision, samples: list[TrainSample], sample_roles: list[list[str]]
) -> dict[str, dict[str, float]]:
    """Mean reference loss and student EMA per role over the audited training samples (EMA: NaN where unseen)."""
    reference: dict[str, list[float]] = defaultdict(list)
    ema: dict[str, list[float]] = defaultdict(list)
    for sample, row_roles in zip(samples, sample_roles):
        key = sample_key(sample.input_ids, [label != IGNORE_INDEX for label in sample.labels])
        targets = torch.tensor([label for label in sample.labels if label != IGNORE_INDEX])
        losses = elision.reference[key][: len(targets)].tolist()
        for role, r, d in zip(row_roles, losses, difficulty(elision, key, targets)):
            reference[role].append(r)
            if d == d:
                ema[role].append(d)
    return {
        role: {
            "reference": statistics.fmean(reference[role]),
            "ema": statistics.fmean(ema[role]) if ema[role] else None,
        }
        for role in reference
    }


def audit_run(setup: DemoSetup, run: str, keep: float) -> tuple[dict[str, Any], DemoResult]:
    """One run's audit, and its result as `benchmarks/sample_efficiency.py` records it (the same curve: the task's
    score, visual-token accuracy and exact match at each evaluation)."""
    cfg = setup.cfg
    mode, _, variant = run.partition(":")
    schedule = cfg.schedule(keep_ratio=keep, **VARIANTS.get(variant, {})).scaled_to(cfg.steps)
    tokenizer = setup.processor.tokenizer
    model = copy.deepcopy(setup.start)
    model.train()
    elision = build_token_elision(mode, schedule, reference=setup.cache_dir, tokenizer=tokenizer)
    enable_token_elision(model, elision)
    optimizer = torch.optim.AdamW(student_parameter_groups(model, cfg.learning_rate))
    train_roles = [roles(s, tokenizer) for s in setup.samples]
    test_roles = [roles(s, tokenizer) for s in setup.test_samples]
    kept: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # role -> [seen, kept as target, kept as input]
    windows, curve = [], []
    assert setup.start_evaluation is not None
    points = [CurvePoint(0, 0, 0.0, **asdict(setup.start_evaluation))]
    answer_tokens, seconds, clock = 0, 0.0, CLOCKS[cfg.clock]
    for step in range(cfg.steps):
        index = [(step * cfg.batch_size + j) % len(setup.samples) for j in range(cfg.batch_size)]
        batch = collate([setup.samples[i] for i in index], tokenizer.pad_token_id)
        began = clock()
        elision.set_step(step)
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds += clock() - began
        report = out.token_elision
        answer_tokens += report["targets"]
        if not report["dense"]:
            supervised = (batch["labels"] != IGNORE_INDEX).tolist()
            kept_mask, kept_candidates = report["kept_mask"].tolist(), report["kept_candidates"].tolist()
            for b, i in enumerate(index):
                at = [q for q, s in enumerate(supervised[b]) if s]
                for role, q in zip(train_roles[i], at):
                    # label q is the target of input position q - 1, a candidate when both are supervised
                    candidate = supervised[b][q - 1]
                    counts = kept[role]
                    counts[0] += 1
                    counts[1] += kept_candidates[b][q - 1] or not candidate
                    counts[2] += kept_mask[b][q]
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            where = setup.out_dir / "eval" / run.replace(":", "-") / f"step-{step + 1:05d}"
            points.append(CurvePoint(step + 1, answer_tokens, seconds, **asdict(evaluate(model, setup, where, False))))
            model.eval()
            accuracy = token_accuracy(model, setup.test_samples, test_roles, tokenizer.pad_token_id)
            point: dict[str, Any] = {"step": step + 1, "accuracy": accuracy}
            if isinstance(elision, ReferenceScoredElision):
                point["scores"] = scores(elision, setup.samples[:AUDITED], train_roles[:AUDITED])
            model.train()
            curve.append(point)
            windows.append({"until": step + 1, "kept": {r: list(v) for r, v in kept.items()}})
            kept.clear()
    audit = {"run": run, "keep_ratio": keep, "schedule": schedule.to_dict(), "windows": windows, "curve": curve}
    keep_ratio = 1.0 if mode == "none" else keep
    stats = elision.stats
    result = DemoResult(mode, variant, keep_ratio, answer_tokens, stats.kept_fraction, seconds, 0.0, 0.0, 0.0, points)
    return audit, result


def table(result: dict[str, Any]) -> str:
    seen: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for window in result["windows"]:
        for role, counts in window["kept"].items():
            seen[role] = [a + b for a, b in zip(seen[role], counts)]
    last = result["curve"][-1]
    head = "| role | kept as target | kept as input | " + " | ".join(f"acc @{p['step']}" for p in result["curve"])
    lines = [f"### {result['run']} (keep {result['keep_ratio']:g})", "", head + " | ref | EMA |"]
    lines.append("|---" * (3 + len(result["curve"]) + 2) + "|")
    for role in sorted(last["accuracy"], key=lambda r: (-last.get("scores", {}).get(r, {}).get("reference", 0), r)):
        n, target, inputs = seen.get(role, [0, 0, 0])
        score = last.get("scores", {}).get(role, {})
        ema = score.get("ema")
        cells = [
            role,
            f"{100 * target / n:.0f}%" if n else "dense",
            f"{100 * inputs / n:.0f}%" if n else "dense",
            *(f"{p['accuracy'].get(role, float('nan')):.0f}" for p in result["curve"]),
        ]
        cells += [f"{score['reference']:.3f}" if score else "", f"{ema:.3f}" if ema is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="refer-back")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", default=["none", "random:target", "regate:target", "regate:with_input"])
    parser.add_argument("--keep-ratio", type=float, default=0.35)
    parser.add_argument("--steps", type=int, default=None, help="default: the task's")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--test-per-task", type=int, default=None, help="default: the task's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=DemoConfig.reference_steps,
        help="text-only training steps of the tiny base LLM (the reference and the student's start)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="elision_audit.json goes here")
    parser.add_argument(
        "--evidence", type=Path, default=None, help="also append each run to this sample-efficiency record file"
    )
    parser.add_argument("--tag", default="", help="suffix of the audit file's name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    audit_path = args.out / f"elision_audit{args.tag}.json"
    audits = json.loads(audit_path.read_text()) if audit_path.exists() else []
    for seed in args.seeds:
        cfg = DemoConfig(
            task=args.task,
            steps=args.steps,
            seed=seed,
            eval_every=args.eval_every,
            test_per_task=args.test_per_task,
            keep_ratio=args.keep_ratio,
            reference_steps=args.reference_steps,
            clock="cpu",
            progress=False,
        )
        settings = current_settings(cfg)
        done = {(a["seed"], a["run"]) for a in audits if a["task"] == args.task and settings_of(a) == settings}
        pending = [run for run in args.runs if (seed, run) not in done]
        if not pending:
            continue
        setup = prepare(Path(tempfile.mkdtemp(prefix=f"elision-audit-{seed}-")), cfg)
        for run in pending:
            audit, result = audit_run(setup, run, args.keep_ratio)
            audits.append({"task": args.task, "seed": seed, "settings": settings, **audit})
            print(table(audits[-1]) + "\n", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            write_records(audit_path, audits)
            if args.evidence is not None:
                record = record_of(result, args.task, seed, settings)
                records = [
                    r
                    for r in load_records(args.evidence)
                    if not (run_key(r) == run_key(record) and settings_of(r) == settings)
                ]
                write_records(args.evidence, [*records, record])


if __name__ == "__main__":
    main()
