"""Run by any env's python (transformers 4.37, 4.40 or 5.x): `regate precompute --mode gap` with tiny Llama,
Mistral and Qwen2 reference LLMs, against an independent per-token cross-entropy of each sample: the whole merged
sequence at contiguous positions, its visual rows masked out of attention (so the text tokens see exactly what
the gap reference shows them, without position ids with gaps). Prints {arch: largest absolute difference}.

    python tests/gap_reference_check.py TOKENIZER_DIR DATA.json WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from regate_plugin.cli import main as regate
from regate_plugin.core import IGNORE_INDEX, sample_key
from regate_plugin.data import get_template, iter_conversations
from regate_plugin.data.templates import PLACEHOLDER_IDS
from regate_plugin.store import ReferenceLossCache
from tests.llava_data import write_tiny_reference

ROWS = 9  # visual rows per placeholder
MAX_LEN = 128
TEMPLATE = "v1"


def independent_losses(reference: Path, data: Path) -> dict[bytes, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(reference, attn_implementation="eager").eval()
    template = get_template(TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(reference, use_fast=template.use_fast)  # as precompute loads it
    expected = {}
    for sample in iter_conversations(data):
        encoded = template.encode(sample, tokenizer, MAX_LEN)
        ids, labels = encoded.input_ids[:MAX_LEN], encoded.labels[:MAX_LEN]
        key = sample_key(ids, [x != IGNORE_INDEX for x in labels])
        merged_ids, merged_labels, visible = [], [], []
        for token, label in zip(ids, labels):
            visual = token in PLACEHOLDER_IDS
            rows = ROWS if visual else 1
            merged_ids += [0 if visual else token] * rows
            merged_labels += [label] * rows
            visible += [not visual] * rows
        merged_ids, merged_labels, visible = merged_ids[:MAX_LEN], merged_labels[:MAX_LEN], visible[:MAX_LEN]
        x, mask = torch.tensor([merged_ids]), torch.tensor([visible], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=mask, position_ids=torch.arange(x.shape[1])[None]).logits[0]
        text = mask[0].bool()
        text_logits, text_labels = logits[text].float(), torch.tensor(merged_labels)[text]
        targets = text_labels[1:]
        supervised = targets != IGNORE_INDEX
        expected[key] = F.cross_entropy(text_logits[:-1][supervised], targets[supervised], reduction="none")
    return expected


def main(tokenizer: str, data: str, work: str) -> None:
    results = {}
    for arch in ("llama", "mistral", "qwen2"):
        reference = write_tiny_reference(Path(work) / arch, Path(tokenizer), seed=3, arch=arch)
        out = Path(work) / f"{arch}-cache"
        code = regate(
            ["precompute", "--no-progress", "--dtype", "float32", "--data", data, "--reference", str(reference)]
            + ["--template", TEMPLATE, "--out", str(out), "--visual-tokens", str(ROWS), "--max-length", str(MAX_LEN)]
            + ["--mode", "gap", "--batch-tokens", "512"]
        )
        assert code == 0, f"{arch}: precompute exited {code}"
        cache, expected = ReferenceLossCache(out), independent_losses(reference, Path(data))
        assert sorted(cache.keys()) == sorted(expected), (arch, len(cache), len(expected))
        results[arch] = max(
            float((cache[key] - value).abs().max()) if value.numel() else 0.0 for key, value in expected.items()
        )
    results["refused_unwidenable"] = refuses_before_writing(Path(work) / "mistral", Path(data), Path(work) / "refused")
    print(json.dumps(results))


def refuses_before_writing(reference: Path, data: Path, out: Path) -> bool | None:
    """Where a table-slicing RoPE keeps no precomputed table (no `max_seq_len_cached` to widen to), `gap` must be
    refused before the output directory exists. None where this transformers' Mistral does not slice."""
    from regate_plugin.core.rotary import slices_to_sequence_length
    from regate_plugin.reference.precompute import PrecomputeConfig, run_precompute

    model = AutoModelForCausalLM.from_pretrained(reference)
    sliced = [m for m in model.modules() if slices_to_sequence_length(m)]
    if not sliced:
        return None
    for module in sliced:
        del module.max_seq_len_cached
    cfg = PrecomputeConfig(
        data=[data], reference=str(reference), template=TEMPLATE, out=out, visual_tokens=ROWS, progress=False
    )
    try:
        run_precompute(cfg, model=model, tokenizer=AutoTokenizer.from_pretrained(reference, use_fast=False))
    except ValueError as err:
        return "--mode pad" in str(err) and not out.exists()
    return False


if __name__ == "__main__":
    main(*sys.argv[1:])
