"""`regate precompute`: reference losses for a whole training set, resumable and data-parallel.

The data is cut into fixed windows of samples (by file order). Each window is tokenized with the upstream
template, its samples are sorted by length and packed into batches under a token budget, and the batches run
through the frozen reference LLM. Everything about a batch depends only on the data and the settings, never on what
has already been done or on the number of processes, so a resumed or a data-parallel run scores every sample in
exactly the batch an uninterrupted single-process run would, and its losses are equal value for value.

Each rank writes committed shards into `OUT/parts/rank-NNNNN`; when all ranks are done, rank 0 moves them into
`OUT` (`ReferenceLossCacheWriter.absorb`) and removes the parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core import distributed
from ..core.compaction import IGNORE_INDEX
from ..core.config import ConfigError
from ..core.dtypes import dtype_from_name
from ..core.files import write_bytes_atomically
from ..core.keys import SampleKey, sample_key, tokenizer_fingerprint
from ..core.reference import REFERENCE_MODES, ReferenceInput, build_reference_input
from ..data import PLACEHOLDER_IDS, Conversation, DataError, expand_placeholders, get_template, iter_conversations
from ..data.anyres import AnyresLayout, read_image_size
from ..data.hf_visual import HFVideoRows, HFVisualRows, video_frame_size
from ..data.templates import ConversationTemplate, tokenizer_limit
from ..store import CacheManifest, Provenance, ReferenceLossCacheWriter, read_manifest
from ..store.lifecycle import PARTS_DIR, known_keys, locked, merge_parts, prepare_output
from .model import ReferenceScorer, dtype_kwarg, resolve_reference

logger = logging.getLogger(__name__)
_UNCUT = 2**31 - 1  # a length limit no sample reaches: the template tokenizes all of it
SUMMARY_NAME = "precompute_summary.json"


@dataclass
class PrecomputeConfig:
    data: Sequence[str | os.PathLike[str]] = field(metadata={"help": "LLaVA-format .json list or .jsonl file(s)"})
    reference: str = field(metadata={"help": "reference LLM: hub id, local directory, .gguf file, or 'smollm2'"})
    template: str = field(metadata={"help": "the training run's conversation template"})
    out: str | os.PathLike[str] = field(metadata={"help": "cache directory"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "the student's tokenizer (default: the reference's; they must be identical)"}
    )
    visual_tokens: int | None = field(
        default=None,
        metadata={"help": "visual rows per <image>/<video> placeholder, needed when the data has any (LLaVA-1.5: 576)"},
    )
    anyres: AnyresLayout | None = None  # instead: LLaVA-NeXT anyres, rows counted per image from its size
    processor_rows: HFVisualRows | None = None  # HF-native Qwen-VL / InternVL: its processor's rows per image size
    video_rows: HFVideoRows | None = None  # HF-native video student (LLaVA-NeXT-Video): its processor's rows per video
    image_folder: str | os.PathLike[str] | None = field(
        default=None,
        metadata={
            "help": "the training run's --image_folder / --data_folder: image and video paths are relative to it, "
            "and every sample's files must exist (needed for an anyres student, whose rows depend on each image's "
            "size)"
        },
    )
    image_token_id: int | None = field(
        default=None,
        metadata={
            "help": "HF-native student: its processor expands each placeholder into this token id, --visual-tokens "
            "times (LlavaForConditionalGeneration: config.image_token_id)"
        },
    )
    video_token_id: int | None = field(
        default=None,
        metadata={
            "help": "HF-native video student: its processor expands each <video> into this token id "
            "(LlavaNextVideoForConditionalGeneration: config.video_token_id)"
        },
    )
    mode: str = field(default="gap", metadata={"help": "gap: skip visual rows, keep positions; pad: pad tokens"})
    max_length: int | None = field(
        default=None, metadata={"help": "the training run's --model_max_length (default: the tokenizer's)"}
    )
    batch_tokens: int = field(default=16384, metadata={"help": "padded tokens per reference forward"})
    window: int = field(default=2048, metadata={"help": "samples tokenized, sorted and batched together"})
    cache_dtype: str = field(default="float16", metadata={"help": "stored loss dtype"})
    model_dtype: str = field(
        default="auto", metadata={"help": "reference weights dtype (auto: float32 on CPU, bfloat16 on CUDA)"}
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run in --out"})
    overwrite: bool = field(default=False, metadata={"help": "replace whatever cache --out holds"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) malformed samples instead of stopping"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        if self.mode not in REFERENCE_MODES:
            raise ConfigError(f"--mode must be one of {list(REFERENCE_MODES)}, got {self.mode!r}")
        if self.batch_tokens < 1 or self.window < 1:
            raise ConfigError("--batch-tokens and --window must be >= 1")
        if self.visual_tokens is not None and self.visual_tokens < 1:
            raise ConfigError(f"--visual-tokens must be >= 1, got {self.visual_tokens}")
        if self.anyres is not None and (self.visual_tokens is not None or self.image_token_id is not None):
            raise ConfigError(
                "an anyres student counts its visual rows per image: pass neither --visual-tokens nor --image-token-id"
            )
        if self.processor_rows is not None and (self.visual_tokens is not None or self.image_token_id is None):
            raise ConfigError(
                "a Qwen-VL / InternVL student counts its visual rows per image: pass --image-token-id (its "
                "config.image_token_id) and not --visual-tokens"
            )
        if (self.video_rows is None) != (self.video_token_id is None):
            raise ConfigError(
                "an HF-native video student needs both its rows per video (--student-config with --num-frames, or "
                "PrecomputeConfig(video_rows=video_rows_of(processor, num_frames))) and --video-token-id"
            )
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues a cache and --overwrite replaces it: pass one of them")


@dataclass
class PrecomputeSummary:
    samples: int = 0  # valid samples in the data
    scored: int = 0  # samples run through the reference LLM by this call
    already_done: int = 0  # found in the cache (resume) and skipped
    duplicates: int = 0  # same sample key as an earlier sample
    answer_tokens: int = 0  # reference losses written by this call
    reference_tokens: int = 0  # real (unpadded) tokens the reference LLM ran on
    padded_tokens: int = 0  # batch slots including padding
    truncated: int = 0  # samples cut at the max length
    longest: int = 0  # the longest sample before truncation, in the student's rows (the maximum, not a sum)
    empty: int = 0  # samples with no answer tokens (recorded with zero losses)
    bad: list[str] = field(default_factory=list)  # skipped with --skip-bad
    seconds: float = 0.0

    def merge(self, other: PrecomputeSummary) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, max(self.longest, value) if name == "longest" else getattr(self, name) + value)

    def format(self) -> str:
        rate = self.reference_tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"samples        {self.samples}",
            f"scored         {self.scored}  ({self.already_done} already in the cache, {self.duplicates} duplicates)",
            f"answer tokens  {self.answer_tokens}",
            f"truncated      {self.truncated}  (longest sample {self.longest} rows before truncation)",
            f"empty          {self.empty}  (no answer tokens: nothing to elide)",
            f"bad (skipped)  {len(self.bad)}",
            f"time           {self.seconds:.1f} s  ({self.scored / max(self.seconds, 1e-9):.1f} samples/s, "
            f"{rate:.0f} reference tokens/s)",
        ]
        return "\n".join(lines)


@dataclass
class PreparedSample:
    key: SampleKey
    reference_input: ReferenceInput
    truncated: bool
    visual_rows: int  # the rows the student splices in for all of the sample's placeholders
    full_length: int  # the rows the truncation limit is compared with, before truncation

    @property
    def length(self) -> int:
        return int(self.reference_input.input_ids.numel())


def prepare_sample(
    sample: Conversation,
    template: ConversationTemplate,
    tokenizer: Any,
    max_length: int | None,
    visual_tokens: int | Sequence[int] | None,
    mode: str,
    pad_token_id: int | None,
    image_token_id: int | None = None,
    wrap: tuple[int, int] | None = None,
) -> PreparedSample:
    """Tokenize as upstream does, truncate as its collator (and merge) do, key it, and build the reference LLM's input.

    `visual_tokens`: rows per placeholder, one count or one per placeholder in order. With `image_token_id`
    (HF-native students) each placeholder is first expanded into that many copies of that token, as the model's
    processor does (between the `wrap` pair, for InternVL), and the sample is keyed and truncated in that expanded
    form."""
    encoded = template.encode(sample, tokenizer, max_length)
    text_length = len(encoded.input_ids)
    if max_length is not None and text_length >= max_length:  # the template may have cut it as it tokenized it
        text_length = len(template.encode(sample, tokenizer, _UNCUT).input_ids)
    placeholders = sum(token in PLACEHOLDER_IDS for token in encoded.input_ids)
    if placeholders and visual_tokens is None:
        raise DataError(
            f"{sample.where()}: the sample has a visual placeholder; pass --visual-tokens or --student-config"
        )
    visual_ids, rows = PLACEHOLDER_IDS, visual_tokens or 1
    if not isinstance(rows, int) and len(rows) != placeholders:
        raise DataError(
            f"{sample.where()}: {len(rows)} {sample.modality or 'image'} file(s) for {placeholders} placeholder(s); "
            "the model pairs them in order, so the counts must match"
        )
    total_rows = placeholders * rows if isinstance(rows, int) else sum(rows)
    merged = template.truncates_merged or image_token_id is not None  # the limit applies to the merged rows
    wrapped = placeholders * len(wrap or ())
    full_length = text_length - placeholders + total_rows + wrapped if merged else text_length
    if image_token_id is not None:  # HF-native: the processor expands placeholders before anything else
        encoded = expand_placeholders(encoded, image_token_id, rows, wrap)
        visual_ids, rows = (image_token_id, *(wrap or ())), 1  # the wrap tokens are the processor's, not text
    ids, labels = encoded.input_ids, encoded.labels
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    key = sample_key(ids, [label != IGNORE_INDEX for label in labels])
    reference_input = build_reference_input(ids, labels, visual_ids, rows, mode, pad_token_id)
    if template.truncates_merged and image_token_id is None and max_length is not None:
        cut = reference_input.truncated(max_length)
        truncated = truncated or cut is not reference_input
        reference_input = cut
    return PreparedSample(key, reference_input, truncated, total_rows, full_length)


def visual_paths(cfg: PrecomputeConfig, sample: Conversation) -> list[Path]:
    """The sample's image or video files, under `--image-folder` when given."""
    return [Path(cfg.image_folder or "") / name for name in sample.visual_files]


