"""`regate cache stats`: the distribution of a reference cache's losses, as numbers and a histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..store import ReferenceLossCache

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def cache_stats(cache: ReferenceLossCache) -> dict[str, Any]:
    """Counts and the loss distribution (mean, std, quantiles) of a cache."""
    losses = cache.all_losses()
    manifest = cache.manifest
    stats: dict[str, Any] = {
        "reference": manifest.reference,
        "reference_mode": manifest.reference_mode,
        "visual_tokens": manifest.visual_rows,
        "samples": manifest.samples,
        "answer_tokens": manifest.tokens,
        "empty_samples": manifest.empty_samples,
        "shards": len(manifest.shards),
        "tokens_per_sample": manifest.tokens / max(manifest.samples - manifest.empty_samples, 1),
    }
    if losses.numel():
        values = losses.double()
        stats.update(mean=float(values.mean()), std=float(values.std()) if values.numel() > 1 else 0.0)
        qs = torch.quantile(values[: 1 << 24], torch.tensor(QUANTILES, dtype=torch.float64))
        stats["quantiles"] = {f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, qs)}
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"{name:<18} {value}" for name, value in stats.items() if name != "quantiles"]
    for name, value in stats.get("quantiles", {}).items():
        lines.append(f"{'loss ' + name:<18} {value:.4f}")
    return "\n".join(lines)


def plot_histogram(cache: ReferenceLossCache, path: Path, bins: int = 80) -> Path:
    """A PNG histogram of the reference losses (log count axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = cache.all_losses().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(losses, bins=bins, color="#3b6ea5")
    ax.set_yscale("log")
    ax.set_xlabel("reference loss (nats per answer token)")
    ax.set_ylabel("tokens")
    ax.set_title(f"{cache.manifest.reference} ({cache.manifest.reference_mode}), {losses.size} tokens", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
