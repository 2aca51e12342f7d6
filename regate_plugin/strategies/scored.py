"""`ReferenceScoredElision`: the base of strategies that rank candidates by the student's EMA loss and a reference
store's loss (`regate`, `rho`). It locates each batch in the store, stages its reference losses, keeps and
synchronises the EMA, and saves it; a subclass says only how the two signals make a score (`score`)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from ..core import distributed
from ..core.compaction import IGNORE_INDEX
from ..core.config import ReferenceScoredConfig
from ..core.controller import KeepController, dense_signals, sparse_signals
from ..core.ema import DifficultyEMA, all_gather_observations
from ..core.errors import UserError
from ..core.keys import KEY_BYTES, SampleKey, format_key
from ..core.loss import TokenLoss
from ..core.selection import reference_budget, repeated_targets
from ..store import CacheError, ReferenceStore, open_store
from .base import Capabilities, TokenElision
from .plan import BatchLayout, ElisionPlan


class NeedsReferenceError(UserError, ValueError):
    """A strategy that reads reference losses was built without a reference store."""


@dataclass(frozen=True)
class SampleRows:
    """What a batch's sample keys located in the reference store, on the model's device."""

    starts: torch.Tensor  # int64 [B]: each row's first EMA slot (its start in the store's token space, plus its visual
    # slot group x the store's tokens), -1 if absent
    reference: torch.Tensor | None  # float32 [B, W]: each row's reference losses by answer ordinal, NaN past its
    # end; None on a dense step (nothing is selected)


def ema_slots(starts: torch.Tensor, ordinals: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """EMA slot of each candidate (its sample's start + its answer ordinal), -1 elsewhere or without a sample."""
    slots = starts.unsqueeze(1) + ordinals
    return torch.where(candidates & (starts.unsqueeze(1) >= 0), slots, torch.full_like(slots, -1))


class ReferenceScoredElision(TokenElision):
    """Keeps the candidates with the highest `score(student EMA loss, reference loss)`."""

    config_class: ClassVar[type[ReferenceScoredConfig]] = ReferenceScoredConfig
    cfg: ReferenceScoredConfig
    selects_exact_counts = True

    def __init__(
        self,
        cfg: ReferenceScoredConfig | None = None,
        reference: ReferenceStore | str | os.PathLike[str] | None = None,
        vocab_size: int = 0,
    ) -> None:
        super().__init__(cfg)
        if reference is None:
            raise NeedsReferenceError(
                f"token elision '{self.name}' needs reference losses: pass reference=<cache directory> "
                "(--regate_ref_cache, made by `regate precompute`) or an InMemoryReferenceStore"
            )
        self.reference = open_store(reference)
        slots = self.reference.tokens * self.cfg.ema_visual_slots  # the text's span once per visual slot group
        self.ema = DifficultyEMA(self.cfg.ema_beta, slots, vocab_size, self.cfg.ema_dtype)
        self.capabilities = Capabilities(
            sample_keys=True,
            visual_fingerprints=self.cfg.ema_visual_slots > 1,
            reference=self.reference,
            scores_missing_samples=self.cfg.missing_reference == "ema",
            check_visual_rows=self.check_visual_rows,
            learns=True,
        )
        self.control = KeepController(self.cfg) if self.cfg.keep_control == "adaptive" else None
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._pending_signals: torch.Tensor | None = None  # this rank's last micro-batch's controller signals
        self._located: tuple[list[SampleKey], np.ndarray] | None = None  # the last batch's keys and store rows
        self._block: tuple[list[SampleKey], np.ndarray] | None = None  # the last batch's keys and reference losses

    def set_step(self, step: int) -> None:
        """Also, with `keep_control='adaptive'`, let the controller decide the keep ratio at the start of each of its
        windows (after folding every rank's pending observations: a collective, as `sync`)."""
        super().set_step(step)
        if self.control is not None:
            self.sync()
            self.control.advance(self.step)

    def sparse_keep_ratio(self) -> float:
        return self.control.ratio if self.control is not None else self.cfg.keep_ratio

    @property
    def budget_keeps_inputs(self) -> bool:
        """Under `keep_budget='reference'`, each high-reference candidate's successor counts too: the units that keep
        an important token as an input as well (`pair`, `with_input`)."""
        return self.cfg.elision_unit in ("pair", "with_input")

    def describe_keep(self) -> str:
        if self.cfg.keep_budget == "ratio":
            return super().describe_keep()
        inputs = " with its input" if self.budget_keeps_inputs else ""
        return (
            f"every elidable answer token whose reference loss is above {self.cfg.keep_budget_threshold} nats{inputs}, "
            f"and at least {self.cfg.keep_ratio} of them, on sparse steps"
        )

    def sparse_keep_counts(self, layout: BatchLayout, sample_keys: list[SampleKey] | None = None) -> np.ndarray:
        """Under `keep_budget='reference'`, each row's `selection.reference_budget` (read from the store on the host),
        at least the keep ratio's count and at most the row's candidates; else the keep ratio's count."""
        by_ratio = super().sparse_keep_counts(layout, sample_keys)
        if self.cfg.keep_budget == "ratio":
            return by_ratio
        if sample_keys is None:
            raise ValueError(f"token elision '{self.name}' with keep_budget='reference' needs the batch's sample keys")
        reference = self._reference_block(sample_keys, max(int(layout.targets.max(initial=0)), 1))
        budget = reference_budget(reference, layout.targets, self.cfg.keep_budget_threshold, self.budget_keeps_inputs)
        return np.minimum(np.maximum(budget, by_ratio), layout.candidates)

    def score(self, difficulty: torch.Tensor, reference: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Float [B, L]: the score each candidate ranks by (higher kept first, NaN last), from the student's EMA
        loss and the reference loss of each position (NaN where unknown); `candidates` bool [B, L]."""
        raise NotImplementedError

    def check_visual_rows(
        self, sample_keys: list[SampleKey] | None, placeholders: torch.Tensor, rows: torch.Tensor, cut: torch.Tensor
    ) -> None:
        """Refuse a merged batch whose visual rows per sample differ from those its reference losses were scored
        with (`placeholders`, `rows`: per sample; `cut`: the merge truncated that sample)."""
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
        """The batch's store rows (`ReferenceStore.locate`), looked up once for the adapter's visual-row check
        and the plan of the same batch (the same key list)."""
        if self._located is None or self._located[0] is not sample_keys:
            self._located = (sample_keys, self.reference.locate(sample_keys))
        return self._located[1]

    def _reference_block(self, sample_keys: list[SampleKey], width: int) -> np.ndarray:
        """Float32 [B, width]: the batch's reference losses by answer ordinal (`ReferenceStore.losses_block`), read
        once for the budget's counts and the plan of the same batch (the same key list)."""
        if self._block is None or self._block[0] is not sample_keys or self._block[1].shape[1] != width:
            self._block = (sample_keys, self.reference.losses_block(self._locate(sample_keys), width))
        return self._block[1]

    def locate(
        self,
        sample_keys: list[SampleKey] | None,
        layout: BatchLayout,
        device: torch.device,
        visual_fingerprints: torch.Tensor | None = None,
    ) -> SampleRows:
        """Locate the batch in the store (host, vectorised), check it, and stage its reference losses on `device`
        (on sparse steps: a dense one selects nothing).
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
            self.count(missing_reference=missing.size)
            if self._stats.missing_reference == missing.size:  # the run's first miss
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
        ema_starts = torch.from_numpy(starts).to(device, non_blocking=True)
        if visual_fingerprints is not None and self.cfg.ema_visual_slots > 1:
            group = torch.remainder(visual_fingerprints, self.cfg.ema_visual_slots)
            ema_starts = torch.where(ema_starts >= 0, ema_starts + group * self.reference.tokens, ema_starts)
        if self.is_dense() and self.control is None:  # the controller ranks dense steps' candidates too
            return SampleRows(starts=ema_starts, reference=None)
        width = max(int(layout.targets.max(initial=0)), 1)
        reference = torch.from_numpy(self._reference_block(sample_keys, width)).to(device, non_blocking=True)
        return SampleRows(starts=ema_starts, reference=reference)

    def select(
        self,
        targets: torch.Tensor,
        candidates: torch.Tensor,
        ordinals: torch.Tensor,
        rows: SampleRows,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        assert rows.reference is not None  # staged on every sparse step
        reference = rows.reference.gather(1, ordinals.clamp(0, rows.reference.shape[1] - 1))
        difficulty = self.ema.lookup(ema_slots(rows.starts, ordinals, candidates), targets)
        restated = repeated_targets(targets, targets != IGNORE_INDEX) if self.cfg.repeats != "score" else None
        if restated is not None and self.cfg.repeats == "ema":
            # a restatement does not need the visual input: its reference loss is left out (NaN), so `score` ranks
            # it by the student's EMA alone, as a sample missing from the store is scored
            reference = reference.masked_fill(restated, float("nan"))
        scores = self.score(difficulty, reference, candidates)
        return self.choose(scores, candidates, keep, restated if self.cfg.repeats == "last" else None)

    def observe(self, plan: ElisionPlan, compact_targets: torch.Tensor, result: TokenLoss) -> None:
        """The kept candidates' losses, in row-major order of the compact batch: folded now in one process, or
        held (one micro-batch at most) for `sync` to fold every rank's in rank order. With `ema_observe='dense'`,
        sparse steps' losses (gapped context) are not observed (the schedule is the same on every rank). With
        `keep_control='adaptive'`, on every step, the controller's signals of the micro-batch (`_signals`), added
        now or held for `sync` alike."""
        assert plan.rows is not None
        observed = self.cfg.ema_observe == "all" or plan.dense
        if not observed and self.control is None:
            self.sync()
            return
        ordinals = plan.compaction.gather(plan.ordinals, fill=-1)
        is_candidate = plan.compaction.gather(plan.candidates, fill=False)
        slots = ema_slots(plan.rows.starts, ordinals, is_candidate).flatten()[result.positions]
        token_ids = torch.where(is_candidate, compact_targets, -1).flatten()[result.positions]
        signals = None if self.control is None else self._signals(plan, is_candidate, slots, token_ids, result)
        self.sync()
        if distributed.process_group_size() == 1:
            if self.control is not None and signals is not None:
                self.control.add(signals)
            if observed:
                self.ema.ensure_vocab(plan.layout.max_target_id + 1)  # a host bound on the observed ids
                self.ema.update(slots, token_ids, result.per_token)
        else:
            self._pending = (slots, token_ids, result.per_token.float()) if observed else None
            self._pending_signals = signals

    def _signals(
        self,
        plan: ElisionPlan,
        is_candidate: torch.Tensor,
        slots: torch.Tensor,
        token_ids: torch.Tensor,
        result: TokenLoss,
    ) -> torch.Tensor:
        """The controller's signals of one micro-batch (`core.controller`), on the device: on a dense step, the
        losses of the candidates the sparse rule would elide and keep at the current ratio; on a sparse step, the
        kept candidates' losses against their EMA before this update and their reference losses."""
        assert plan.rows is not None and plan.rows.reference is not None
        candidate = is_candidate.flatten()[result.positions]
        losses = torch.where(candidate, result.per_token.float(), float("nan"))  # NaN: counted nowhere (no sync)
        if plan.dense:
            keep = torch.from_numpy(self.sparse_keep_counts(plan.layout, plan.sample_keys))
            keep = keep.to(plan.targets.device, non_blocking=True)
            would_keep = self.select(plan.targets, plan.candidates, plan.ordinals, plan.rows, keep)
            return dense_signals(losses, plan.compaction.gather(would_keep, fill=False).flatten()[result.positions])
        reference = plan.rows.reference.gather(1, plan.ordinals.clamp(0, plan.rows.reference.shape[1] - 1))
        reference = plan.compaction.gather(reference, fill=float("nan")).flatten()[result.positions]
        ema = self.ema.lookup(slots, token_ids)  # before this step's update; NaN off the candidates (slot -1)
        return sparse_signals(losses, ema, reference, self.cfg.keep_control_low)

    def sync(self) -> None:
        """Fold the held micro-batch of every rank into the EMA, in rank order, and add every rank's controller
        signals (a collective on every rank)."""
        signals, self._pending_signals = self._pending_signals, None
        if self.control is not None and signals is not None:
            signals = signals.clone()
            dist.all_reduce(signals)  # every rank adds the same sums
            self.control.add(signals)
        pending, self._pending = self._pending, None
        if pending is not None:
            slots, token_ids, losses = all_gather_observations(*pending)
            if token_ids.numel():  # every rank grows the per-token table alike, from the same gathered ids
                self.ema.ensure_vocab(int(token_ids.max()) + 1)
            self.ema.update(slots, token_ids, losses)

    def state_dict(self) -> dict[str, Any]:
        """The base state, the EMA, and the token-space layout it is aligned to: the digest, and each sample's key,
        start and length, by which `load_state_dict` re-places the EMA into a store laid out otherwise."""
        if self._pending is not None or self._pending_signals is not None:
            raise RuntimeError("the EMA holds observations not yet exchanged: call sync() on every rank first")
        keys = list(self.reference.keys())
        starts, lengths = self.reference.spans(self.reference.locate(keys))
        return {
            **super().state_dict(),
            **({} if self.control is None else {"keep_control": self.control.state_dict()}),
            "ema": self.ema.state_dict(),
            "reference_layout": self.reference.layout_digest,
            "reference_samples": {
                "keys": torch.from_numpy(np.frombuffer(b"".join(keys), np.uint8).reshape(-1, KEY_BYTES).copy()),
                "starts": torch.from_numpy(starts),
                "lengths": torch.from_numpy(lengths),
                "tokens": self.reference.tokens,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; an EMA saved over another layout of the same samples (a cache rebuilt or
        repaired, its shards in another order) is re-placed by sample key. Raises `CacheError` when saved samples
        are missing from the store or have other lengths, before anything is restored."""
        ema = state["ema"]
        if state.get("reference_layout") != self.reference.layout_digest:
            ema = {**ema, "values": self._replaced(ema["values"], state)}
        super().load_state_dict(state)
        self.ema.load_state_dict(ema)
        if self.control is not None:
            self.control.load_state_dict(state["keep_control"])
        self._pending = self._pending_signals = None

    def _replaced(self, values: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The saved EMA `values`, laid out over the saved samples, re-placed into this store's token space."""
        where = (
            f"the saved EMA is aligned to another layout of reference cache (layout {state.get('reference_layout')})"
        )
        saved = state.get("reference_samples")
        if saved is None:
            raise CacheError(
                f"{where}, not {self.reference.directory} ({self.reference.layout_digest}), and records no sample "
                "keys to re-place it by: resume with the cache the checkpoint was trained with"
            )
        keys = [bytes(k) for k in saved["keys"].numpy()]
        starts, lengths = self.reference.spans(self.reference.locate(keys))
        saved_lengths = saved["lengths"].numpy()
        wrong = np.flatnonzero((starts < 0) | (lengths != saved_lengths))
        if wrong.size:
            missing = int((starts < 0).sum())
            first = int(wrong[0])
            detail = (
                "is not in it"
                if starts[first] < 0
                else f"has {lengths[first]} losses in it, {saved_lengths[first]} when saved"
            )
            raise CacheError(
                f"{where}; re-placing it by sample key into {self.reference.directory}: {missing} of its "
                f"{len(keys)} samples are missing and {wrong.size - missing} have other lengths (first: sample "
                f"{format_key(keys[first])} {detail}): resume with the cache the checkpoint was trained with"
            )
        old_starts, old_tokens = saved["starts"].numpy(), int(saved["tokens"])
        return replace_spans(
            values, old_starts, starts, lengths, old_tokens, self.reference.tokens, self.cfg.ema_visual_slots
        )


def replace_spans(
    values: torch.Tensor,
    old_starts: np.ndarray,
    new_starts: np.ndarray,
    lengths: np.ndarray,
    old_tokens: int,
    new_tokens: int,
    groups: int = 1,
) -> torch.Tensor:
    """EMA slot values over `groups` copies of an `old_tokens` token space, with each sample's span moved from its
    old start to its new one in every copy (of `new_tokens` each); NaN where no saved span lands."""
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    group = np.arange(groups)[:, None]
    source = (np.repeat(old_starts, lengths) + within)[None, :] + group * old_tokens
    target = (np.repeat(new_starts, lengths) + within)[None, :] + group * new_tokens
    out = torch.full((groups * new_tokens,), float("nan"), dtype=values.dtype)
    out[torch.from_numpy(target.ravel())] = values[torch.from_numpy(source.ravel())]
    return out
