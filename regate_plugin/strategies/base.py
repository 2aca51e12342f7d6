"""`TokenElision`, the strategy base, and `Capabilities`, what a strategy declares to its callers.

A strategy turns a merged batch's labels into an `ElisionPlan` (which positions survive, where they land), and
turns the decoder's compact hidden states into the loss, feeding what it observed back into its own state. The base
runs the dual-cycle schedule and the plan; a strategy supplies `select` (which candidates a sparse step keeps) and,
where it has them, per-row data (`locate`), learning (`observe`, `sync`) and state. Adapters call `plan`,
`ElisionPlan.compact_*` and `loss`, and read `capabilities` for what else the strategy needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..core.compaction import (
    IGNORE_INDEX,
    PaddingSide,
    elidable_positions,
    plan_compaction,
    shift_targets,
    target_ordinals,
)
from ..core.config import ScheduleConfig
from ..core.keys import SampleKey
from ..core.loss import Head, TokenLoss, next_token_loss
from ..core.schedule import is_dense_step
from ..core.selection import keep_counts, pair_scores, select_kept_positions, select_with_inputs
from ..store import ReferenceStore
from .plan import BatchLayout, ElisionPlan

VisualRowCheck = Callable[[list[SampleKey] | None, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""`check(sample_keys, placeholders, rows, cut)`: refuse a merged batch whose visual rows per sample (`rows`, for
its `placeholders`; `cut`: the merge truncated that sample) differ from those the strategy's data assumes."""


@dataclass(frozen=True)
class Capabilities:
    """What a strategy needs from its callers and offers them. Adapters, the pre-flight check and the Trainer
    integration read these instead of probing the strategy's type."""

    sample_keys: bool = False
    """`plan` needs one `SampleKey` per batch row (the adapters key the batch from its pre-merge ids)."""
    visual_fingerprints: bool = False
    """`plan` uses the batch's visual fingerprints (the adapters hash each sample's pixels)."""
    reference: ReferenceStore | None = None
    """The reference store the strategy reads: checked against the run before step 0, shown in the summary."""
    scores_missing_samples: bool = False
    """Samples absent from `reference` are scored without it (counted), not refused (`missing_reference='ema'`)."""
    check_visual_rows: VisualRowCheck | None = None
    """Called by adapters that merge visual rows themselves, with each sample's merged row count."""
    learns: bool = False
    """The strategy holds state learnt from the student's losses: a resume without its saved state loses it."""
    always_dense: bool = False
    """Every step is dense: the strategy never elides."""


@dataclass
class ElisionStats:
    """Running totals since construction (saved with the state)."""

    batches: int = 0
    candidates: int = 0
    kept: int = 0
    targets: int = 0
    missing_reference: int = 0
    nonfinite: int = 0  # per-token losses that were NaN or inf (never folded into the EMA)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.candidates if self.candidates else 1.0