def placeholder_rows(cfg: PrecomputeConfig, sample: Conversation) -> int | list[int] | None:
    """The rows the student splices in per placeholder of `sample`: `--visual-tokens`, or for an anyres or Qwen-VL /
    InternVL student one count per image, from its size (read from the file's header) or, in an anyres sample with
    several images, of one padded crop each; for an HF-native video student (`video_rows`) one count per video, from
    its frame size, as `LlavaHFDataset` counts them."""
    if sample.modality == "video" and cfg.video_rows is not None:
        try:
            return [cfg.video_rows.rows(video_frame_size(path)) for path in visual_paths(cfg, sample)]
        except DataError as err:
            raise DataError(f"{sample.where()}: {err}") from None
    layout = cfg.anyres or cfg.processor_rows
    if layout is None:
        return cfg.visual_tokens
    if sample.modality == "video":
        raise DataError(
            f"{sample.where()}: video samples of a student whose rows depend on the image size "
            "(LLaVA-NeXT anyres, Qwen-VL, InternVL) are not supported"
        )
    paths = visual_paths(cfg, sample)
    if cfg.anyres is not None and len(paths) > 1:  # upstream pads every image of a multi-image sample to one crop
        return [cfg.anyres.padded_rows()] * len(paths)
    try:
        return [layout.rows(read_image_size(path)) for path in paths]
    except DataError as err:
        raise DataError(f"{sample.where()}: {err}") from None


