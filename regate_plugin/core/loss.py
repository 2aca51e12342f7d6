"""Next-token loss on a compact batch: logits only where a kept target exists, cross-entropy in fp32."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .compaction import IGNORE_INDEX

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TokenLoss:
    loss: torch.Tensor  # scalar, differentiable
    per_token: torch.Tensor  # float32 [n_targets], detached, row-major order of `targets != IGNORE_INDEX`
    num_targets: int
    positions: torch.Tensor  # int64 [n_targets]: flat index into targets [B * L] of each per-token loss
    # With `statistics`: -NLL per target (differentiable), the entropy of its next-token distribution and whether
    # the target is the argmax (both detached), in the order of `per_token`; what TRL's loss and metrics read.
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def supervised_positions(targets: torch.Tensor, num_targets: int | None = None) -> torch.Tensor:
    """Flat row-major indices of the targets that are not IGNORE_INDEX.

    With `num_targets` known on the host, a stable sort finds them on an accelerator without a device-to-host
    sync; on CPU (or when it is not known) `nonzero` does.
    """
    supervised = (targets != IGNORE_INDEX).flatten()
    if num_targets is None or targets.device.type == "cpu":
        return supervised.nonzero().squeeze(1)
    return torch.sort((~supervised).to(torch.int8), stable=True).indices[:num_targets]


def _token_nll(hidden: torch.Tensor, targets: torch.Tensor, head: Head) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def _token_terms(
    hidden: torch.Tensor, targets: torch.Tensor, head: Head
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLL, entropy and top-1 hit per target, from one projection of the head."""
    logits = head(hidden).float()
    nll = F.cross_entropy(logits, targets, reduction="none")
    with torch.no_grad():
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        top1 = logits.argmax(-1) == targets
    return nll, entropy, top1


def next_token_loss(
    hidden_states: torch.Tensor,
    targets: torch.Tensor,
    head: Head,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 0,
    num_targets: int | None = None,
    statistics: bool = False,
) -> TokenLoss:
    """Sum of per-target NLLs divided by `num_items_in_batch` (the Trainer's count under gradient accumulation)
    or, when it is None, by the number of targets here.

    `targets` are pre-shifted ([B, L], IGNORE_INDEX where none), so hidden_states[b, p] predicts targets[b, p].
    With `chunk_size` > 0 the logits are built `chunk_size` rows at a time and rebuilt in backward, so at most
    one chunk of [chunk_size, vocab] fp32 logits is alive. `num_targets`, when the caller knows it on the host,
    spares the device sync of finding the targets. `statistics` also returns each target's log-probability,
    entropy and top-1 hit (`TokenLoss.log_probs` and after), from the same logits.
    """
    if hidden_states.shape[:2] != targets.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and targets {tuple(targets.shape)} do not align")
    positions = supervised_positions(targets, num_targets)
    hidden = hidden_states.flatten(0, 1).index_select(0, positions)
    flat_targets = targets.flatten().index_select(0, positions)
    terms = _token_terms if statistics else _token_nll
    if chunk_size and hidden.shape[0] > chunk_size:
        pieces = [
            checkpoint(terms, hidden[i : i + chunk_size], flat_targets[i : i + chunk_size], head, use_reentrant=False)
            for i in range(0, hidden.shape[0], chunk_size)
        ]
        out = tuple(map(torch.cat, zip(*pieces))) if statistics else torch.cat(pieces)
    else:
        out = terms(hidden, flat_targets, head)
    nll, entropy, top1 = out if statistics else (out, None, None)
    extras = {"log_probs": -nll, "entropy": entropy, "is_top1": top1} if statistics else {}
    count = nll.numel()
    if count == 0:
        # Keep the graph connected so every rank runs the same backward (ZeRO / DDP) with a zero loss.
        return TokenLoss(hidden_states.sum() * 0.0, nll.detach(), 0, positions, **extras)
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(nll.device)
    return TokenLoss(nll.sum() / denominator, nll.detach(), count, positions, **extras)
