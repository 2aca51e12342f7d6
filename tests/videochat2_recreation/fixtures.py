"""The VideoChat2 checks' shared parts (importable in the main env and in the pinned one): a tiny re-created
student, a batch, the pre-merge samples built independently of the adapter, a reference cache keyed by them, and
the brute-force loss of a sparse step."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from regate_plugin.core import batch_sample_keys, shift_targets, tokenizer_fingerprint
from regate_plugin.data.templates import IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from regate_plugin.store import ReferenceLossCacheWriter

from .videochat2 import IGNORE, VideoChat2_it_mistral, process_qa

QUERIES = 3 + 2  # num_query_token + extra_num_query_token: the visual rows per sample
CONVERSATIONS = [
    [{"q": "what is in this video", "a": "a red circle moves left"}],
    [{"q": "how many shapes are there", "a": "two"}, {"q": "what colour", "a": "green and blue square"}],
    [{"q": "", "a": "a cat sits on the mat"}],
    [{"q": "describe the clip", "a": "one yellow triangle appears at the start of the clip and moves up"}],
]


def tiny_student(base: Path, max_txt_len: int = 128) -> VideoChat2_it_mistral:
    torch.manual_seed(0)
    config = {
        "mistral_model_path": str(base),
        "vision_width": 16,
        "num_query_token": 3,
        "extra_num_query_token": 2,
        "use_lora": True,
        "lora_dropout": 0.0,
        "torch_dtype": torch.float32,
        "max_txt_len": max_txt_len,
    }
    model = VideoChat2_it_mistral(config)
    for name, parameter in model.mistral_model.named_parameters():  # LoRA's B starts at zero: give it a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model.train()


def batch(frames: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """`(image [B, T, C, H, W], conversations, instructions)` as VideoChat2's loop hands them to the model."""
    start, end = ("<Image>", "</Image>") if frames == 1 else ("<Video>", "</Video>")
    prompts = [process_qa(qa, "you are helpful ", start, end)[0] for qa in CONVERSATIONS]
    images = torch.randn(len(prompts), frames, 3, 8, 8, generator=torch.Generator().manual_seed(frames))
    return images, prompts, [""] * len(prompts)


def premerge_samples(model: VideoChat2_it_mistral, prompts: list[str], frames: int) -> dict[str, torch.Tensor]:
    """The pre-merge samples, built here from the prompts: `[BOS] + before + [placeholder] + after`, the answers
    supervised as the model masks them, cut where VideoChat2's own length limit cuts the merged sample."""
    end, placeholder = ("</Image>", IMAGE_TOKEN_INDEX) if frames == 1 else ("</Video>", VIDEO_TOKEN_INDEX)
    samples = []
    for prompt in prompts:
        before, after = prompt.split(end)
        before_ids = model._ids(before)[0].tolist()
        after_ids = model._ids(end + after)
        answers = model._answer_targets(end + after, after_ids)[0].tolist()
        ids = [model.mistral_tokenizer.bos_token_id, *before_ids, placeholder, *after_ids[0].tolist()]
        labels = [IGNORE] * (len(before_ids) + 2) + answers
        samples.append((ids, labels, len(before_ids) + QUERIES + len(answers)))
    length = min(max(n for _, _, n in samples) + 1, model.max_txt_len + QUERIES)  # merged length, with BOS
    cut = [min(len(ids), length - QUERIES + 1) for ids, _, _ in samples]  # one placeholder for QUERIES rows
    width = max(cut)
    out = {key: torch.full((len(samples), width), fill) for key, fill in (("input_ids", 0), ("labels", IGNORE))}
    out["attention_mask"] = torch.zeros(len(samples), width, dtype=torch.long)
    for b, ((ids, labels, _), n) in enumerate(zip(samples, cut)):
        out["input_ids"][b, :n], out["labels"][b, :n] = torch.tensor(ids[:n]), torch.tensor(labels[:n])
        out["attention_mask"][b, :n] = 1
    return out


def reference_cache(
    model: VideoChat2_it_mistral, prompts: list[str], frames: int, directory: Path, rows: int = QUERIES
) -> Path:
    """A reference cache with seeded losses for every answer target, keyed by `premerge_samples`, recording
    `rows` visual rows per placeholder."""
    samples = premerge_samples(model, prompts, frames)
    keys = batch_sample_keys(samples["input_ids"], samples["labels"], samples["attention_mask"])
    targets = (shift_targets(samples["labels"], samples["attention_mask"]) != IGNORE).sum(1).tolist()
    gen = torch.Generator().manual_seed(0)
    with ReferenceLossCacheWriter(
        directory,
        reference="test",
        tokenizer_fingerprint=tokenizer_fingerprint(model.mistral_tokenizer),
        reference_mode="gap",
        visual_tokens=rows,
    ) as writer:
        for key, n in zip(keys, targets):
            writer.add(key, torch.rand(n, generator=gen) * 5)
    return directory


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def brute_force_loss(model: VideoChat2_it_mistral, inputs: dict, kept: torch.Tensor) -> float:
    """The mean cross-entropy of the kept positions' targets, each sample's kept rows run alone through the
    decoder at their original positions (`inputs`: what VideoChat2 passed its LLM; `kept`: the plan's mask)."""
    embeds, labels = inputs["inputs_embeds"], inputs["labels"]
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    llm = model.mistral_model.get_base_model()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(labels.shape[0]):
            rows = kept[b].nonzero().squeeze(1)
            hidden = llm.model(  # an explicit mask: transformers 5 reads gapped positions alone as packed sequences
                inputs_embeds=embeds[b : b + 1, rows],
                attention_mask=torch.ones(1, len(rows), dtype=torch.long),
                position_ids=rows[None],
                use_cache=False,
            )
            logits = llm.lm_head(hidden.last_hidden_state)[0].float()
            total += F.cross_entropy(logits, targets[b, rows], ignore_index=IGNORE, reduction="sum").item()
            count += int((targets[b, rows] != IGNORE).sum())
    return total / count