def expansion_token(cfg: PrecomputeConfig, sample: Conversation) -> int | None:
    """The token an HF-native student's processor expands `sample`'s placeholders into: its video token in a video
    sample (where precompute was given one), else its image token; None for students that splice placeholders."""
    if sample.modality == "video" and cfg.video_token_id is not None:
        return cfg.video_token_id
    return cfg.image_token_id


def wrap_ids(cfg: PrecomputeConfig, tokenizer: Any) -> tuple[int, int] | None:
    """The ids of the tokens an InternVL processor puts around each image's rows (None for other students)."""
    wrap = cfg.processor_rows.wrap if cfg.processor_rows is not None else None
    if wrap is None:
        return None
    ids = tuple(tokenizer.convert_tokens_to_ids(list(wrap)))
    if tokenizer.unk_token_id in ids or None in ids:
        raise DataError(f"the tokenizer has no single token for {' / '.join(wrap)}, which InternVL puts around images")
    return ids


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest row stays within `batch_tokens`.

    A lone row may exceed it."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _windows(items: list[Conversation], size: int) -> Iterator[tuple[int, list[Conversation]]]:
    for number, start in enumerate(range(0, len(items), size)):
        yield number, items[start : start + size]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(device)


def _model_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_from_name(name, "--model-dtype")


