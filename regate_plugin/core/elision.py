"""Token-elision strategies (`none`, `random`, `regate`) and the registry that builds them by name.

A strategy turns a merged batch's labels into an `ElisionPlan` (which positions survive, where they land), and
turns the decoder's compact hidden states into the loss, feeding what it observed back into its own state.
Adapters call exactly three things: `plan`, `ElisionPlan.compact_*`, and `loss`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .cache import CacheError, ReferenceLossCache
from .compaction import (
    IGNORE_INDEX,
    CompactionPlan,
    PaddingSide,
    elidable_positions,
    infer_padding_side,
    plan_compaction,
    shift_targets,
    target_ordinals,
)
from .config import ReGATEConfig
from .ema import DifficultyEMA
from .keys import SampleKey, format_key, tokenizer_fingerprint
from .loss import Head, TokenLoss, next_token_loss
from .schedule import is_dense_step
from .selection import fused_score, keep_counts, random_scores, select_kept_positions


@dataclass
class ElisionPlan:
    """One batch's elision decision and the gather that executes it."""

    compaction: CompactionPlan
    targets: torch.Tensor  # int64 [B, L] pre-shifted
    ordinals: torch.Tensor  # int64 [B, L] answer ordinal of each target, -1 where none
    candidates: torch.Tensor  # bool [B, L]
    keep_counts: torch.Tensor  # int64 [B]: candidates the strategy says each row keeps (`TokenElision.keep_counts`)
    sample_keys: list[SampleKey] | None
    dense: bool
    keep_ratio: float

    @property
    def kept_mask(self) -> torch.Tensor:
        return self.compaction.kept_mask

    def compact_embeddings(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.compaction.gather(inputs_embeds)

    def compact_attention_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return self.compaction.gather_attention_mask(attention_mask)

    def compact_position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        return self.compaction.gather_position_ids(position_ids)

    def compact_targets(self) -> torch.Tensor:
        return self.compaction.gather(self.targets, fill=IGNORE_INDEX)

    @functools.cached_property
    def counts(self) -> dict[str, int]:
        """Candidates, kept candidates, kept targets, decoder tokens, and rows whose kept candidates differ from
        `keep_counts` (one host sync, computed once)."""
        kept_candidates = self.candidates & self.kept_mask
        values = torch.stack(
            [
                self.candidates.sum(),
                kept_candidates.sum(),
                ((self.targets != IGNORE_INDEX) & self.kept_mask).sum(),
                self.compaction.slot_valid.sum(),
                (kept_candidates.sum(dim=1) != self.keep_counts.to(kept_candidates.device)).sum(),
            ]
        ).tolist()
        return dict(zip(("candidates", "kept", "targets", "tokens", "miscounted_rows"), values))

    def report(self) -> dict[str, Any]:
        """What `out.token_elision` carries (docs/ARCHITECTURE.md, "One training step")."""
        return {"kept_mask": self.kept_mask, "dense": self.dense, "keep_ratio": self.keep_ratio, **self.counts}


@dataclass
class ElisionStats:
    """Running totals since construction (saved with the state)."""

    batches: int = 0
    candidates: int = 0
    kept: int = 0
    targets: int = 0
    missing_reference: int = 0

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.candidates if self.candidates else 1.0


class TokenElision:
    """A strategy: the dual-cycle schedule decides dense steps; subclasses choose what sparse steps keep."""

    name = ""
    needs_sample_keys = False

    def __init__(self, cfg: ReGATEConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else ReGATEConfig()
        self.step = 0
        self.stats = ElisionStats()

    def set_step(self, step: int) -> None:
        """Tell the strategy which optimizer step (0-based, after gradient accumulation) is being computed."""
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        self.step = int(step)

    def is_dense(self) -> bool:
        return is_dense_step(self.step, self.cfg)

    def keep_ratio(self) -> float:
        return 1.0 if self.is_dense() else self.cfg.keep_ratio

    def keep_counts(self, candidates: torch.Tensor) -> torch.Tensor:
        """Int64 [B]: how many of each row's candidates (bool [B, L]) the current step keeps; `select` must keep
        exactly these (checked on every batch), which is what lets `kept_target_counts` know the loss terms before
        the forward. All on a dense step, else k = ceil(keep_ratio * n); a strategy that keeps another number
        overrides this method."""
        n_candidates = candidates.sum(dim=1)
        return n_candidates if self.is_dense() else keep_counts(n_candidates, self.keep_ratio())

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a student tokenizer the strategy's reference data was not built with (no-op without one)."""

    def check_visual_rows(
        self, sample_keys: list[SampleKey] | None, placeholders: torch.Tensor, rows: torch.Tensor, cut: torch.Tensor
    ) -> None:
        """Refuse a merged batch whose visual rows per sample differ from those its reference losses were scored
        with (`placeholders`, `rows`: per sample; `cut`: the merge truncated that sample). No-op without a reference."""

    def plan(
        self,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sample_keys: list[SampleKey] | None = None,
        padding_side: PaddingSide | None = None,
    ) -> ElisionPlan:
        """Decide the kept positions of a merged [B, L] batch from its post-merge labels."""
        if labels.ndim != 2:
            raise ValueError(f"labels must be [batch, length], got {tuple(labels.shape)}")
        if attention_mask is not None and attention_mask.shape != labels.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match labels {tuple(labels.shape)}"
            )
        if self.needs_sample_keys and (sample_keys is None or len(sample_keys) != labels.shape[0]):
            raise ValueError(f"token elision '{self.name}' needs one sample key per row of the batch")
        targets = shift_targets(labels, attention_mask)
        candidates = elidable_positions(labels, targets, attention_mask)
        ordinals = target_ordinals(targets)
        dense = self.is_dense()
        keep_ratio = self.keep_ratio()
        kept_candidates = candidates if dense else self.select(targets, candidates, ordinals, sample_keys, keep_ratio)
        valid = torch.ones_like(candidates) if attention_mask is None else attention_mask.bool()
        kept_mask = valid & (~candidates | kept_candidates)
        side = padding_side or infer_padding_side(attention_mask)
        return ElisionPlan(
            compaction=plan_compaction(kept_mask, side, attention_mask),
            targets=targets,
            ordinals=ordinals,
            candidates=candidates,
            keep_counts=self.keep_counts(candidates),
            sample_keys=sample_keys,
            dense=dense,
            keep_ratio=keep_ratio,
        )

    def kept_target_counts(self, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Int64 [B]: how many loss terms `plan` keeps per row at the current step, from the labels alone: every
        target that is not a candidate, plus `keep_counts` of the candidates. The Trainer integration uses it as
        `num_items_in_batch` under gradient accumulation."""
        targets = shift_targets(labels, attention_mask)
        candidates = elidable_positions(labels, targets, attention_mask)
        return (targets != IGNORE_INDEX).sum(dim=1) - candidates.sum(dim=1) + self.keep_counts(candidates)

    def select(
        self,
        targets: torch.Tensor,
        candidates: torch.Tensor,
        ordinals: torch.Tensor,
        sample_keys: list[SampleKey] | None,
        keep_ratio: float,
    ) -> torch.Tensor:
        """Bool [B, L]: the candidates kept on a sparse step."""
        raise NotImplementedError

    def loss(
        self,
        plan: ElisionPlan,
        hidden_states: torch.Tensor,
        head: Head,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> TokenLoss:
        """Loss over the kept targets of a compact batch; observed per-token losses update the strategy."""
        compact_targets = plan.compact_targets()
        result = next_token_loss(hidden_states, compact_targets, head, num_items_in_batch, self.cfg.loss_chunk_size)
        if plan.counts["miscounted_rows"]:
            raise RuntimeError(
                f"token elision '{self.name}': select() kept another number of candidates than keep_counts() says "
                f"in {plan.counts['miscounted_rows']} row(s) of this batch; make {type(self).__name__}.keep_counts "
                "return what select keeps (the loss normalisation under gradient accumulation is computed from it)"
            )
        self.observe(plan, compact_targets, result.per_token)
        self.stats.batches += 1
        self.stats.candidates += plan.counts["candidates"]
        self.stats.kept += plan.counts["kept"]
        self.stats.targets += result.num_targets
        return result

    def observe(self, plan: ElisionPlan, compact_targets: torch.Tensor, per_token: torch.Tensor) -> None:
        """Hook for strategies that learn from the student's losses."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "stats": vars(self.stats).copy(), "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state was saved by token elision '{state.get('name')}', this is '{self.name}'")
        self.step = int(state["step"])
        self.stats = ElisionStats(**state["stats"])


class NoElision(TokenElision):
    """`none`: every step dense, still with logits only where a target exists."""

    name = "none"

    def is_dense(self) -> bool:
        return True


class RandomElision(TokenElision):
    """The baseline: a uniformly random k of the candidates, from a generator seeded by (seed, step, batch)."""

    name = "random"

    def select(self, targets, candidates, ordinals, sample_keys, keep_ratio):  # type: ignore[override]
        stream = f"{self.cfg.seed}:{self.step}:{self.stats.batches}".encode()
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.blake2b(stream, digest_size=8).digest(), "little") >> 1
        )
        scores = random_scores(tuple(candidates.shape), generator).to(candidates.device)
        return select_kept_positions(scores, candidates, keep_ratio)


