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

import numpy as np
import torch

from ..store.errors import CacheError
from ..store.index import ReferenceLossCache
from . import distributed
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
from .ema import DifficultyEMA, all_gather_observations
from .keys import SampleKey, format_key, tokenizer_fingerprint
from .loss import Head, TokenLoss, next_token_loss
from .schedule import is_dense_step
from .selection import fused_score, keep_counts, pair_scores, random_scores, select_kept_positions


@dataclass(frozen=True)
class BatchLayout:
    """Host-side counts of a merged batch, from its labels and mask alone (one device-to-host copy, or none when
    the Trainer integration derives them before the forward): they size the compact batch without a device sync."""

    valid: np.ndarray  # int64 [B] unpadded length of each row
    targets: np.ndarray  # int64 [B] supervised next-token targets per row
    candidates: np.ndarray  # int64 [B] elidable positions per row
    length: int  # L
    padding_side: PaddingSide
    contiguous: bool  # every row's valid positions form one block on `padding_side`
    max_target_id: int  # -1 when the batch has no target

    @classmethod
    def of(
        cls, labels: torch.Tensor, attention_mask: torch.Tensor | None = None, padding_side: PaddingSide | None = None
    ) -> BatchLayout:
        labels = labels.detach().cpu()
        mask = attention_mask.detach().cpu() if attention_mask is not None else None
        targets = shift_targets(labels, mask)
        supervised = targets != IGNORE_INDEX
        valid = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
        side = padding_side or infer_padding_side(mask)
        counts = valid.sum(dim=1)
        columns = torch.arange(labels.shape[1])
        block = columns < counts[:, None] if side == "right" else columns >= labels.shape[1] - counts[:, None]
        return cls(
            valid=counts.numpy(),
            targets=supervised.sum(dim=1).numpy(),
            candidates=elidable_positions(labels, targets, mask).sum(dim=1).numpy(),
            length=labels.shape[1],
            padding_side=side,
            contiguous=bool(torch.equal(block, valid)),
            max_target_id=int(targets[supervised].max()) if bool(supervised.any()) else -1,
        )


@dataclass(frozen=True)
class SampleRows:
    """What a batch's sample keys located in the reference cache, on the model's device."""

    starts: torch.Tensor  # int64 [B]: each row's first EMA slot (its start in the cache's token space, plus its visual
    # slot group x the cache's tokens), -1 if absent
    reference: torch.Tensor  # float32 [B, W]: each row's reference losses by answer ordinal, NaN past its end