def load_data(cfg: PrecomputeConfig, summary: PrecomputeSummary) -> list[Conversation]:
    """Every valid sample of the data files, in order. With `--image-folder` (or an anyres student, whose rows need
    the images) a sample whose image or video file does not exist is bad, found here before anything is written."""
    samples: list[Conversation] = []
    for path in cfg.data:
        samples.extend(iter_conversations(path, skip_bad=cfg.skip_bad, bad=summary.bad))
    if cfg.image_folder is None and cfg.anyres is None and cfg.processor_rows is None and cfg.video_rows is None:
        return samples
    present = []
    for sample in samples:
        missing = [path for path in visual_paths(cfg, sample) if not path.is_file()]
        if not missing:
            present.append(sample)
            continue
        problem = f"{sample.where()}: its {sample.modality} {missing[0]} does not exist (--image-folder)"
        if not cfg.skip_bad:
            raise DataError(problem)
        summary.bad.append(problem)
    return present


def _gather(summary: PrecomputeSummary, world: int) -> PrecomputeSummary:
    """Every rank's counters summed (rank 0 reports them)."""
    if world == 1:
        return summary
    import torch.distributed as dist

    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, summary)
    total = PrecomputeSummary()
    for other in everyone:
        total.merge(other)
    return total


@dataclass
class _Encoding:
    """How a sample becomes the reference's input: the training run's template, tokenizer and length limit."""

    template: ConversationTemplate
    tokenizer: Any
    max_length: int | None
    pad_id: int | None


def run_precompute(cfg: PrecomputeConfig, model: Any = None, tokenizer: Any = None) -> PrecomputeSummary:
    """Score every sample of `cfg.data` with the reference LLM and commit the losses to `cfg.out`.

    `model` / `tokenizer` may be passed in already loaded; otherwise they load from `cfg.reference` / `cfg.tokenizer`.
    Under `torchrun` each rank scores every WORLD_SIZE-th window and rank 0 merges the shards at the end. Rank 0
    holds `cfg.out`'s lock for the whole run: a second precompute into it is refused.
    """
    started = time.perf_counter()
    rank, world = distributed.rank(), distributed.world_size()
    opens_group = world > 1 and distributed.process_group_size() == 1  # `_barrier` opens it; closed at the end
    out = Path(cfg.out)
    encoding = _encoding(cfg, tokenizer)
    wanted = _wanted_manifest(cfg, encoding)
    with locked(out) if rank == 0 else contextlib.nullcontext():
        summary = _run_locked(cfg, model, encoding, wanted, rank, world, started)
    _barrier(world)
    if opens_group:
        distributed.destroy_process_group()
    return summary