class ReGATEElision(TokenElision):
    """Reference-guided elision: keep the candidates with the highest fused score of student EMA and reference loss."""

    name = "regate"
    needs_sample_keys = True

    def __init__(
        self,
        cfg: ReGATEConfig | None = None,
        reference: ReferenceLossCache | str | os.PathLike[str] | None = None,
        vocab_size: int = 0,
    ) -> None:
        super().__init__(cfg)
        if reference is None:
            raise ValueError(
                "token elision 'regate' needs reference losses: pass reference=<cache directory> "
                "(--regate_ref_cache), made by `regate precompute`"
            )
        self.reference = reference if isinstance(reference, ReferenceLossCache) else ReferenceLossCache(reference)
        self.ema = DifficultyEMA(self.cfg.ema_beta, vocab_size)

    def check_tokenizer(self, tokenizer: Any) -> None:
        self.reference.check_tokenizer(tokenizer_fingerprint(tokenizer))

    def check_visual_rows(
        self, sample_keys: list[SampleKey] | None, placeholders: torch.Tensor, rows: torch.Tensor, cut: torch.Tensor
    ) -> None:
        per_placeholder = self.reference.manifest.visual_tokens
        if per_placeholder is None or sample_keys is None:
            return
        expected = placeholders * per_placeholder
        wrong = ((rows != expected) & ~(cut & (rows < expected))).cpu()
        if not bool(wrong.any()):
            return
        row = int(wrong.nonzero()[0])
        raise CacheError(
            f"sample {format_key(sample_keys[row])} (batch row {row}): the model merged {int(rows[row])} visual rows "
            f"for its {int(placeholders[row])} placeholder(s), but its reference losses in {self.reference.directory} "
            f"were scored with {per_placeholder} rows per placeholder (--visual-tokens): the positions of its answer "
            "tokens differ, so re-run `regate precompute` with this model's visual row count"
        )

    def reference_losses(self, key: SampleKey, n_targets: int) -> torch.Tensor:
        """The cached losses of one sample's first `n_targets` targets; NaN under the EMA-only fallback."""
        losses = self.reference.get(key)
        if losses is None:
            if self.cfg.missing_reference == "error":
                return self.reference[key]  # raises MissingReferenceError with the full message
            self.stats.missing_reference += 1
            if self.stats.missing_reference == 1:
                warnings.warn(
                    f"sample {format_key(key)} is not in reference cache {self.reference.directory}; scoring it by the "
                    "student EMA alone (missing_reference='ema'); later misses are counted in stats.missing_reference",
                    stacklevel=3,
                )
            return torch.full((n_targets,), float("nan"))
        if losses.numel() < n_targets:
            raise CacheError(
                f"sample {format_key(key)} has {n_targets} answer targets in the batch but {losses.numel()} reference "
                f"losses in {self.reference.directory}: the cache was built with another template or max length"
            )
        return losses[:n_targets]

    def select(self, targets, candidates, ordinals, sample_keys, keep_ratio):  # type: ignore[override]
        assert sample_keys is not None
        scores = torch.zeros(candidates.shape, dtype=torch.float32)
        candidates_cpu, ordinals_cpu, targets_cpu = candidates.cpu(), ordinals.cpu(), targets.cpu()
        for row, key in enumerate(sample_keys):
            positions = candidates_cpu[row].nonzero().squeeze(1)
            if positions.numel() == 0:
                continue
            n_targets = int((targets_cpu[row] != IGNORE_INDEX).sum())
            reference = self.reference_losses(key, n_targets)
            row_ordinals = ordinals_cpu[row, positions]
            difficulty = self.ema.lookup(key, row_ordinals, targets_cpu[row, positions])
            scores[row, positions] = fused_score(
                difficulty, reference[row_ordinals], self.cfg.lam, zscore=self.cfg.score_norm == "zscore"
            )
        return select_kept_positions(scores, candidates_cpu, keep_ratio).to(candidates.device)

    def observe(self, plan: ElisionPlan, compact_targets: torch.Tensor, per_token: torch.Tensor) -> None:
        assert plan.sample_keys is not None
        supervised = compact_targets != IGNORE_INDEX
        rows = supervised.nonzero()[:, 0].cpu()
        is_candidate = plan.compaction.gather(plan.candidates, fill=False)[supervised].cpu()
        ordinals = plan.compaction.gather(plan.ordinals, fill=-1)[supervised].cpu()
        token_ids = compact_targets[supervised].cpu()
        losses = per_token.cpu()
        for row, key in enumerate(plan.sample_keys):
            take = (rows == row) & is_candidate
            if take.any():
                self.ema.update(key, ordinals[take], token_ids[take], losses[take])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ema.load_state_dict(state["ema"])


