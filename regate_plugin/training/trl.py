"""TRL's `SFTTrainer` under token elision: which of its options the elided forward can serve.

TRL patches a fused LM head into the model and computes its loss, token accuracy and entropy from that head's
per-token outputs; the elided forward returns those fields over the kept targets (`adapters/common.py`), so the loss,
`loss_type="dft"`, `mean_token_accuracy` and `entropy` work (the metrics then describe the kept targets). The
options below cannot, and are refused before any step.
"""

from __future__ import annotations

import sys
from typing import Any

from ..core.config import ConfigError

_TOKENIZE_WITH_THE_TEMPLATE = (
    "under token elision the labels must be the ones `regate precompute` keyed: tokenize with the plugin template "
    "(regate_plugin.data.LlavaHFDataset, whose labels supervise the answers only) and pass "
    "dataset_kwargs={'skip_prepare_dataset': True}"
)


def unsupported_trl_options(trainer: Any) -> list[str]:
    """The options of a TRL `SFTTrainer` that token elision cannot serve, each with why; empty for other trainers."""
    trl = sys.modules.get("trl")
    if trl is None or not isinstance(trainer, trl.SFTTrainer):
        return []
    args, problems = trainer.args, []
    if args.packing or getattr(trainer, "padding_free", False):
        problems.append(
            "packing / padding_free: a packed row holds several samples, which the reference cache keys one by one; "
            "set packing=False and padding_free=False"
        )
    if trainer.compute_loss_func is not None or args.label_smoothing_factor > 0:
        problems.append(
            "compute_loss_func / label_smoothing_factor: TRL computes these losses from the full logits of an "
            "unelided forward; drop them"
        )
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append(
            "the MoE router aux loss (router_aux_loss_coef): the elided forward returns no router logits; set "
            "router_aux_loss_coef=0"
        )
    if getattr(trainer, "completion_only_loss", False) or args.assistant_only_loss:
        problems.append(
            f"completion_only_loss / assistant_only_loss: TRL builds these masks as it tokenizes; "
            f"{_TOKENIZE_WITH_THE_TEMPLATE}"
        )
    return problems


def check_trl_options(trainer: Any) -> None:
    """Raise `ConfigError` naming each `SFTTrainer` option token elision cannot serve."""
    problems = unsupported_trl_options(trainer)
    if problems:
        raise ConfigError(f"{type(trainer).__name__} with --token_elision: " + "; ".join(problems))
