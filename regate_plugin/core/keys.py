"""Content identities: sample keys and tokenizer fingerprints.

A sample key is blake2b-128 over the sample's unpadded pre-merge `input_ids` (int64, little endian) and its
label mask (one byte per token). It needs no dataset or collator change, is the same in every process and run,
and a cache built with another tokenizer or template simply misses instead of silently misaligning.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .compaction import IGNORE_INDEX

KEY_BYTES = 16

SampleKey = bytes


def sample_key(
    input_ids: Sequence[int] | np.ndarray | torch.Tensor, label_mask: Sequence[bool] | np.ndarray | torch.Tensor
) -> SampleKey:
    """blake2b-128 of one unpadded sample's token ids and supervision mask."""
    ids = _as_numpy(input_ids).astype("<i8", copy=False).reshape(-1)
    mask = _as_numpy(label_mask).astype(np.uint8, copy=False).reshape(-1)
    if ids.shape != mask.shape:
        raise ValueError(f"input_ids has {ids.size} tokens but label_mask has {mask.size}")
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    digest.update(ids.tobytes())
    digest.update(b"\x00labels\x00")
    digest.update(mask.tobytes())
    return digest.digest()


def batch_sample_keys(
    input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[SampleKey]:
    """Keys of every row of a padded [B, L] batch; padding (attention_mask == 0) is stripped first."""
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    ids = input_ids.detach().cpu().numpy()
    supervised = (labels != IGNORE_INDEX).detach().cpu().numpy()
    valid = np.ones_like(supervised) if attention_mask is None else attention_mask.detach().cpu().numpy().astype(bool)
    return [sample_key(ids[b][valid[b]], supervised[b][valid[b]]) for b in range(ids.shape[0])]


FINGERPRINT_VALUES = 4096  # pixel values a visual fingerprint reads, evenly spaced over the sample's input
_FINGERPRINT_SCALE = 1024  # values are quantised to 1/1024 before hashing, so the hash is exact integer arithmetic


def visual_fingerprints(visual: Any, batch_size: int) -> torch.Tensor | None:
    """Int64 [B], non-negative: a hash of each sample's visual input, computed on its device (no host copy).

    `visual` is what the model receives: a [B, ...] pixel tensor, or a list of B tensors (or of (tensor, modality)
    pairs, as VideoLLaMA2 passes them). Anything else (no visual input, or not exactly one per sample, as in a batch
    mixing text-only and image samples) gives None. The hash is a fixed integer combination of evenly spaced
    quantised values, so equal inputs give equal fingerprints on every rank and in every run.
    """
    if isinstance(visual, torch.Tensor):
        if visual.ndim < 2 or visual.shape[0] != batch_size:
            return None
        return _fingerprint(visual.reshape(batch_size, -1))
    if not isinstance(visual, (list, tuple)) or len(visual) != batch_size or not visual:
        return None
    tensors = [v[0] if isinstance(v, (list, tuple)) and v else v for v in visual]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    return torch.cat([_fingerprint(t.reshape(1, -1)) for t in tensors])


def _fingerprint(flat: torch.Tensor) -> torch.Tensor:
    columns = torch.linspace(0, flat.shape[1] - 1, min(flat.shape[1], FINGERPRINT_VALUES), device=flat.device)
    quantised = torch.round(flat[:, columns.long()].float() * _FINGERPRINT_SCALE).long()
    # |quantised| stays far below 2^31 for normalised pixels and the weights below 2^20: the sum cannot overflow.
    return (quantised * _weights(columns.numel(), flat.device)).sum(1).abs()


@functools.lru_cache(maxsize=16)
def _weights(count: int, device: torch.device) -> torch.Tensor:
    """The fingerprint's fixed coefficients, made once per length and device (no copy to the device per step)."""
    return torch.randint(1, 1 << 20, (count,), generator=torch.Generator().manual_seed(0)).to(device)


def format_key(key: SampleKey) -> str:
    return key.hex()


class TokenizerLike(Protocol):
    def get_vocab(self) -> Mapping[str, int]: ...


# Not the pad token: padding is stripped before keying, and upstream train scripts often set it after loading
# (LLaVA v1: pad = unk), so it differs between precompute and training without changing any sample.
_SPECIAL_ATTRS = ("bos_token_id", "eos_token_id", "unk_token_id")


def tokenizer_fingerprint(tokenizer: TokenizerLike | Any) -> str:
    """sha256 (hex, first 16 bytes) of a tokenizer's vocabulary and its BOS/EOS/UNK ids.

    Two tokenizers with the same fingerprint map every string to the same ids, which is what a cached per-token
    reference loss needs; the class, file format or padding side do not enter it.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {attr: getattr(tokenizer, attr, None) for attr in _SPECIAL_ATTRS}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
