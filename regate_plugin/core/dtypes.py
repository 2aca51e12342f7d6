"""The dtype names the plugin accepts on its command lines and in cache manifests."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)


def dtype_from_name(name: str, what: str = "dtype") -> torch.dtype:
    """`DTYPES[name]`, with an error that names the setting (`what`) and the allowed names."""
    if name not in DTYPES:
        raise ValueError(f"{what} {name!r} is not one of {list(DTYPE_NAMES)}")
    return DTYPES[name]
