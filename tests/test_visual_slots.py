"""EMA slot groups per visual input (`--regate_ema_visual_slots`): samples with one text and different images keep
apart EMA entries, chosen by a fingerprint of their pixels; reference losses stay the text's. Checked against the
EMA rule applied by hand to each sample's own observed losses, and against the shared entry of one slot group."""

import pytest
import torch

from regate_plugin import enable_token_elision
from regate_plugin.core import ReGATEConfig, batch_sample_keys
from regate_plugin.core.keys import visual_fingerprints
from regate_plugin.strategies import build_token_elision

from .tiny import make_batch, tiny_llava, write_cache_for

BETA = 0.5


def _same_text_batch(groups: int) -> dict[str, torch.Tensor]:
    """Two rows with the same ids and labels and different images whose fingerprints differ mod `groups`."""
    batch = make_batch(batch=1, seed=3)
    two = {k: v.repeat(2, *([1] * (v.ndim - 1))) for k, v in batch.items()}
    for seed in range(100):
        pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
        fingerprints = visual_fingerprints(pixels, 2)
        if int(fingerprints[0]) % groups != int(fingerprints[1]) % groups:
            return {**two, "pixel_values": pixels}
    raise AssertionError("no two images with different groups")


def test_fingerprints_are_a_function_of_the_pixels():
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    a, b = visual_fingerprints(pixels, 3), visual_fingerprints(pixels.clone(), 3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 3 and (a >= 0).all()
    as_list = visual_fingerprints([(p, "video") for p in pixels], 3)  # VideoLLaMA2's (tensor, modality) pairs
    assert torch.equal(as_list, a)
    assert visual_fingerprints(pixels, 2) is None and visual_fingerprints(None, 3) is None


def _observe_once(batch, tmp_path, slots: int):
    """One dense step of `regate` through the HF adapter; returns the elision and the row's per-target losses."""
    cache = write_cache_for(tmp_path / f"cache{slots}", [batch])
    cfg = ReGATEConfig(warmup_steps=1, ema_beta=BETA, ema_visual_slots=slots)
    elision = build_token_elision("regate", cfg, reference=cache, vocab_size=512)
    model = enable_token_elision(tiny_llava(), elision)
    out = model(**batch)
    return elision, out


@pytest.mark.parametrize("slots", [1, 4])
def test_same_text_different_images_keep_apart_entries_only_with_slot_groups(tmp_path, slots):
    batch = _same_text_batch(4)
    keys = batch_sample_keys(batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert keys[0] == keys[1]  # one cache entry, one text
    elision, _ = _observe_once(batch, tmp_path, slots)
    model_losses = _per_target_losses(batch)
    tokens = elision.reference.tokens
    assert elision.ema.slots == tokens * slots
    values = elision.ema.values[:-1].reshape(slots, tokens)
    observed = ~torch.isnan(values)
    if slots == 1:  # one entry for both rows: their losses folded in row order, x1 then x2
        expected = BETA * model_losses[0] + (1 - BETA) * model_losses[1]
        torch.testing.assert_close(values[0][observed[0]], expected, atol=1e-5, rtol=1e-5)
    else:  # each row its own group, holding its own loss
        groups = (visual_fingerprints(batch["pixel_values"], 2) % slots).tolist()
        assert observed.any(1).sum() == 2 and all(observed[g].any() for g in groups)
        for row, group in enumerate(groups):
            torch.testing.assert_close(values[group][observed[group]], model_losses[row], atol=1e-5, rtol=1e-5)


def _per_target_losses(batch) -> torch.Tensor:
    """[2, n]: each row's loss at its answer candidates (answer token predicting an answer token), from the model's
    own unelided forward (the same seeded weights)."""
    model = tiny_llava()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    targets = labels[:, 1:]
    candidate = (labels[:, :-1] != -100) & (targets != -100)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
    return torch.stack([losses[row][candidate[row]] for row in range(2)])
