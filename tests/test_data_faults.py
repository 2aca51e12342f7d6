"""Bad training data and numeric edge cases on the data side (docs/RELIABILITY.md): strict JSON, non-UTF-8 bytes,
oversized images, empty videos, a float16 EMA fed a huge loss."""

from __future__ import annotations

import torch

from regate_plugin.core import DifficultyEMA


def test_a_float16_ema_saturates_at_its_largest_value_instead_of_holding_inf():
    """One loss above float16's range: the entry holds 65504, and later observations pull it back down as the
    EMA of the saturated value would (float32 reference: the same sequence with the huge loss replaced by 65504)."""
    big = 1e6
    half, reference = DifficultyEMA(beta=0.5, slots=2, vocab_size=3, dtype="float16"), DifficultyEMA(0.5, 2, 3)
    slots, ids = torch.tensor([0]), torch.tensor([1])
    half.update(slots, ids, torch.tensor([big]))
    reference.update(slots, ids, torch.tensor([65504.0]))
    assert half.values[0].item() == 65504.0 and torch.isfinite(half.values[:-1].nan_to_num(0)).all()
    for loss in (2.0, 3.0, 1.0):
        half.update(slots, ids, torch.tensor([loss]))
        reference.update(slots, ids, torch.tensor([loss]))
    assert torch.isfinite(half.values[0])
    torch.testing.assert_close(half.values[0].float(), reference.values[0], rtol=1e-3, atol=0)
    assert torch.isfinite(half.per_token[1])  # the per-token table is float32: the huge loss is kept as it is