def _run_locked(
    cfg: PrecomputeConfig,
    model: Any,
    encoding: _Encoding,
    wanted: CacheManifest,
    rank: int,
    world: int,
    started: float,
) -> PrecomputeSummary:
    out = Path(cfg.out)
    loaded = PrecomputeSummary()
    samples = load_data(cfg, loaded)
    if not samples:
        raise DataError(f"no valid samples in {', '.join(str(p) for p in cfg.data)}")
    model = model if model is not None else _load_reference_model(cfg)
    model.eval().requires_grad_(False)
    # Built before anything is written: it refuses a mode the reference LLM cannot run.
    scorer = ReferenceScorer(model, cfg.mode, PLACEHOLDER_IDS, cfg.visual_tokens or 1, encoding.pad_id)
    if rank == 0:
        prepare_output(out, wanted, resume=cfg.resume, overwrite=cfg.overwrite)
    _barrier(world)
    known = known_keys(out)
    part = ReferenceLossCacheWriter.like(out / PARTS_DIR / f"rank-{rank:05d}", wanted)

    vocab_size = model.get_input_embeddings().num_embeddings
    summary = _score_windows(cfg, samples, encoding, scorer, vocab_size, known, part, rank, world, started)
    _barrier(world)
    summary = _gather(summary, world)
    if rank == 0:  # the longest sample of the whole cache, this run's data and what an earlier run recorded
        longest = max(summary.longest, read_manifest(out).provenance.longest or 0)
        merge_parts(
            out, dataclasses.replace(wanted, provenance=dataclasses.replace(wanted.provenance, longest=longest))
        )
    summary.samples = len(samples)
    summary.bad = loaded.bad + summary.bad
    summary.seconds = time.perf_counter() - started
    if summary.empty:
        logger.warning("%d samples have no answer tokens (check the template and --max-length)", summary.empty)
    if rank == 0:
        try:
            write_bytes_atomically(out / SUMMARY_NAME, json.dumps(asdict(summary), indent=2).encode())
        except OSError as err:  # the cache is complete: only the record of this run is missing
            logger.warning("cannot write %s (%s); the reference cache itself is complete", out / SUMMARY_NAME, err)
    return summary