ElisionFactory = Callable[..., TokenElision]
_REGISTRY: dict[str, ElisionFactory] = {}


def register_token_elision(name: str, factory: ElisionFactory, *, overwrite: bool = False) -> None:
    """Make `build_token_elision(name, cfg, **kwargs)` call `factory(cfg, **kwargs)`."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"token elision names are letters, digits, '-' and '_', got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"token elision '{name}' is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_token_elisions() -> list[str]:
    return sorted(_REGISTRY)


def build_token_elision(name: str, cfg: ReGATEConfig | None = None, **kwargs: Any) -> TokenElision:
    """Build the strategy registered as `name` ('none', 'regate', 'random', or a third-party one)."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown token elision {name!r}; known: {', '.join(available_token_elisions())}")
    tokenizer = kwargs.pop("tokenizer", None)
    elision = factory(cfg if cfg is not None else ReGATEConfig(), **kwargs)
    if tokenizer is not None:
        elision.check_tokenizer(tokenizer)
    return elision


def _plain(cls: type[TokenElision]) -> ElisionFactory:
    def factory(cfg: ReGATEConfig, **kwargs: Any) -> TokenElision:
        kwargs.pop("reference", None)
        kwargs.pop("vocab_size", None)
        if kwargs:
            raise TypeError(f"token elision '{cls.name}' takes no options {sorted(kwargs)}")
        return cls(cfg)

    return factory


register_token_elision("none", _plain(NoElision))
register_token_elision("random", _plain(RandomElision))
register_token_elision("regate", ReGATEElision)
