"""Reference losses against the reference LLM's own per-token cross-entropy, computed one sample at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from regate_plugin.core.compaction import IGNORE_INDEX
from regate_plugin.reference import ReferenceScorer

VISUAL = -200  # upstream LLaVA's IMAGE_TOKEN_INDEX: one placeholder that the student expands into `rows` rows


def _independent_nll(model, ids: list[int], labels: list[int], positions: list[int]) -> torch.Tensor:
    """Full-vocabulary logits of the unpadded sequence, NLL of every supervised label after the first token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)
    return torch.tensor([-logp[j - 1, labels[j]] for j in range(1, len(ids)) if labels[j] != IGNORE_INDEX])


def _expected(model, ids, labels, rows, mode, pad_id):
    """Build the reference's view by hand: drop placeholders keeping merged positions, or expand them to pads."""
    out_ids, out_labels, out_pos, merged = [], [], [], 0
    for tok, lab in zip(ids, labels):
        if tok == VISUAL:
            if mode == "pad":
                out_ids += [pad_id] * rows
                out_labels += [IGNORE_INDEX] * rows
                out_pos += list(range(merged, merged + rows))
            merged += rows
        else:
            out_ids.append(tok)
            out_labels.append(lab)
            out_pos.append(merged)
            merged += 1
    if mode == "pad":
        out_pos = list(range(len(out_ids)))
    return _independent_nll(model, out_ids, out_labels, out_pos)


def _samples(gen, vocab, n=4):
    samples = []
    for i in range(n):
        instr = torch.randint(3, vocab, (3 + i,), generator=gen).tolist()
        answer = torch.randint(3, vocab, (4 + 2 * i,), generator=gen).tolist()
        ids = [1] + instr[:2] + [VISUAL] + instr[2:] + answer
        labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
        if i % 2:  # a second turn
            more = torch.randint(3, vocab, (3,), generator=gen).tolist()
            ids += [5, 6] + more
            labels += [IGNORE_INDEX, IGNORE_INDEX] + more
        samples.append((ids, labels))
    return samples


@pytest.mark.parametrize("mode", ["gap", "pad"])
def test_tiny_llama_reference_losses(mode):
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    ).eval()
    samples = _samples(torch.Generator().manual_seed(1), 64)
    scorer = ReferenceScorer(model, mode=mode, visual_token_ids=[VISUAL], visual_rows=5, pad_token_id=0)
    got = scorer.score(samples)
    for (ids, labels), losses in zip(samples, got):
        expected = _expected(model, ids, labels, 5, mode, 0)
        assert losses.shape == expected.shape and losses.numel() == sum(label != IGNORE_INDEX for label in labels)
        torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)


def test_gap_and_pad_differ_only_through_the_visual_rows():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    samples = [([1, 7, 8, 9, 10, 11], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11])]  # no image
    gap = ReferenceScorer(model, mode="gap", visual_token_ids=[VISUAL], visual_rows=5, pad_token_id=0).score(samples)
    pad = ReferenceScorer(model, mode="pad", visual_token_ids=[VISUAL], visual_rows=5, pad_token_id=0).score(samples)
    torch.testing.assert_close(gap[0], pad[0])


@pytest.mark.parametrize("mode", ["gap", "pad"])
def test_real_smollm2_reference_losses(smollm2, mode):
    model, tokenizer = smollm2
    texts = [
        ("User: Describe the picture. ", "Assistant: The ball in the picture is red and it rolls to the left."),
        ("User: How many cats are there? ", "Assistant: There are three cats."),
    ]
    samples = []
    for prompt, answer in texts:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids = p[:3] + [VISUAL] + p[3:] + a
        samples.append((ids, [IGNORE_INDEX] * (len(ids) - len(a)) + a))
    scorer = ReferenceScorer(
        model, mode=mode, visual_token_ids=[VISUAL], visual_rows=16, pad_token_id=tokenizer.pad_token_id
    )
    scored = scorer.score(samples)
    for (ids, labels), losses in zip(samples, scored):
        expected = _expected(model, ids, labels, 16, mode, tokenizer.pad_token_id)
        torch.testing.assert_close(losses, expected, atol=1e-4, rtol=1e-4)
    everything = torch.cat(scored)
    assert everything.max() > 4 * everything.min()  # a real LM: some answer tokens are easy, some are not