def _encoding(cfg: PrecomputeConfig, tokenizer: Any) -> _Encoding:
    """The template, the student's tokenizer (loaded unless given), its max length and pad id."""
    template = get_template(cfg.template)
    if tokenizer is None:
        from transformers import AutoTokenizer

        location = resolve_reference(cfg.tokenizer or cfg.reference)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                location, local_files_only=Path(location).is_dir(), use_fast=template.use_fast, padding_side="right"
            )
        except OSError as err:  # not a directory, not in the HF cache, and no hub: say which one
            raise FileNotFoundError(
                f"cannot load the tokenizer of {location} (--tokenizer / --reference): {err}"
            ) from None
    max_length = cfg.max_length or tokenizer_limit(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    if cfg.mode == "pad" and pad_id is None:
        raise ConfigError(
            f"--mode pad needs a pad token, and the tokenizer of {cfg.tokenizer or cfg.reference} has none"
        )
    return _Encoding(template, tokenizer, max_length, pad_id)


def _wanted_manifest(cfg: PrecomputeConfig, encoding: _Encoding) -> CacheManifest:
    """What the manifest records: the header a resumed run must match, and how the samples are made (the longest
    sample is recorded when the run is done)."""
    provenance = Provenance(
        template=encoding.template.name,
        max_length=encoding.max_length,
        image_token_id=cfg.image_token_id,
        image_folder=None if cfg.image_folder is None else str(cfg.image_folder),
        data=tuple(str(p) for p in cfg.data),
    )
    return CacheManifest(
        reference=str(cfg.reference),
        tokenizer_fingerprint=tokenizer_fingerprint(encoding.tokenizer),
        reference_mode=cfg.mode,
        dtype=cfg.cache_dtype,
        visual_tokens=cfg.visual_tokens,
        visual_layout=visual_layout(cfg),
        provenance=provenance,
    )


def visual_layout(cfg: PrecomputeConfig) -> dict[str, Any] | None:
    """What the manifest records of rows counted per sample: the image rule, and the video rule with its token."""
    layout = cfg.anyres or cfg.processor_rows
    described = layout.describe() if layout is not None else None
    if cfg.video_rows is None:
        return described
    return {**(described or {}), "video": {**cfg.video_rows.describe(), "token_id": cfg.video_token_id}}


def _load_reference_model(cfg: PrecomputeConfig) -> Any:
    from transformers import AutoModelForCausalLM

    device = _resolve_device(cfg.device)
    location = resolve_reference(cfg.reference)
    return AutoModelForCausalLM.from_pretrained(
        location, local_files_only=Path(location).is_dir(), **dtype_kwarg(_model_dtype(cfg.model_dtype, device))
    ).to(device)


def _score_windows(
    cfg: PrecomputeConfig,
    samples: list[Conversation],
    encoding: _Encoding,
    scorer: ReferenceScorer,
    vocab_size: int,
    known: set[SampleKey],
    part: ReferenceLossCacheWriter,
    rank: int,
    world: int,
    started: float,
) -> PrecomputeSummary:
    """This rank's windows (every `world`-th): prepared, batched, scored and committed shard by shard."""
    from tqdm.auto import tqdm

    mine = [window for n, window in _windows(samples, cfg.window) if n % world == rank]
    bar = tqdm(total=sum(len(w) for w in mine), unit="sample", disable=not cfg.progress or rank != 0, desc="precompute")
    summary = PrecomputeSummary()
    for window in mine:
        prepared = _prepare_window(cfg, window, encoding, vocab_size, summary, bar)
        for batch in plan_batches([max(p.length, 1) for p in prepared], cfg.batch_tokens):
            _score_batch([prepared[i] for i in batch], scorer, known, part, summary)
            bar.update(len(batch))
            elapsed = time.perf_counter() - started
            bar.set_postfix(tok_s=f"{summary.reference_tokens / max(elapsed, 1e-9):.0f}", refresh=False)
        part.flush()
    bar.close()
    return summary


def _prepare_window(
    cfg: PrecomputeConfig,
    window: list[Conversation],
    encoding: _Encoding,
    vocab_size: int,
    summary: PrecomputeSummary,
    bar: Any,
) -> list[PreparedSample]:
    """Tokenize and key a window's samples; bad ones (with --skip-bad) and repeats are counted and dropped.

    Duplicates are dropped within a window only, so a window's batches never depend on other windows. A token id
    outside the reference LLM's vocabulary is refused before the window is scored."""
    seen: set[SampleKey] = set()
    prepared = []
    for sample in window:
        try:
            item = prepare_sample(
                sample,
                encoding.template,
                encoding.tokenizer,
                encoding.max_length,
                placeholder_rows(cfg, sample),
                cfg.mode,
                encoding.pad_id,
                expansion_token(cfg, sample),
                wrap_ids(cfg, encoding.tokenizer),
            )
        except DataError as err:
            if not cfg.skip_bad:
                raise
            summary.bad.append(str(err))
            bar.update(1)
            continue
        if item.length and (largest := int(item.reference_input.input_ids.max())) >= vocab_size:
            raise ConfigError(
                f"{sample.where()}: token id {largest} is outside the vocabulary of reference LLM {cfg.reference} "
                f"({vocab_size} tokens): the reference must use the student's tokenizer (--reference, --tokenizer)"
            )
        if item.key in seen:
            summary.duplicates += 1
            bar.update(1)
            continue
        seen.add(item.key)
        prepared.append(item)
        summary.longest = max(summary.longest, item.full_length)
    return prepared


def _score_batch(
    items: list[PreparedSample],
    scorer: ReferenceScorer,
    known: set[SampleKey],
    part: ReferenceLossCacheWriter,
    summary: PrecomputeSummary,
) -> None:
    """Run one planned batch through the reference (whole, so its losses never depend on what is already done)
    unless every sample is committed, and queue the samples not committed yet."""
    todo = [p for p in items if p.key not in known and p.key not in part]
    summary.already_done += len(items) - len(todo)
    if not todo:
        return
    with_targets = [p for p in items if p.reference_input.num_targets > 0]
    losses = dict(zip((p.key for p in with_targets), scorer.score_inputs([p.reference_input for p in with_targets])))
    per_sample = part.manifest.visual_layout is not None
    for p in todo:
        values = losses.get(p.key, torch.zeros(0))
        part.add(p.key, values, p.visual_rows if per_sample else None)
        summary.scored += 1
        summary.answer_tokens += values.numel()
        summary.truncated += p.truncated
        summary.empty += values.numel() == 0
    summary.reference_tokens += sum(p.length for p in with_targets)
    summary.padded_tokens += len(with_targets) * max((p.length for p in with_targets), default=0)
