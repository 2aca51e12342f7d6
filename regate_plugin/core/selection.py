"""Which elidable positions to keep: the fused score, the excess loss, and per-sample top-k (docs/METHOD.md)."""

from __future__ import annotations

import math

import torch


def fused_score(
    difficulty: torch.Tensor,
    reference: torch.Tensor,
    lam: float,
    zscore: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """d = (1 - lam) * m + lam * ref along the last dimension (one sample per row); a NaN signal is left out.

    Where the student difficulty m is unknown the score is ref alone; where ref is unknown (EMA-only fallback)
    it is m alone; where both are unknown it is 0. With `zscore`, each signal is standardised over the row's
    `mask` positions (its candidates; all when None) first so that neither dominates by scale.
    """
    if difficulty.shape != reference.shape:
        raise ValueError(f"difficulty {tuple(difficulty.shape)} and reference {tuple(reference.shape)} differ")
    m, ref = difficulty.float(), reference.float()
    if zscore:
        m, ref = _zscore(m, mask), _zscore(ref, mask)
    has_m, has_ref = ~torch.isnan(m), ~torch.isnan(ref)
    both = (1.0 - lam) * torch.nan_to_num(m) + lam * torch.nan_to_num(ref)
    return torch.where(has_m & has_ref, both, torch.where(has_m, m, torch.where(has_ref, ref, torch.zeros_like(m))))


def excess_loss(difficulty: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Rho-1's excess loss m - ref (the student's EMA loss over the reference's): high where the student still
    errs on what the reference finds learnable. NaN where either signal is unknown (it ranks after every known one)."""
    if difficulty.shape != reference.shape:
        raise ValueError(f"difficulty {tuple(difficulty.shape)} and reference {tuple(reference.shape)} differ")
    return difficulty.float() - reference.float()


def _zscore(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / std over each row's known masked values (unbiased std, at least 1e-6); x - mean below 2."""
    known = ~torch.isnan(values) if mask is None else mask & ~torch.isnan(values)
    n = known.sum(dim=-1, keepdim=True)
    zero = torch.zeros_like(values)
    mean = torch.where(known, values, zero).sum(dim=-1, keepdim=True) / n.clamp(min=1)
    variance = torch.where(known, (values - mean) ** 2, zero).sum(dim=-1, keepdim=True) / (n - 1).clamp(min=1)
    return torch.where(n >= 2, (values - mean) / variance.sqrt().clamp_min(1e-6), values - mean)


def keep_counts(n_candidates: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """k = ceil(keep_ratio * n) per sample, at least 1 where n > 0."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio!r} is outside the allowed range (0, 1]")
    # Subtract a hair before ceil so that e.g. 0.35 * 20 = 7.000000000000001 gives 7, not 8.
    k = torch.ceil(n_candidates.to(torch.float64) * keep_ratio - 1e-9).to(torch.int64)
    return torch.where(n_candidates > 0, k.clamp(min=1), torch.zeros_like(k)).clamp(max=n_candidates)


def select_kept_positions(scores: torch.Tensor, candidates: torch.Tensor, keep: float | torch.Tensor) -> torch.Tensor:
    """Per row, keep the top k candidates by score, ties to the earlier position.

    `keep` is either a keep ratio (k = ceil(keep * n_candidates), `keep_counts`) or the counts themselves, int64 [B]
    on the scores' device. `scores` is float [B, L] (values off the candidates are ignored), `candidates` bool
    [B, L]. Returns a bool [B, L] mask that is True on the kept candidates only; non-candidates are not this
    function's business.
    """
    if scores.shape != candidates.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and candidates {tuple(candidates.shape)} differ in shape")
    if scores.ndim != 2:
        raise ValueError(f"scores must be [batch, length], got {tuple(scores.shape)}")
    if isinstance(keep, torch.Tensor):
        k = keep
    elif keep >= 1.0:
        return candidates.clone()
    else:
        k = keep_counts(candidates.sum(dim=1), keep)
    values = scores.float()
    values = torch.where(torch.isnan(values), torch.full_like(values, -math.inf), values)
    # Stable sorts: by score (descending, equal scores stay in position order, so ties go to the earlier
    # position), then by candidacy, so every candidate ranks before every non-candidate whatever its score.
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~candidates).gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < k.unsqueeze(1))


def pair_scores(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Scores under the `pair` elision unit: each candidate p (input x_p, target x_{p+1}) scores the larger of its
    own score and that of candidate p - 1, whose target is x_p. A token with a high score is then kept as a target
    (at p - 1) and as an input (at p) alike; off the candidates the scores are unchanged."""
    previous = torch.full_like(scores, -math.inf)
    previous[:, 1:] = torch.where(candidates[:, :-1], scores[:, :-1], previous[:, 1:])
    return torch.where(candidates, torch.maximum(scores, previous), scores)


def random_scores(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform scores for the `random` baseline; with a seeded generator the choice is reproducible."""
    return torch.rand(shape, generator=generator)