class TokenElision:
    """A strategy: the dual-cycle schedule decides dense steps; subclasses choose what sparse steps keep."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ScheduleConfig]] = ScheduleConfig
    """The settings the strategy reads; a config of another class is narrowed to it (`ScheduleConfig.of`)."""
    selects_exact_counts: ClassVar[bool] = False
    """True where `select` keeps exactly `keep` per row by construction; otherwise `plan` checks it (one sync)."""
    capabilities: Capabilities = Capabilities()

    def __init__(self, cfg: ScheduleConfig | None = None) -> None:
        self.cfg = self.config_class.of(cfg) if cfg is not None else self.config_class()
        self.step = 0
        self._stats = ElisionStats()
        self._nonfinite: torch.Tensor | None = None

    @property
    def stats(self) -> ElisionStats:
        """The running totals. The non-finite losses are counted on the device, step by step without a sync, and
        added here, when the totals are read (one sync at most)."""
        if self._nonfinite is not None:
            pending, self._nonfinite = self._nonfinite, None
            self._stats.nonfinite += int(pending)
        return self._stats

    @property
    def batches(self) -> int:
        """Batches whose loss this strategy computed (no sync)."""
        return self._stats.batches

    def count(self, **counts: int) -> None:
        """Add to the running totals (`ElisionStats` field names): how a strategy reports what it saw."""
        for field, value in counts.items():
            setattr(self._stats, field, getattr(self._stats, field) + int(value))

    def set_step(self, step: int) -> None:
        """Tell the strategy which optimizer step (0-based, after gradient accumulation) is being computed."""
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        self.step = int(step)

    def is_dense(self) -> bool:
        return self.capabilities.always_dense or is_dense_step(self.step, self.cfg)

    def sparse_keep_ratio(self) -> float:
        """The share of candidates a sparse step keeps now: `cfg.keep_ratio`, or where a strategy adapts it, its
        current value (a host number: it sizes the compact batch)."""
        return self.cfg.keep_ratio

    def keep_ratio(self) -> float:
        """The share of candidates the current step keeps: 1 on a dense step, else `sparse_keep_ratio`."""
        return 1.0 if self.is_dense() else self.sparse_keep_ratio()

    def describe(self) -> str:
        """How sparse steps choose, in a few words for the startup summary ('' where the keep ratio says it)."""
        return ""

    def describe_keep(self) -> str:
        """How many candidates sparse steps keep, in a few words for the startup summary."""
        return f"{self.cfg.keep_ratio} of the elidable answer tokens on sparse steps"

    def unit_scores(self, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The scores a built-in `select` ranks by, under `cfg.elision_unit` (`pair`: `selection.pair_scores`)."""
        return pair_scores(scores, candidates) if self.cfg.elision_unit == "pair" else scores

    def choose(
        self, scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The kept candidates under `cfg.elision_unit`: exactly `keep[b]` per row, ranked by `scores` (those in
        `last` after the others); `with_input` takes each kept target's input along (`selection.select_with_inputs`)."""
        if self.cfg.elision_unit == "with_input":
            return select_with_inputs(scores, candidates, keep, last)
        return select_kept_positions(self.unit_scores(scores, candidates), candidates, keep, last)

    def sparse_keep_counts(self, layout: BatchLayout, sample_keys: list[SampleKey] | None = None) -> np.ndarray:
        """Int64 [B]: how many of each row's candidates a sparse step keeps now, on the host: k = ceil(
        sparse_keep_ratio() * n). A strategy that keeps another number overrides this method (and only this one)."""
        return keep_counts(torch.from_numpy(layout.candidates), self.sparse_keep_ratio()).numpy()

    def keep_counts(self, layout: BatchLayout, sample_keys: list[SampleKey] | None = None) -> np.ndarray:
        """Int64 [B]: how many of each row's candidates the current step keeps, on the host: all on a dense step,
        else `sparse_keep_counts`.

        The one place that says it: `select` receives these counts and must keep exactly them, the compact batch is
        sized from them, and `kept_target_counts` (the Trainer's `num_items_in_batch`) derives from them.
        """
        return layout.candidates if self.is_dense() else self.sparse_keep_counts(layout, sample_keys)

    def kept_target_counts(self, layout: BatchLayout, sample_keys: list[SampleKey] | None = None) -> torch.Tensor:
        """Int64 [B]: how many loss terms `plan` keeps per row at the current step, from the batch layout and sample
        keys alone: every target that is not a candidate, plus `keep_counts` of the candidates. The Trainer
        integration uses it as `num_items_in_batch` under gradient accumulation."""
        return torch.from_numpy(layout.targets - layout.candidates + self.keep_counts(layout, sample_keys))

    def loss_denominators(self, layout: BatchLayout, sample_keys: list[SampleKey] | None = None) -> torch.Tensor:
        """Int64 [B]: what each row adds to the count the summed loss is divided by (`loss_normalization`): its kept
        loss terms (`kept_target_counts`) or all its targets. The Trainer integration sums it into
        `num_items_in_batch`; without one, `loss` divides by the batch's sum."""
        if self.cfg.loss_normalization == "all":
            return torch.from_numpy(layout.targets)
        return self.kept_target_counts(layout, sample_keys)

    def plan(
        self,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sample_keys: list[SampleKey] | None = None,
        padding_side: PaddingSide | None = None,
        layout: BatchLayout | None = None,
        visual_fingerprints: torch.Tensor | None = None,
    ) -> ElisionPlan:
        """Decide the kept positions of a merged [B, L] batch from its post-merge labels.

        Everything runs on the labels' device; the only host data are `layout` (computed here by one copy of the
        labels when not given) and the sample keys.
        """
        if labels.ndim != 2:
            raise ValueError(f"labels must be [batch, length], got {tuple(labels.shape)}")
        if attention_mask is not None and attention_mask.shape != labels.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match labels {tuple(labels.shape)}"
            )
        if self.capabilities.sample_keys and (sample_keys is None or len(sample_keys) != labels.shape[0]):
            raise ValueError(f"token elision '{self.name}' needs one sample key per row of the batch")
        layout = layout if layout is not None else BatchLayout.of(labels, attention_mask, padding_side)
        if layout.valid.shape[0] != labels.shape[0] or layout.length != labels.shape[1]:
            raise ValueError(
                f"batch layout is for {layout.valid.shape[0]} x {layout.length}, labels are {tuple(labels.shape)}"
            )
        targets = shift_targets(labels, attention_mask)
        candidates = elidable_positions(labels, targets, attention_mask)
        ordinals = target_ordinals(targets)
        dense = self.is_dense()
        rows = self.locate(sample_keys, layout, labels.device, visual_fingerprints)
        keep = self.keep_counts(layout, sample_keys)
        if dense:
            kept_candidates = candidates
        else:
            keep_on_device = torch.from_numpy(keep).to(labels.device, non_blocking=True)
            kept_candidates = self.select(targets, candidates, ordinals, rows, keep_on_device)
            if not self.selects_exact_counts:
                self._check_kept_counts(kept_candidates, keep_on_device)
        valid = torch.ones_like(candidates) if attention_mask is None else attention_mask.bool()
        if self.cfg.elision_unit == "loss_only":  # every token stays in the forward; elided ones only as context
            kept_mask, kept_per_row = valid, layout.valid
        else:
            kept_mask, kept_per_row = valid & (~candidates | kept_candidates), layout.valid - layout.candidates + keep
        if not dense:
            targets = targets.masked_fill(candidates & ~kept_candidates, IGNORE_INDEX)
        identity = bool((kept_per_row == layout.valid).all()) and layout.contiguous
        return ElisionPlan(
            compaction=plan_compaction(
                kept_mask,
                layout.padding_side,
                attention_mask,
                compact_length=int(kept_per_row.max()) if kept_per_row.size else 0,
                identity=identity and int(layout.valid.max(initial=0)) == layout.length,
            ),
            targets=targets,
            ordinals=ordinals,
            candidates=candidates,
            kept_candidates=kept_candidates,
            sample_keys=sample_keys,
            dense=dense,
            keep_ratio=self.keep_ratio(),
            layout=layout,
            keep_counts=keep,
            decoder_tokens=kept_per_row,
            rows=rows,
        )

    def _check_kept_counts(self, kept_candidates: torch.Tensor, keep: torch.Tensor) -> None:
        miscounted = int((kept_candidates.sum(dim=1) != keep).sum())
        if miscounted:
            raise RuntimeError(
                f"token elision '{self.name}': select() kept another number of candidates than keep_counts() says "
                f"in {miscounted} row(s) of this batch; make {type(self).__name__}.sparse_keep_counts return what "
                "select keeps (the compact batch and the loss normalisation under gradient accumulation are sized by "
                "it)"
            )

    def locate(
        self,
        sample_keys: list[SampleKey] | None,
        layout: BatchLayout,
        device: torch.device,
        visual_fingerprints: torch.Tensor | None = None,
    ) -> Any:
        """Per-row data the strategy looks up by sample key (and `keys.visual_fingerprints`, int64 [B] on `device`,
        where it declares `capabilities.visual_fingerprints`) before selecting; `select` receives it as `rows`.
        None here: a strategy without per-sample data."""
        return None

    def select(
        self,
        targets: torch.Tensor,
        candidates: torch.Tensor,
        ordinals: torch.Tensor,
        rows: Any,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Bool [B, L]: the candidates kept on a sparse step, exactly `keep[b]` (int64 [B], from `keep_counts`) of
        them in row b; on the labels' device, without a host sync."""
        raise NotImplementedError(f"token elision '{self.name}' does not say what a sparse step keeps (select)")

    def loss(
        self,
        plan: ElisionPlan,
        hidden_states: torch.Tensor,
        head: Head,
        num_items_in_batch: int | torch.Tensor | None = None,
        statistics: bool = False,
    ) -> TokenLoss:
        """Loss over the kept targets of a compact batch (with `statistics`, also their log-probabilities, entropy
        and top-1 hits); observed per-token losses update the strategy."""
        compact_targets = plan.compact_targets()
        if num_items_in_batch is None and self.cfg.loss_normalization == "all":
            num_items_in_batch = int(plan.layout.targets.sum())
        result = next_token_loss(
            hidden_states,
            compact_targets,
            head,
            num_items_in_batch,
            self.cfg.loss_chunk_size,
            num_targets=plan.counts["targets"],
            statistics=statistics,
        )
        self.observe(plan, compact_targets, result)
        nonfinite = (~torch.isfinite(result.per_token)).sum()
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite + nonfinite
        counts = plan.counts
        self.count(batches=1, candidates=counts["candidates"], kept=counts["kept"], targets=result.num_targets)
        return result

    def observe(self, plan: ElisionPlan, compact_targets: torch.Tensor, result: TokenLoss) -> None:
        """Hook for strategies that learn from the student's losses (runs before backward: keep it sync-free)."""

    def sync(self) -> None:
        """Bring state that depends on other ranks' batches up to date (collective; no-op for stateless ones)."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "stats": vars(self.stats).copy(), "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state was saved by token elision '{state.get('name')}', this is '{self.name}'")
        self.step = int(state["step"])
        self._stats, self._nonfinite = ElisionStats(**state["stats"]), None
