"""Which elidable positions to keep: the fused score, the excess loss, and per-sample top-k (docs/METHOD.md)."""

from __future__ import annotations

import math

import numpy as np
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


def reference_budget(reference: np.ndarray, targets: np.ndarray, threshold: float, with_inputs: bool) -> np.ndarray:
    """Int64 [B]: per row, the candidates a reference asks for: answer ordinals 1 to `targets[b]` - 1 (ordinal 0 is
    predicted from the prompt, never elided) whose reference loss is above `threshold` (the text alone cannot predict
    them), with `with_inputs` also the ordinal after each (whose input token is the high-reference one). `reference`
    float [B, W] by answer ordinal, NaN where unknown (never above). Host arrays: it sizes the compact batch. A
    multi-turn row's later turns start with a token the prompt predicts, counted here like a candidate."""
    ordinal = np.arange(reference.shape[1])
    candidate = (ordinal >= 1) & (ordinal < targets[:, None])
    high = candidate & (np.nan_to_num(reference, nan=-math.inf) > threshold)
    if with_inputs:
        high[:, 1:] |= high[:, :-1] & candidate[:, 1:]
    return high.sum(axis=1).astype(np.int64)


def candidate_ranks(scores: torch.Tensor, candidates: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """Int64 [B, L]: each position's rank in its row (0 = kept first): candidates by score, descending, ties to the
    earlier position; the candidates in `last` (bool [B, L]) after every other candidate; every non-candidate after
    every candidate."""
    values = scores.float()
    values = torch.where(torch.isnan(values), torch.full_like(values, -math.inf), values)
    # Stable sorts: by score (descending, equal scores stay in position order, so ties go to the earlier
    # position), then by tier (candidates, then `last` candidates, then non-candidates), whatever the score.
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    tier = 2 * (~candidates).to(torch.int8)
    if last is not None:
        tier = tier + (last & candidates).to(torch.int8)
    order = order.gather(1, torch.sort(tier.gather(1, order), dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank


def select_kept_positions(
    scores: torch.Tensor, candidates: torch.Tensor, keep: float | torch.Tensor, last: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row, keep the top k candidates by score, ties to the earlier position (those in `last` after the others,
    `candidate_ranks`).

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
    return candidates & (candidate_ranks(scores, candidates, last) < k.unsqueeze(1))


def select_with_inputs(
    scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor, last: torch.Tensor | None = None
) -> torch.Tensor:
    """The `with_input` unit: per row exactly `keep[b]` candidates (int64 [B]), the best-ranked ones each with the
    candidate after it (whose input token is the kept target), as many as fit, then the best remaining candidate
    where one slot is left. Vectorised, without a host sync.

    With m best-ranked candidates taken, the kept set is those m plus their successors that are candidates and not
    among them: count(m) = m + #{p: rank p < m <= rank p+1}, which never falls as m grows and rises by at most 2 a
    candidate; the largest m with count(m) <= k leaves at most one slot, filled by the next-ranked candidate.
    """
    rank = candidate_ranks(scores, candidates, last)
    batch, length = candidates.shape
    has_next = torch.zeros_like(candidates)
    has_next[:, :-1] = candidates[:, :-1] & candidates[:, 1:]
    next_rank = torch.zeros_like(rank)
    next_rank[:, :-1] = rank[:, 1:]
    adds = has_next & (rank < next_rank)  # p's successor is new to the kept set for rank p < m <= rank p+1
    steps = torch.zeros((batch, length + 2), dtype=torch.int64, device=rank.device)
    steps.scatter_add_(1, torch.where(adds, rank + 1, length + 1), adds.long())
    steps.scatter_add_(1, torch.where(adds, next_rank + 1, length + 1), -adds.long())
    m = torch.arange(length + 1, device=rank.device)
    count = m + steps[:, : length + 1].cumsum(dim=1)  # [B, L + 1]: kept set size with the m best-ranked taken
    fits = (count <= keep.unsqueeze(1)) & (m <= candidates.sum(dim=1, keepdim=True))
    best = fits.long().sum(dim=1, keepdim=True) - 1  # count is non-decreasing, so the fitting m are 0..best
    taken = candidates & (rank < best)
    kept = taken.clone()
    kept[:, 1:] |= taken[:, :-1] & candidates[:, 1:]
    left = keep - kept.sum(dim=1)
    rest = candidates & ~kept
    return kept | (rest & (candidate_ranks(torch.where(rest, rank, length).neg().float(), rest) < left.unsqueeze(1)))


def repeated_targets(targets: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: the supervised positions whose target token is the target of an earlier supervised position of
    the same row (a fact the answer already stated). Sorts, no host sync."""
    batch, length = targets.shape
    positions = torch.arange(length, device=targets.device).expand(batch, length)
    # unsupervised positions get keys no token id has (negative, unique), so they never match
    keys = torch.where(supervised, targets, -1 - positions)
    order = torch.sort(keys, dim=1, stable=True).indices  # equal tokens stay in position order
    sorted_keys = keys.gather(1, order)
    repeat = torch.zeros_like(supervised)
    repeat[:, 1:] = sorted_keys[:, 1:] == sorted_keys[:, :-1]
    out = torch.zeros_like(supervised)
    out.scatter_(1, order, repeat)
    return out & supervised


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
