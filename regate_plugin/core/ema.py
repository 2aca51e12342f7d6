"""`DifficultyEMA`: the student's running per-token loss, m <- beta*m + (1-beta)*loss (docs/METHOD.md).

Values live in two flat arrays on the model's device. `values` has one slot per stored reference loss, aligned to
the reference cache's token space (slot = the sample's start + the target's answer ordinal), so the EMA costs
4 bytes per answer token in float32 (2 in float16) and is looked up by the same gather as the reference losses.
`per_token` is the fallback kept per target token id, [vocab]: a sample never seen before (the common case in
one-epoch fine-tuning) is scored by it; a token id never seen either has no value (NaN), and the score then uses
the reference loss alone. The first observation initialises an entry (no bias towards 0). A non-finite loss (NaN,
inf) is not an observation: it is dropped from both tables in the same vectorised update (no host sync), so one
diverged step can neither poison an entry for good nor reset its history; `TokenElision.stats.nonfinite` counts
such losses.

Order: `update` folds a sequence of observations in its order. When an entry occurs k times with losses
x_0 .. x_{k-1} (a token id repeats within a batch), the k sequential updates fold in closed form,
beta^k * m + sum_i (1 - beta) * beta^(k-1-i) * x_i (an unseen entry starts from x_0: beta^(k-1) * x_0 + ...),
as one sort, one float64 prefix sum and one scatter, the same numbers on every device and in every process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


class DifficultyEMA:
    """Per-slot and per-token-id EMA tables; index -1 (or out of range) means "no entry"."""

    def __init__(self, beta: float = 0.9, slots: int = 0, vocab_size: int = 0, dtype: str = "float32") -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ema beta={beta!r} is outside the allowed range [0, 1)")
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"ema dtype {dtype!r} is not one of {sorted(_TORCH_DTYPES)}")
        self.beta = beta
        # One extra trailing entry in each table absorbs updates that have no entry (index -1); it is reset to NaN
        # after every update, so looking it up always reads "unknown".
        self.values = torch.full((slots + 1,), float("nan"), dtype=_TORCH_DTYPES[dtype])
        self.per_token = torch.full((vocab_size + 1,), float("nan"))

    @property
    def slots(self) -> int:
        return self.values.numel() - 1

    @property
    def vocab_size(self) -> int:
        return self.per_token.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str) -> DifficultyEMA:
        """Move both tables (once, to the model's device); returns self."""
        self.values, self.per_token = self.values.to(device), self.per_token.to(device)
        return self

    def ensure_vocab(self, size: int) -> None:
        """Grow `per_token` to cover token ids below `size` (a host-known bound: no device sync)."""
        if size > self.vocab_size:
            grown = torch.full((size + 1,), float("nan"), device=self.device)
            grown[: self.vocab_size] = self.per_token[:-1]
            self.per_token = grown

    def observed(self) -> int:
        """Number of (sample, ordinal) slots with a value (a host sync; for tests and reports)."""
        return int((~torch.isnan(self.values[:-1])).sum())

    def lookup(self, slots: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Difficulty (float32, same shape) of each (slot, token id); the per-token value where the slot has none."""
        per_sample = self.values[self._index(slots, self.slots)].float()
        per_token = self.per_token[self._index(token_ids, self.vocab_size)]
        return torch.where(torch.isnan(per_sample), per_token, per_sample)

    def update(self, slots: torch.Tensor, token_ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold observations (1-D, in order) into both tables; entries -1 are skipped in that table only, and
        non-finite losses in both."""
        if not (slots.shape == token_ids.shape == losses.shape) or slots.ndim != 1:
            raise ValueError("EMA update: slots, token_ids and losses must be 1-D and of the same length")
        if slots.numel() == 0:
            return
        losses = losses.detach().to(self.device, torch.float64)
        dropped = ~torch.isfinite(losses)  # the discard entries get them, as zeros
        slots = self._index(slots.to(self.device), self.slots).masked_fill(dropped, self.slots)
        token_ids = self._index(token_ids.to(self.device), self.vocab_size).masked_fill(dropped, self.vocab_size)
        losses = losses.masked_fill(dropped, 0.0)
        # Both tables in one fold: the per-token entries follow the slot entries in one index space.
        old = torch.cat([self.values[slots].to(torch.float64), self.per_token[token_ids].to(torch.float64)])
        new = fold_ema(torch.cat([slots, token_ids + (self.slots + 1)]), losses.repeat(2), old, self.beta)
        n = slots.numel()
        # every observation of an entry writes the same value; a float16 table saturates at its largest finite value
        # (65504) rather than overflowing to an inf that no later observation could bring back
        self.values[slots] = _saturated(new[:n], self.values.dtype)
        self.per_token[token_ids] = _saturated(new[n:], self.per_token.dtype)
        self.values[-1] = self.per_token[-1] = float("nan")

    @staticmethod
    def _index(ids: torch.Tensor, size: int) -> torch.Tensor:
        return torch.where((ids >= 0) & (ids < size), ids, size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "values": self.values[:-1].detach().cpu().clone(),
            "per_token": self.per_token[:-1].detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values, per_token = state["values"], state["per_token"]
        if values.numel() != self.slots:
            raise ValueError(f"EMA state has {values.numel()} slots, this table has {self.slots}")
        nan = torch.full((1,), float("nan"))
        self.beta = float(state["beta"])
        self.values = torch.cat([values.to(self.values.dtype), nan.to(self.values.dtype)]).to(self.device)
        self.per_token = torch.cat([per_token.float(), nan]).to(self.device)


def _saturated(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bound = torch.finfo(dtype).max
    return values.clamp(-bound, bound).to(dtype)


def fold_ema(index: torch.Tensor, losses: torch.Tensor, old: torch.Tensor, beta: float) -> torch.Tensor:
    """The value of each observation's entry after the sequential EMA updates m[index[i]] <- losses[i], i = 0, 1, ...
    (closed form), from `old` (float64, each observation's entry before; NaN: no value yet). Float64.

    Sums run in float64 over a stable sort by entry, so the result depends only on the sequence, not on the device's
    scatter order; no host sync.
    """
    n = index.numel()
    order = torch.sort(index, stable=True).indices
    entry, x, before = index[order], losses[order].to(torch.float64), old[order]
    position = torch.arange(n, device=index.device)
    starts = torch.ones(n, dtype=torch.bool, device=index.device)
    starts[1:] = entry[1:] != entry[:-1]
    first = torch.cummax(torch.where(starts, position, 0), 0).values  # each observation's entry's first one
    count = torch.zeros_like(position).index_add_(0, first, torch.ones_like(position))[first]
    rank = position - first  # i and k of each observation within its entry
    unseen = torch.isnan(before)
    decay = torch.pow(beta, (count - 1 - rank).to(torch.float64))
    weight = torch.where(unseen & (rank == 0), decay, (1.0 - beta) * decay)
    terms = weight * x
    prefix = torch.cumsum(terms, 0)
    total = prefix[first + count - 1] - (prefix - terms)[first]
    kept = torch.where(unseen, 0.0, before * torch.pow(beta, count.to(torch.float64)))
    return torch.empty_like(kept).index_put_((order,), kept + total)


def all_gather_observations(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each 1-D tensor concatenated over the ranks in rank order (lengths may differ between ranks)."""
    world = dist.get_world_size()
    device = tensors[0].device
    size = torch.tensor([tensors[0].numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = torch.cat(sizes).tolist()
    longest = max(lengths)
    gathered = []
    for tensor in tensors:
        padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
        padded[: tensor.numel()] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:length] for part, length in zip(parts, lengths)]))
    return tuple(gathered)
