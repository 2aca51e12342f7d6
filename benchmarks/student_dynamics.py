"""Where a demo student's visual pathway stands while `none` trains: every 25 steps, the teacher-forced loss and
accuracy of the test answers' tokens that need the image, the scale of the projected visual rows against the text
embeddings, and the gradient norm reaching the projector; several student variants trained in lockstep on the same
batches from the same start (plain training, no elision).

    python benchmarks/student_dynamics.py --task refer-back --seed 1 --steps 300 --variants base scale plr10 \
        --out docs/benchmarks/student_dynamics.json

Variants: `base` (one learning rate for LLM and projector: the demo's first student), `scale` (the projector's
output scaled at the start to the text embeddings' RMS), `plr10` / `plr30` (the projector's learning rate x10 /
x30), `llr3` (every learning rate x3), `llm01` (the LLM's x0.1: the projector leads, as in LLaVA's alignment stage;
the demo's student since issue 25), `llm01_plr10` (both). `--patch` overrides the task's patch size (fewer,
larger visual rows). Records are appended to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from regate_plugin.demo import DemoConfig, prepare
from regate_plugin.demo import tasks as demo_tasks
from regate_plugin.demo.collate import collate

VARIANTS = {  # name: (LLM learning-rate factor, projector learning-rate factor, scale the projector's output)
    "base": (1.0, 1.0, False),
    "scale": (1.0, 1.0, True),
    "plr10": (1.0, 10.0, False),
    "plr30": (1.0, 30.0, False),
    "llr3": (3.0, 3.0, False),
    "llm01": (0.1, 1.0, False),
    "llm01_plr10": (0.1, 10.0, False),
}


def scales(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """RMS of the text embeddings, of the projected visual rows, and of the visual rows' spread (per-dimension
    standard deviation over rows and images: the part that is not one constant vector)."""
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(batch["input_ids"])
        text = embeddings[batch["attention_mask"].bool() & (batch["input_ids"] != model.config.image_token_id)]
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]
        rows = model.model.multi_modal_projector(hidden).reshape(-1, embeddings.shape[-1])
    rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
    return rms(text), rms(rows), float(rows.std(0).pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="refer-back", choices=sorted(demo_tasks.TASKS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    parser.add_argument("--patch", type=int, default=None, help="override the task's patch size")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.patch:
        demo_tasks.TASKS[args.task] = dataclasses.replace(demo_tasks.TASKS[args.task], patch=args.patch)
    cfg = DemoConfig(task=args.task, seed=args.seed, progress=False)
    setup = prepare(Path(tempfile.mkdtemp(prefix="student-dynamics-")), cfg)
    pad = setup.processor.tokenizer.pad_token_id
    test = collate(setup.test_samples, pad)
    visual = torch.zeros_like(test["labels"], dtype=torch.bool)
    for b, sample in enumerate(setup.test_samples):
        supervised = [i for i, label in enumerate(sample.labels) if label != -100]
        for position, needs_image in zip(supervised, sample.visual, strict=True):
            visual[b, position] = needs_image
    probe = collate(setup.samples[:8], pad)
    runs = {}
    for name in args.variants:
        llm_lr, projector_lr, scale = VARIANTS[name]
        model = copy.deepcopy(setup.start).train()
        projector = model.model.multi_modal_projector
        if scale:
            text, rows, _ = scales(model, probe)
            with torch.no_grad():
                projector.linear_2.weight.mul_(text / rows)
        others = [p for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" not in n]
        groups = [
            {"params": others, "lr": cfg.learning_rate * llm_lr},
            {"params": list(projector.parameters()), "lr": cfg.learning_rate * projector_lr},
        ]
        runs[name] = (model, torch.optim.AdamW(groups))
    records = []
    for step in range(args.steps + 1):
        rows = [setup.samples[(step * cfg.batch_size + j) % len(setup.samples)] for j in range(cfg.batch_size)]
        batch = collate(rows, pad)
        for name, (model, optimizer) in runs.items():
            if step % args.every == 0:
                model.eval()
                with torch.no_grad():
                    logits = model(**test).logits[:, :-1]
                labels, needs = test["labels"][:, 1:], visual[:, 1:]
                visual_loss = float(torch.nn.functional.cross_entropy(logits[needs], labels[needs]))
                visual_acc = float((logits[needs].argmax(-1) == labels[needs]).float().mean() * 100)
                text_rms, rows_rms, rows_spread = scales(model, probe)
                model.train()
            loss = model(**batch).loss
            loss.backward()
            if step % args.every == 0:
                grad = sum(float(p.grad.norm() ** 2) for p in model.model.multi_modal_projector.parameters()) ** 0.5
                record = {
                    "task": args.task,
                    "seed": args.seed,
                    "patch": demo_tasks.TASKS[args.task].patch,
                    "variant": name,
                    "step": step,
                    "loss": round(float(loss), 4),
                    "visual_loss": round(visual_loss, 4),
                    "visual_acc": round(visual_acc, 1),
                    "text_rms": round(text_rms, 4),
                    "rows_rms": round(rows_rms, 4),
                    "rows_spread": round(rows_spread, 4),
                    "projector_grad": round(grad, 5),
                }
                records.append(record)
                print(json.dumps(record), flush=True)
            optimizer.step()
            optimizer.zero_grad()
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps(old + records, indent=1) + "\n")


if __name__ == "__main__":
    main()
