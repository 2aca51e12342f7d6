"""Checkpoint formats: how each is recognised in a local directory and loaded, in the `FORMATS` registry.

Upstream LLaVA formats go through the real `llava` loader (full, LoRA with `model_base`, projector-only),
VideoLLaMA2 through `videollama2.model_init`, HF formats through transformers. Nothing heavy is imported before a
checkpoint loads, so this also works in the upstream environments (transformers 4.37 / 4.40)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..registry import Registry
from .errors import ZooError

Loaded = tuple[Any, Any, Any]  # model, processor (upstream: the image processor or VideoLLaMA2's), tokenizer


@dataclass(frozen=True)
class ZooFormat:
    detect: Callable[[Path, dict[str, Any]], bool]
    """Whether a directory (with its parsed config.json) holds a checkpoint of this format."""
    load: Callable[..., Loaded]
    """`load(path, model_base, **loader_keywords)`: the checkpoint's model, processor and tokenizer."""


FORMATS: Registry[ZooFormat] = Registry("format", group="regate_plugin.zoo_formats")
"""Formats by name (an entry's `format`, what `detect_format` returns); third-party packages add theirs under the
`regate_plugin.zoo_formats` entry-point group."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ZooError(f"{path}: not valid JSON ({err})") from None


def detect_format(path: str | Path) -> str:
    """The format of a local checkpoint directory, from its files and config.json; exactly one must match."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ZooError(f"{path}: no config.json, so it is not a checkpoint directory this loader knows")
    config = read_json(config_file)
    matches = [name for name, fmt in FORMATS.items() if fmt.detect(path, config)]
    if len(matches) != 1:
        raise ZooError(
            f"{path}: cannot tell its format from config.json (model_type {config.get('model_type', '')!r}, "
            f"architectures {config.get('architectures') or []}; matches {matches}); known formats: {FORMATS.names()}"
        )
    return matches[0]


def _architectures(config: dict[str, Any], *prefixes: str) -> bool:
    return any(a.startswith(prefixes) for a in config.get("architectures") or [])


def _videollama2(config: dict[str, Any]) -> bool:
    return str(config.get("model_type", "")).startswith("videollama2")


def _hf_qwen2_vl(config: dict[str, Any]) -> bool:
    return _architectures(config, "Qwen2VL", "Qwen2_5_VL")


def _hf_llava(config: dict[str, Any]) -> bool:
    return _architectures(config, "LlavaForConditional", "LlavaNext", "LlavaOnevision")


def _upstream_llava(config: dict[str, Any]) -> bool:
    """haotian-liu/LLaVA's own layout (not the HF-native classes, not VideoLLaMA2)."""
    hf_native = _hf_llava(config) or _hf_qwen2_vl(config) or _videollama2(config)
    return not hf_native and ("mm_vision_tower" in config or str(config.get("model_type", "")).startswith("llava"))


def _lora(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _load_hf(path: Path, model_base: str | None, **kw: Any) -> Loaded:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **kw)
    return model, processor, getattr(processor, "tokenizer", None)


def _load_llava(path: Path, model_base: str | None, **kw: Any) -> Loaded:
    try:
        from llava.model.builder import load_pretrained_model
    except ImportError:
        raise ZooError(
            f"{path} is an upstream LLaVA checkpoint: load it where the `llava` package is installed "
            "(pip install llava-torch==1.2.2.post1; scripts/setup_llava_env.sh)"
        ) from None
    # Upstream picks its loading branch from the name: it must contain "llava", and "lora" for LoRA weights.
    name = path.name if "llava" in path.name.lower() else f"llava-{path.name}"
    if _lora(path) and "lora" not in name.lower():
        name += "-lora"
    kw.setdefault("device_map", "cpu")
    kw.setdefault("device", "cpu")
    tokenizer, model, image_processor, _ = load_pretrained_model(str(path), model_base, name, **kw)
    return model, image_processor, tokenizer


def _load_llava_lora(path: Path, model_base: str | None, **kw: Any) -> Loaded:
    if model_base is None:
        raise ZooError(f"{path} holds LoRA weights: pass model_base (the LLM they were trained on)")
    return _load_llava(path, model_base, **kw)


def _load_videollama2(path: Path, model_base: str | None, **kw: Any) -> Loaded:
    try:
        from videollama2 import model_init
    except ImportError:
        raise ZooError(
            f"{path} is a VideoLLaMA2 checkpoint: load it from a DAMO-NLP-SG/VideoLLaMA2 checkout "
            "(its `videollama2` package must be importable)"
        ) from None
    model, processor, tokenizer = model_init(str(path), **kw)
    return model, processor, tokenizer


FORMATS.register("hf-llava", ZooFormat(lambda path, config: _hf_llava(config), _load_hf))
FORMATS.register("hf-qwen2-vl", ZooFormat(lambda path, config: _hf_qwen2_vl(config), _load_hf))
FORMATS.register("llava", ZooFormat(lambda path, config: _upstream_llava(config) and not _lora(path), _load_llava))
FORMATS.register(
    "llava-lora", ZooFormat(lambda path, config: _upstream_llava(config) and _lora(path), _load_llava_lora)
)
FORMATS.register("videollama2", ZooFormat(lambda path, config: _videollama2(config), _load_videollama2))