@dataclass
class ElisionPlan:
    """One batch's elision decision and the gather that executes it."""

    compaction: CompactionPlan
    targets: torch.Tensor  # int64 [B, L] pre-shifted, IGNORE_INDEX at elided candidates: the loss terms
    ordinals: torch.Tensor  # int64 [B, L] answer ordinal of each target, -1 where none
    candidates: torch.Tensor  # bool [B, L]
    kept_candidates: torch.Tensor  # bool [B, L]: the candidates whose loss term is kept
    sample_keys: list[SampleKey] | None
    dense: bool
    keep_ratio: float
    layout: BatchLayout
    keep_counts: np.ndarray  # int64 [B]: candidates each row keeps (`TokenElision.keep_counts`)
    decoder_tokens: np.ndarray  # int64 [B]: positions each row runs through the decoder
    rows: SampleRows | None = None

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
        """Candidates, kept candidates, kept targets and decoder tokens, from the host layout (no device sync)."""
        kept = self.keep_counts
        candidates = self.layout.candidates
        return {
            "candidates": int(candidates.sum()),
            "kept": int(kept.sum()),
            "targets": int((self.layout.targets - candidates + kept).sum()),
            "tokens": int(self.decoder_tokens.sum()),
        }

    def report(self) -> dict[str, Any]:
        """What `out.token_elision` carries (docs/ARCHITECTURE.md, "One training step")."""
        return {
            "kept_mask": self.kept_mask,
            "kept_candidates": self.kept_candidates,
            "dense": self.dense,
            "keep_ratio": self.keep_ratio,
            **self.counts,
        }


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

    name = ""
    needs_sample_keys = False
    selects_exact_counts = False
    """True where `select` keeps exactly `keep` per row by construction; otherwise `plan` checks it (one sync)."""

    def __init__(self, cfg: ReGATEConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else ReGATEConfig()
        self.step = 0
        self.stats = ElisionStats()

    @property
    def stats(self) -> ElisionStats:
        """The running totals. The non-finite losses are counted on the device, step by step without a sync, and
        added here, when the totals are read (one sync at most)."""
        if self._nonfinite is not None:
            pending, self._nonfinite = self._nonfinite, None
            self._stats.nonfinite += int(pending)
        return self._stats

    @stats.setter
    def stats(self, value: ElisionStats) -> None:
        self._stats, self._nonfinite = value, None

    def set_step(self, step: int) -> None:
        """Tell the strategy which optimizer step (0-based, after gradient accumulation) is being computed."""
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        self.step = int(step)

    def is_dense(self) -> bool:
        return is_dense_step(self.step, self.cfg)

    def keep_ratio(self) -> float:
        return 1.0 if self.is_dense() else self.cfg.keep_ratio

    def unit_scores(self, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The scores a built-in `select` ranks by, under `cfg.elision_unit` (`pair`: `selection.pair_scores`)."""
        return pair_scores(scores, candidates) if self.cfg.elision_unit == "pair" else scores

    def keep_counts(self, n_candidates: np.ndarray) -> np.ndarray:
        """Int64 [B]: how many of each row's `n_candidates` the current step keeps, on the host.

        The one place that says it: `select` receives these counts and must keep exactly them, the compact batch is
        sized from them, and `kept_target_counts` (the Trainer's `num_items_in_batch`) derives from them. All on a
        dense step, else k = ceil(keep_ratio * n); a strategy that keeps another number overrides this method.
        """
        if self.is_dense():
            return n_candidates
        return keep_counts(torch.from_numpy(n_candidates), self.cfg.keep_ratio).numpy()

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
        if self.needs_sample_keys and (sample_keys is None or len(sample_keys) != labels.shape[0]):
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
        keep_ratio = self.keep_ratio()
        rows = self.locate_samples(sample_keys, layout, labels.device, visual_fingerprints)
        keep = self.keep_counts(layout.candidates)
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
            keep_ratio=keep_ratio,
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
                f"in {miscounted} row(s) of this batch; make {type(self).__name__}.keep_counts return what select "
                "keeps (the compact batch and the loss normalisation under gradient accumulation are sized by it)"
            )

    def locate_samples(
        self,
        sample_keys: list[SampleKey] | None,
        layout: BatchLayout,
        device: torch.device,
        visual_fingerprints: torch.Tensor | None = None,
    ) -> SampleRows | None:
        """Per-row data a strategy looks up by sample key (and `keys.visual_fingerprints`, int64 [B] on `device`,
        when the batch has them) before selecting; none for the plain strategies."""
        return None

    def kept_target_counts(self, layout: BatchLayout) -> torch.Tensor:
        """Int64 [B]: how many loss terms `plan` keeps per row at the current step, from the batch layout alone:
        every target that is not a candidate, plus `keep_counts` of the candidates. The Trainer integration uses
        it as `num_items_in_batch` under gradient accumulation."""
        return torch.from_numpy(layout.targets - layout.candidates + self.keep_counts(layout.candidates))

    def select(
        self,
        targets: torch.Tensor,
        candidates: torch.Tensor,
        ordinals: torch.Tensor,
        rows: SampleRows | None,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Bool [B, L]: the candidates kept on a sparse step, exactly `keep[b]` (int64 [B], from `keep_counts`) of
        them in row b; on the labels' device, without a host sync."""
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
        result = next_token_loss(
            hidden_states,
            compact_targets,
            head,
            num_items_in_batch,
            self.cfg.loss_chunk_size,
            num_targets=plan.counts["targets"],
        )
        self.observe(plan, compact_targets, result)
        nonfinite = (~torch.isfinite(result.per_token)).sum()
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite + nonfinite
        self._stats.batches += 1
        self._stats.candidates += plan.counts["candidates"]
        self._stats.kept += plan.counts["kept"]
        self._stats.targets += result.num_targets
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
        self.stats = ElisionStats(**state["stats"])


class NoElision(TokenElision):
    """`none`: every step dense, still with logits only where a target exists."""

    name = "none"

    def is_dense(self) -> bool:
        return True


class RandomElision(TokenElision):
    """The baseline: a uniformly random k of the candidates, from a generator seeded by (seed, step, batch)."""

    name = "random"
    selects_exact_counts = True

    def select(self, targets, candidates, ordinals, rows, keep):  # type: ignore[override]
        stream = f"{self.cfg.seed}:{self.step}:{self._stats.batches}".encode()
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.blake2b(stream, digest_size=8).digest(), "little") >> 1
        )
        scores = random_scores(tuple(candidates.shape), generator).to(candidates.device)
        return select_kept_positions(self.unit_scores(scores, candidates), candidates, keep)


class ReGATEElision(TokenElision):
    """Reference-guided elision: keep the candidates with the highest fused score of student EMA and reference loss."""

    name = "regate"
    needs_sample_keys = True
    selects_exact_counts = True

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
        slots = self.reference.tokens * self.cfg.ema_visual_slots  # the text's span once per visual slot group
        self.ema = DifficultyEMA(self.cfg.ema_beta, slots, vocab_size, self.cfg.ema_dtype)
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._located: tuple[list[SampleKey], np.ndarray] | None = None  # the last batch's keys and cache rows

    def check_tokenizer(self, tokenizer: Any) -> None:
        self.reference.check_tokenizer(tokenizer_fingerprint(tokenizer))

    def check_visual_rows(
        self, sample_keys: list[SampleKey] | None, placeholders: torch.Tensor, rows: torch.Tensor, cut: torch.Tensor
    ) -> None:
        if sample_keys is None:
            return
        placeholders, rows, cut = torch.stack([placeholders, rows, cut.long()]).cpu().numpy()  # one copy to the host
        cut = cut.astype(bool)
        expected = self.reference.expected_visual_rows(self._locate(sample_keys), placeholders)
        wrong = np.flatnonzero((expected >= 0) & (rows != expected) & ~(cut & (rows < expected)))
        if not wrong.size:
            return
        row = int(wrong[0])
        manifest = self.reference.manifest
        how = (
            "its own count, from its image sizes"
            if manifest.visual_layout is not None
            else f"{manifest.visual_tokens} per placeholder, --visual-tokens"
        )
        raise CacheError(
            f"sample {format_key(sample_keys[row])} (batch row {row}): the model merged {int(rows[row])} visual rows "
            f"for its {int(placeholders[row])} placeholder(s), but its reference losses in {self.reference.directory} "
            f"were scored with {int(expected[row])} ({how}): the positions of its answer tokens differ, so re-run "
            "`regate precompute` with this model's visual rows"
        )

    def _locate(self, sample_keys: list[SampleKey]) -> np.ndarray:
        """The batch's cache rows (`ReferenceLossCache.locate`), looked up once for the adapter's visual-row check
        and the plan of the same batch (the same key list)."""
        if self._located is None or self._located[0] is not sample_keys:
            self._located = (sample_keys, self.reference.locate(sample_keys))
        return self._located[1]

    def locate_samples(
        self,
        sample_keys: list[SampleKey] | None,
        layout: BatchLayout,
        device: torch.device,
        visual_fingerprints: torch.Tensor | None = None,
    ) -> SampleRows:
        """Locate the batch in the cache (host, vectorised), check it, and stage its reference losses on `device`.
        With `ema_visual_slots` V > 1, a row's EMA slots are those of its text in group fingerprint mod V (group 0
        without a fingerprint); the reference losses are the text's."""
        assert sample_keys is not None
        self.sync()  # the previous micro-batch's observations from every rank, before this selection
        if self.ema.device != device:
            self.ema.to(device)
        rows = self._locate(sample_keys)
        missing = np.flatnonzero((rows < 0) & (layout.candidates > 0))
        if missing.size:
            if self.cfg.missing_reference == "error":
                self.reference[sample_keys[missing[0]]]  # raises MissingReferenceError with the full message
            self._stats.missing_reference += int(missing.size)
            if self._stats.missing_reference == missing.size:
                warnings.warn(
                    f"sample {format_key(sample_keys[missing[0]])} is not in reference cache "
                    f"{self.reference.directory}; scoring it by the student EMA alone (missing_reference='ema'); "
                    "later misses are counted in stats.missing_reference",
                    stacklevel=4,
                )
        starts, lengths = self.reference.spans(rows)
        short = np.flatnonzero((rows >= 0) & (lengths < layout.targets))
        if short.size:
            b = short[0]
            raise CacheError(
                f"sample {format_key(sample_keys[b])} has {layout.targets[b]} answer targets in the batch but "
                f"{lengths[b]} reference losses in {self.reference.directory}: the cache was built with another "
                "template or max length"
            )
        width = max(int(layout.targets.max(initial=0)), 1)
        ema_starts = torch.from_numpy(starts).to(device, non_blocking=True)
        if visual_fingerprints is not None and self.cfg.ema_visual_slots > 1:
            group = torch.remainder(visual_fingerprints, self.cfg.ema_visual_slots)
            ema_starts = torch.where(ema_starts >= 0, ema_starts + group * self.reference.tokens, ema_starts)
        return SampleRows(
            starts=ema_starts,
            reference=torch.from_numpy(self.reference.losses_block(rows, width)).to(device, non_blocking=True),
        )

    def select(self, targets, candidates, ordinals, rows, keep):  # type: ignore[override]
        assert rows is not None
        reference = rows.reference.gather(1, ordinals.clamp(0, rows.reference.shape[1] - 1))
        difficulty = self.ema.lookup(self._slots(rows.starts, ordinals, candidates), targets)
        scores = fused_score(
            difficulty, reference, self.cfg.lam, zscore=self.cfg.score_norm == "zscore", mask=candidates
        )
        return select_kept_positions(self.unit_scores(scores, candidates), candidates, keep)

    def difficulty(self, key: SampleKey, ordinals: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The EMA's difficulty of one sample's answer tokens (by ordinal and target id), float32; NaN if unknown."""
        self.sync()
        (start,), _ = self.reference.spans(self.reference.locate([key]))
        device = self.ema.device
        starts = torch.tensor([start], device=device)
        ordinals = ordinals.to(device).reshape(1, -1)
        slots = self._slots(starts, ordinals, torch.ones_like(ordinals, dtype=torch.bool))
        return self.ema.lookup(slots[0], token_ids.to(device).reshape(-1))

    @staticmethod
    def _slots(starts: torch.Tensor, ordinals: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """EMA slot of each candidate (its sample's start + its answer ordinal), -1 elsewhere or without a sample."""
        slots = starts.unsqueeze(1) + ordinals
        return torch.where(candidates & (starts.unsqueeze(1) >= 0), slots, torch.full_like(slots, -1))

    def observe(self, plan: ElisionPlan, compact_targets: torch.Tensor, result: TokenLoss) -> None:
        """The kept candidates' losses, in row-major order of the compact batch: folded now in one process, or
        held (one micro-batch at most) for `sync` to fold every rank's in rank order. With `ema_observe='dense'`,
        sparse steps' losses (gapped context) are not observed (the schedule is the same on every rank)."""
        assert plan.rows is not None
        if self.cfg.ema_observe == "dense" and not plan.dense:
            self.sync()
            return
        ordinals = plan.compaction.gather(plan.ordinals, fill=-1)
        is_candidate = plan.compaction.gather(plan.candidates, fill=False)
        slots = self._slots(plan.rows.starts, ordinals, is_candidate).flatten()[result.positions]
        token_ids = torch.where(is_candidate, compact_targets, -1).flatten()[result.positions]
        self.sync()
        if distributed.process_group_size() == 1:
            self.ema.ensure_vocab(plan.layout.max_target_id + 1)  # a host bound on the observed ids
            self.ema.update(slots, token_ids, result.per_token)
        else:
            self._pending = (slots, token_ids, result.per_token.float())

    def sync(self) -> None:
        """Fold the held micro-batch of every rank into the EMA, in rank order (a collective on every rank)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            slots, token_ids, losses = all_gather_observations(*pending)
            if token_ids.numel():  # every rank grows the per-token table alike, from the same gathered ids
                self.ema.ensure_vocab(int(token_ids.max()) + 1)
            self.ema.update(slots, token_ids, losses)

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            raise RuntimeError("the EMA holds observations not yet exchanged: call sync() on every rank first")
        return {
            **super().state_dict(),
            "ema": self.ema.state_dict(),
            "reference_layout": self.reference.layout_digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        ema = state["ema"]
        if "keys" in ema:  # saved before the EMA was aligned to the cache: place each sample's row at its slots
            ema = self._aligned_legacy_ema(ema)
        elif state.get("reference_layout") != self.reference.layout_digest:
            raise ValueError(
                f"the saved EMA is aligned to another reference cache (layout {state.get('reference_layout')}), "
                f"not {self.reference.directory} ({self.reference.layout_digest})"
            )
        self.ema.load_state_dict(ema)
        self._pending = None

    def _aligned_legacy_ema(self, ema: dict[str, Any]) -> dict[str, Any]:
        keys = [bytes(row) for row in ema["keys"].to(torch.uint8).numpy()]
        starts, lengths = self.reference.spans(self.reference.locate(keys))
        saved = torch.split(ema["values"].float(), ema["lengths"].tolist()) if keys else []
        values = torch.full((self.ema.slots,), float("nan"))  # into visual slot group 0
        for start, length, row in zip(starts.tolist(), lengths.tolist(), saved):
            if start >= 0:
                n = min(length, row.numel())
                values[start : start + n] = row[:n]
        return {"beta": ema["beta"], "values": values, "per_token": ema["per_token"]}


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
