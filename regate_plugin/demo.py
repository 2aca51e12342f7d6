"""`regate demo`: the whole ReGATE loop on a tiny LLaVA, offline, in about a minute on 2 CPU cores.

1. Generate an image-QA set: a coloured image, a question, and an answer that mixes template words any text
   model can guess ("the colour of the picture is") with the one word only the image tells (the colour).
2. Build a tiny base LLM and train it on the answers' text alone: the reference LLM.
3. Score every training sample with it into a `ReferenceLossCache` (what `regate precompute` does at scale).
4. Train the same student (base LLM + tiny CLIP tower + projector) three ways from the same start:
   `none`, `regate`, `random`; report answer tokens processed, time, and colour accuracy on held-out images.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tqdm.auto import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from .adapters import enable_token_elision
from .core import IGNORE_INDEX, ReferenceLossCacheWriter, ReGATEConfig, batch_sample_keys, build_token_elision
from .core.keys import tokenizer_fingerprint
from .teacher import ReferenceScorer

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1),
           "purple": (0.6, 0.1, 0.8), "cyan": (0.1, 0.9, 0.9)}
QUESTIONS = ["what colour is the picture ?", "describe the colour of the picture .", "which colour do you see ?"]
ANSWER = "the colour of the picture is {} and that is all ."
IMAGE_ROWS = 4


@dataclass
class DemoResult:
    mode: str
    answer_tokens: int
    candidates_kept: float
    seconds: float
    accuracy: float
    final_loss: float
    curve: list[tuple[int, float]]  # (answer tokens processed, held-out colour accuracy), from step 0


def _tokenizer() -> PreTrainedTokenizerFast:
    words = sorted({w for text in QUESTIONS + [ANSWER] for w in text.split()} | set(COLOURS) - {"{}"})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", "user:", "assistant:"] + words)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _sample(tok: PreTrainedTokenizerFast, gen: torch.Generator) -> tuple[list[int], list[int], torch.Tensor, str]:
    colour = list(COLOURS)[int(torch.randint(len(COLOURS), (1,), generator=gen))]
    question = QUESTIONS[int(torch.randint(len(QUESTIONS), (1,), generator=gen))]
    prompt = [tok.bos_token_id] + tok.convert_tokens_to_ids(["user:", *(["<image>"] * IMAGE_ROWS)] + question.split() + ["assistant:"])
    answer = tok.convert_tokens_to_ids(ANSWER.format(colour).split()) + [tok.eos_token_id]
    rgb = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    image = (rgb + 0.15 * torch.randn(3, 28, 28, generator=gen)).clamp(0, 1)
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, image, colour


def _collate(rows: list, pad_id: int, images: bool = True) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, *_ in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), pad_id),
        "labels": torch.full((len(rows), length), IGNORE_INDEX),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
    }
    for b, (ids, labels, *_rest) in enumerate(rows):
        batch["input_ids"][b, : len(ids)] = torch.tensor(ids)
        batch["labels"][b, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][b, : len(ids)] = 1
    if images:
        batch["pixel_values"] = torch.stack([row[2] for row in rows])
    return batch


def _student(tok: PreTrainedTokenizerFast, base: LlamaForCausalLM, seed: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=base.config, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=IMAGE_ROWS, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(base.model.state_dict())
    model.lm_head.load_state_dict(base.lm_head.state_dict())
    model.model.vision_tower.requires_grad_(False)
    return model


def _colour_accuracy(model: LlavaForConditionalGeneration, tok: PreTrainedTokenizerFast, rows: list) -> float:
    """Teacher-forced: does the model put the right colour after "... the picture is"?"""
    model.eval()
    batch = _collate(rows, tok.pad_token_id)
    colour_ids = torch.tensor(tok.convert_tokens_to_ids(list(COLOURS)))
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    correct = 0
    for b, (ids, _labels, _img, colour) in enumerate(rows):
        at = ids.index(tok.convert_tokens_to_ids(colour), len(ids) - 8) - 1
        predicted = colour_ids[logits[b, at, colour_ids].argmax()]
        correct += int(predicted == tok.convert_tokens_to_ids(colour))
    model.train()
    return correct / len(rows)


def run_demo(
    out_dir: Path, steps: int = 200, batch_size: int = 8, seed: int = 0, keep_ratio: float = 0.35, eval_every: int = 20
) -> list[DemoResult]:
    gen = torch.Generator().manual_seed(seed)
    tok = _tokenizer()
    train = [_sample(tok, gen) for _ in range(steps * batch_size)]
    test = [_sample(tok, gen) for _ in range(96)]

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    reference = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    image_id = tok.convert_tokens_to_ids("<image>")
    text_only = [
        ([i for i in ids if i != image_id], [l for i, l in zip(ids, labels) if i != image_id], None)
        for ids, labels, *_ in train
    ]
    for step in tqdm(range(40), desc="reference LLM (text only)"):
        rows = [text_only[(step * batch_size + j) % len(text_only)] for j in range(batch_size)]
        batch = _collate(rows, tok.pad_token_id, images=False)
        loss = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    reference.eval()

    cache_dir = out_dir / "reference_cache"
    scorer = ReferenceScorer(reference, mode="gap", visual_token_ids=[image_id], visual_rows=1, pad_token_id=tok.pad_token_id)
    with ReferenceLossCacheWriter(cache_dir, teacher="demo-reference", tokenizer_fingerprint=tokenizer_fingerprint(tok),
                                  reference_mode="gap", overwrite=True) as writer:
        for start in tqdm(range(0, len(train), 64), desc="precompute reference losses"):
            chunk = train[start : start + 64]
            losses = scorer.score([(ids, labels) for ids, labels, *_ in chunk])
            batch = _collate(chunk, tok.pad_token_id)
            for key, values in zip(batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"]), losses):
                writer.add(key, values)

    cfg = ReGATEConfig(keep_ratio=keep_ratio, warmup_steps=steps // 6, cycle_steps=max(steps // 3, 2), dense_steps=2)
    results = []
    start_model = _student(tok, base, seed)
    for mode in ("none", "regate", "random"):
        model = copy.deepcopy(start_model)
        model.train()
        elision = build_token_elision(mode, cfg, **({"reference": cache_dir, "tokenizer": tok} if mode == "regate" else {}))
        enable_token_elision(model, elision)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        answer_tokens, seconds, loss = 0, 0.0, torch.tensor(0.0)
        curve = [(0, _colour_accuracy(model, tok, test))]
        for step in tqdm(range(steps), desc=f"train student ({mode})"):
            began = time.perf_counter()
            elision.set_step(step)
            out = model(**_collate(train[step * batch_size : (step + 1) * batch_size], tok.pad_token_id))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds += time.perf_counter() - began
            answer_tokens += out.token_elision["targets"]
            loss = out.loss.detach()
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                curve.append((answer_tokens, _colour_accuracy(model, tok, test)))
        results.append(DemoResult(mode, answer_tokens, elision.stats.kept_fraction, seconds, curve[-1][1], float(loss), curve))
    return results


def plot_curves(results: list[DemoResult], path: Path, title: str = "") -> Path:
    """Held-out accuracy against answer tokens processed, one line per mode (the paper's Figure 1 in miniature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([t for t, _ in r.curve], [a for _, a in r.curve], marker="o", markersize=3, label=r.mode)
    ax.set_xlabel("answer tokens processed (loss terms)")
    ax.set_ylabel("held-out colour accuracy")
    ax.set_title(title or "regate demo")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_results(results: list[DemoResult]) -> str:
    lines = [f"{'mode':<8} {'answer tokens':>13} {'kept':>6} {'time s':>7} {'colour acc':>10} {'last loss':>9}"]
    for r in results:
        lines.append(f"{r.mode:<8} {r.answer_tokens:>13} {r.candidates_kept:>6.2f} {r.seconds:>7.1f} "
                     f"{r.accuracy:>10.2f} {r.final_loss:>9.3f}")
    return "\n".join(lines)
