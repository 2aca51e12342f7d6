"""Before step 0: the reference cache checked against the run and a sample of its data, and the startup summary.

A cache that does not fit the training data would otherwise surface at the first batch that misses it, with a
message that cannot say why. `check_cache_fits` first compares what the cache's manifest records (template, max
length; the tokenizer fingerprint is checked when the strategy is built) with what the run states, then keys the
first samples of the training set, collated as training collates them, and looks them up. A miss fails naming the
likely cause, read off the missing samples themselves: placeholders expanded or not (`--image-token-id`), the runs
of expanded visual rows (`--visual-tokens`), samples longer than the cache's max length, a cache tokenized under
other `transformers` / `tokenizers` versions.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.keys import batch_sample_keys, format_key
from ..core.schedule import dense_tail_start, first_sparse_step
from ..data import PLACEHOLDER_IDS, DataError, get_template
from ..store import CacheError, CacheManifest, ReferenceStore
from ..store.manifest import tokenization_versions
from ..strategies import BatchLayout, TokenElision

PREFLIGHT_SAMPLES = 64
"""How many training samples (the first ones of the training set) are looked up in the cache before step 0."""


class CacheMismatchError(CacheError):
    """The reference cache does not fit this training run; the message names the likely cause and the fix."""


@dataclass(frozen=True)
class RunFacts:
    """What the training run states about how its samples are made; None or empty where it does not say."""

    template: str | None = None  # the plugin template equal to the run's preprocessing (the launchers know it)
    max_length: int | None = None  # where its samples are truncated (`--model_max_length`)
    visual_token_ids: tuple[int, ...] = ()  # the model's own image / video token ids (HF-native models)


def _canonical(template: str) -> str:
    try:
        return get_template(template).name
    except DataError:
        return template


def _max_length_flag(value: Any) -> str:
    return "no --max-length (no truncation)" if value is None else f"--max-length {value}"


def manifest_mismatches(manifest: CacheManifest, run: RunFacts) -> list[str]:
    """What the manifest records that contradicts what the run states, each with its fix (caches that do not record
    a setting are not judged on it). Another max length is a contradiction only where it cuts a sample otherwise:
    the cache records its longest sample before truncation."""
    made, causes = manifest.provenance, []
    if made is None:
        return causes
    if run.template is not None and made.template is not None and _canonical(made.template) != _canonical(run.template):
        causes.append(
            f"the cache was made with --template {made.template}, this run preprocesses its samples as "
            f"{run.template}: re-run `regate precompute` with --template {run.template}"
        )
    if run.max_length is not None and not made.truncates_like(run.max_length):
        longest = "not recorded" if made.longest is None else f"{made.longest} rows"
        causes.append(
            f"the cache was made with {_max_length_flag(made.max_length)}, this run truncates its samples at "
            f"{run.max_length} tokens (--model_max_length), and its longest sample ({longest} before truncation) is "
            f"cut differently: re-run `regate precompute` with --max-length {run.max_length}"
        )
    return causes


def _runs_of(ids: np.ndarray, token: int) -> list[int]:
    """Lengths of the runs of `token` in a 1-D id array."""
    hit = np.concatenate([[False], ids == token, [False]])
    edges = np.flatnonzero(hit[1:] != hit[:-1])
    return (edges[1::2] - edges[::2]).tolist()


def sample_causes(manifest: CacheManifest, samples: list[np.ndarray], run: RunFacts) -> list[str]:
    """Likely causes, read off the unpadded pre-merge ids of samples the cache misses, each with its fix."""
    made, causes = manifest.provenance, []
    image_token = made.image_token_id if made is not None else None
    placeholders = any(bool(np.isin(ids, PLACEHOLDER_IDS).any()) for ids in samples)
    run_tokens = [t for t in run.visual_token_ids if any(bool((ids == t).any()) for ids in samples)]
    if placeholders and image_token is not None:
        causes.append(
            f"the cache was made for an HF-native student (--image-token-id {image_token}: placeholders expanded "
            "into that token), but this run's samples carry unexpanded placeholders: re-run `regate precompute` "
            "without --image-token-id"
        )
    elif not placeholders and run_tokens and made is not None and image_token not in run_tokens:
        wanted = run_tokens[0]
        how = "without --image-token-id" if image_token is None else f"with --image-token-id {image_token}"
        causes.append(
            f"this run's samples carry the model's visual token {wanted} expanded, but the cache was made {how}: "
            f"re-run `regate precompute` with --image-token-id {wanted}"
        )
    elif image_token is not None and manifest.visual_tokens:
        runs = sorted({n for ids in samples for n in _runs_of(ids, image_token) if n % manifest.visual_tokens})
        if runs:
            causes.append(
                f"the cache expanded each placeholder into {manifest.visual_tokens} visual rows (--visual-tokens), "
                f"this run's samples hold runs of {runs} copies of token {image_token}: re-run `regate precompute` "
                "with this model's visual row count (--student-config or --visual-tokens)"
            )
    limit = made.max_length if made is not None else None
    longest = max((ids.size for ids in samples), default=0)
    if limit is not None and longest > limit:
        causes.append(
            f"this run has samples of {longest} tokens, but the cache was made with --max-length {limit}, which "
            f"truncated them: re-run `regate precompute` with this run's max length"
        )
    if made is not None and made.versions is not None and made.versions != (installed := tokenization_versions()):
        causes.append(
            f"the cache was tokenized with {_versions(made.versions)}, this run has {_versions(installed)}; the "
            "same tokenizer files can tokenize a sample into other tokens under another version: re-run "
            "`regate precompute` in this run's environment"
        )
    return causes


def _versions(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in sorted(versions.items())) or "none recorded"


def _settings(cache: ReferenceStore) -> str:
    made = cache.manifest.provenance
    if made is None:
        return f"visual rows {cache.manifest.visual_rows}; how its samples were made is not recorded"
    recorded = {
        "template": made.template or "?",
        "max length": made.max_length,
        "longest sample": "?" if made.longest is None else made.longest,
        "image token id": made.image_token_id,
        "visual rows": cache.manifest.visual_rows,
        "data": ", ".join(made.data) or "?",
        "tokenized with": "?" if made.versions is None else _versions(made.versions),
    }
    return ", ".join(f"{name} {value}" for name, value in recorded.items())


def check_cache_fits(elision: TokenElision, batches: Iterable[dict[str, Any]], run: RunFacts) -> None:
    """Refuse, before step 0, a reference cache that does not fit this run: its manifest against `run`, then the
    keys of `batches` (the first training samples, collated as training collates them) against its index. Under
    `missing_reference='ema'` some misses only warn; all of them still fail. No-op for strategies without a cache."""
    cache = elision.capabilities.reference
    if cache is None:
        return
    causes = manifest_mismatches(cache.manifest, run)
    if causes:
        raise CacheMismatchError(f"reference cache {cache.directory} does not fit this run: {'; '.join(causes)}")
    checked, missed, first = 0, [], ""
    offset = 0
    for batch in batches:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        keys = batch_sample_keys(ids, labels, mask)
        rows = cache.locate(keys)
        answers = BatchLayout.of(labels, mask).candidates > 0  # samples without answer tokens need no entry
        valid = np.ones(tuple(ids.shape), bool) if mask is None else mask.detach().cpu().numpy().astype(bool)
        for b in np.flatnonzero(answers & (rows < 0)):
            missed.append(ids[b].detach().cpu().numpy()[valid[b]])
            first = first or f"training sample {offset + int(b)}, key {format_key(keys[b])}"
        checked += int(answers.sum())
        offset += ids.shape[0]
    if not missed:
        return
    found = sample_causes(cache.manifest, missed, run) or [
        "the cache was built from other data, or with another template, --max-length, --image-token-id, "
        "--visual-tokens or tokenizer than this run uses: re-run `regate precompute` with this run's settings"
    ]
    message = (
        f"{len(missed)} of the first {checked} training samples with answer tokens are not in reference cache "
        f"{cache.directory} (first: {first}). Likely cause: {'; '.join(found)}. The cache records: {_settings(cache)}."
    )
    if not elision.capabilities.scores_missing_samples or len(missed) == checked:
        raise CacheMismatchError(message)
    warnings.warn(f"{message} They are scored by the student EMA alone (missing_reference='ema').", stacklevel=2)


def startup_summary(elision: TokenElision, step: int, max_steps: int) -> str:
    """What the run is about to do, for rank 0 to print once before its first step."""
    cfg, lines = elision.cfg, [f"token elision '{elision.name}', starting at optimizer step {step}"]
    cache = elision.capabilities.reference
    if cache is not None:
        manifest = cache.manifest
        lines.append(
            f"  reference cache    {cache.directory}: {len(cache)} samples, {cache.tokens} answer-token losses from "
            f"reference LLM {manifest.reference!r} ({manifest.reference_mode} mode; {_settings(cache)})"
        )
    if elision.capabilities.always_dense:
        lines.append("  schedule           every step dense: every answer token is trained on")
        return "\n".join(lines)
    how = elision.describe()
    how = f"; {how}" if how else ""
    lines.append(f"  keep               {elision.describe_keep()}{how}")
    tail = dense_tail_start(cfg)
    tail = "" if tail is None else f"; from step {tail} dense to the run's end ({cfg.total_steps} steps)"
    lines.append(
        f"  schedule           {cfg.warmup_steps} dense warm-up steps, then cycles of {cfg.cycle_steps}: "
        f"{cfg.dense_steps} dense, {cfg.cycle_steps - cfg.dense_steps} sparse{tail}"
    )
    first = first_sparse_step(step, cfg)
    if first is None:
        lines.append("  first sparse step  none: every step from here on is dense")
    elif max_steps > 0 and first >= max_steps:
        lines.append(f"  first sparse step  {first}, after this run's last step ({max_steps - 1}): every step dense")
    else:
        lines.append(f"  first sparse step  optimizer step {first} (logged as step {first + 1})")
    return "\n".join(lines)
