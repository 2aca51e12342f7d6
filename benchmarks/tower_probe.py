"""How much of each task's facts the demo student's frozen vision tower passes on, per seed: a linear probe
(multinomial logistic regression) fit on the tower's patch features of training images and scored on held-out ones.

    python benchmarks/tower_probe.py --seeds 0 1 2 3 4 5 6 7 8 9 --out docs/benchmarks/tower_probe.json

If a seed's tower does not separate a fact linearly, no training of the projector and LLM recovers it quickly; if
every seed's does, a seed that does not learn is stuck elsewhere (docs/METHOD.md, "Why `none` did not learn").
Features: the tower's last hidden state without CLS (what LLaVA's projector sees), mean-pooled over patches (32
numbers) and all patches concatenated; the probe also runs on the projector's output at the student's start.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessorPil, LlamaConfig, LlamaForCausalLM

from regate_plugin.demo import data as squares
from regate_plugin.demo import scenes
from regate_plugin.demo.models import build_student

Labelled = tuple[list[np.ndarray], dict[str, list[str]]]  # images, fact -> label per image


def refer_back(n: int, rng: random.Random) -> Labelled:
    images, labels = [], {"colour": [], "size": []}
    for _ in range(n):
        facts = rng.choice(scenes.REFER_BACK_POOL)
        images.append(scenes.refer_back_sample(rng, facts)[2])
        labels["colour"].append(facts[0])
        labels["size"].append(facts[1])
    return images, labels


def describe(n: int, rng: random.Random) -> Labelled:
    names = ("background", "count", "size", "colour")
    images, labels = [], {name: [] for name in names}
    for _ in range(n):
        facts = rng.choice(scenes.DESCRIBE_POOL)
        images.append(scenes.describe_sample(rng, facts)[2])
        for name, value in zip(names, facts):
            labels[name].append(value)
    return images, labels


def squares_frames(n: int, rng: random.Random) -> Labelled:
    images, labels = [], {"colour": [], "count": []}
    for _ in range(n):
        facts = squares.Facts(
            rng.choice(list(squares.COLOURS)), rng.choice(list(squares.CORNERS)), rng.choice(list(squares.COUNTS))
        )
        images.append(squares.draw_clip(rng, facts)[-1])
        labels["colour"].append(facts.colour)
        labels["count"].append(facts.count)
    return images, labels


def easy_vqa(n: int, rng: random.Random) -> Labelled:
    from PIL import Image

    from regate_plugin.demo.easy_vqa import _colour_questions, _image_paths

    paths = _image_paths("train")
    drawn = rng.sample(_colour_questions("train"), n)
    images = [np.asarray(Image.open(paths[i]).convert("RGB")) for _, _, i in drawn]
    return images, {"colour": [a for _, a, _ in drawn]}


TASKS: dict[str, tuple[Callable[[int, random.Random], Labelled], int, int]] = {  # draw, image size, patch
    "refer-back": (refer_back, 32, 8),
    "describe": (describe, 32, 8),
    "squares": (squares_frames, 32, 16),
    "easy-vqa": (easy_vqa, 64, 8),
}


def probe(features: torch.Tensor, labels: list[str], train: int, steps: int = 300) -> float:
    """Held-out accuracy (%) of a multinomial logistic regression on standardized `features`."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    x = features.flatten(1).double()
    mean, std = x[:train].mean(0), x[:train].std(0) + 1e-8
    x = (x - mean) / std
    linear = torch.nn.Linear(x.shape[1], len(classes)).double()
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x[:train]), y[:train]) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(x[train:]).argmax(1) == y[train:]).double().mean() * 100)


def tower_features(seed: int, images: list[np.ndarray], size: int, patch: int) -> dict[str, torch.Tensor]:
    # the tower depends on the seed alone (not on the LLM's vocabulary); the projector is the student's start
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )

    class _Tokenizer:
        def convert_tokens_to_ids(self, token: str) -> int:
            return 4

    student = build_student(base, _Tokenizer(), seed, size, patch).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = student.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        projected = student.model.multi_modal_projector(hidden)
    return {"pooled": hidden.mean(1), "patches": hidden, "projector": projected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for task in args.tasks:
        draw, size, patch = TASKS[task]
        images, labels = draw(args.train + args.test, random.Random(1234))
        for seed in args.seeds:
            features = tower_features(seed, images, size, patch)
            row = {"task": task, "seed": seed}
            for fact, values in labels.items():
                for name, x in features.items():
                    row[f"{fact}/{name}"] = round(probe(x, values, args.train), 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
