"""Model runners: images or a clip's frames plus a `Prompt` in, greedy text out (`ModelRunner`).

- `HFRunner` serves the HF-native LLaVA family through its processor's chat template. Video models
  (LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2-VL) get a clip as one video; image-only models
  (`LlavaForConditionalGeneration`)
  get its frames as images. Requests are batched with left padding.
- `UpstreamLlavaRunner` serves checkpoints of haotian-liu/LLaVA in its own environment (`llava-torch`), building
  the input exactly as `llava/eval/model_vqa_loader.py` does: conversation template, `<image>` token, `process_images`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..core.dtypes import dtype_from_name
from ..registry import Registry
from .base import BenchmarkError, ModelRunner, Request

if TYPE_CHECKING:
    from ..model_zoo import ZooEntry


def _cut(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


class HFRunner:
    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.video = "video" in getattr(processor, "valid_modalities", ()) or hasattr(processor, "video_processor")

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu", chat_template: str | None = None
    ) -> HFRunner:
        """The checkpoint at `path` (a directory or hub id); `chat_template` (Jinja) replaces its processor's, and
        is needed where it has none."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        local = Path(path).is_dir()
        processor = AutoProcessor.from_pretrained(path, local_files_only=local)
        if chat_template is not None:
            processor.chat_template = chat_template
        if getattr(processor, "chat_template", None) is None:
            raise BenchmarkError(
                f"--model {path}: its processor has no chat template, which the HF runner renders every prompt "
                "with: pass --chat-template FILE (a Jinja chat template, e.g. the chat_template.jinja of the model "
                "it was fine-tuned from)"
            )
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=local, dtype=dtype).to(device)
        return cls(model, processor)

    def _text(self, request: Request) -> str:
        prompt = request.prompt
        visual = [{"type": "video"}] if request.video and self.video else [{"type": "image"}] * len(request.images)
        messages: list[dict[str, Any]] = [{"role": "user", "content": [*visual, {"type": "text", "text": prompt.user}]}]
        if prompt.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True) + prompt.prefill

    @torch.no_grad()
    def generate(self, requests: Sequence[Request]) -> list[str]:
        images = [image for r in requests if not (r.video and self.video) for image in r.images]
        videos = [list(r.images) for r in requests if r.video and self.video]
        visual = {**({"images": images} if images else {}), **({"videos": videos} if videos else {})}
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            inputs = self.processor(text=[self._text(r) for r in requests], padding=True, return_tensors="pt", **visual)
        finally:
            self.tokenizer.padding_side = side
        budgets = [r.prompt.max_new_tokens for r in requests]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(
            **inputs.to(self.model.device), do_sample=False, num_beams=1, max_new_tokens=max(budgets), pad_token_id=pad
        )
        start = inputs["input_ids"].shape[1]
        return [
            _cut(self.tokenizer.decode(row[start : start + budget], skip_special_tokens=True), r.prompt.stop)
            for row, budget, r in zip(out, budgets, requests)
        ]


class UpstreamLlavaRunner:
    """A LLaVA-1.5-style checkpoint loaded by `llava.model.builder.load_pretrained_model` (its directory name must
    contain "llava", as upstream requires). One request per call, as the upstream eval scripts run.

    Upstream loads in float16, which many CPU kernels lack (`"slow_conv2d_cpu" not implemented for 'Half'` on
    torch 2.1): `dtype` (default float32 on the CPU, float16 elsewhere, as upstream) casts the loaded model (vision
    tower and projector included), and the images follow the model. The weights pass through float16 on loading,
    as upstream's loader has them (exact for float16 checkpoints, as LLaVA releases them)."""

    def __init__(
        self,
        model_path: str | Path,
        model_base: str | None = None,
        conv_mode: str = "vicuna_v1",
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        from llava.mm_utils import get_model_name_from_path
        from llava.model.builder import load_pretrained_model

        path = str(Path(model_path).expanduser())
        device_map = "auto" if device == "cuda" else device
        self.tokenizer, self.model, self.image_processor, _ = load_pretrained_model(
            path, model_base, get_model_name_from_path(path), device_map=device_map, device=device
        )
        dtype = dtype or (torch.float32 if device == "cpu" else torch.float16)
        if dtype != torch.float16:
            self.model.to(dtype)
        self.conv_mode = conv_mode

    def _input_ids(self, request: Request) -> torch.Tensor:
        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
        from llava.conversation import conv_templates
        from llava.mm_utils import tokenizer_image_token

        image_token = DEFAULT_IMAGE_TOKEN
        if getattr(self.model.config, "mm_use_im_start_end", False):
            image_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        conv = conv_templates[self.conv_mode].copy()
        if request.prompt.system is not None:
            conv.system = request.prompt.system
        conv.append_message(conv.roles[0], (image_token + "\n") * len(request.images) + request.prompt.user)
        conv.append_message(conv.roles[1], None)
        text = conv.get_prompt() + request.prompt.prefill
        return tokenizer_image_token(text, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> list[str]:
        from llava.mm_utils import process_images

        outputs = []
        for request in requests:
            images = sizes = None
            if request.images:
                images = process_images(list(request.images), self.image_processor, self.model.config)
                images = images.to(self.model.device, dtype=self.model.dtype)
                sizes = [image.size for image in request.images]
            output_ids = self.model.generate(
                self._input_ids(request).to(self.model.device),
                images=images,
                image_sizes=sizes,
                do_sample=False,
                temperature=0,
                top_p=None,
                num_beams=1,
                max_new_tokens=request.prompt.max_new_tokens,
                use_cache=True,
            )
            text = self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0]
            outputs.append(_cut(text, request.prompt.stop).strip())
        return outputs


class RunnerLoader(Protocol):
    """Loads a runner for `regate eval --runner NAME`: `model` is a local path or hub id; the keywords are the
    command's options, which a loader reads as far as it needs them (`chat_template`: the text of
    `--chat-template`, or None)."""

    def __call__(
        self, model: str, *, model_base: str | None, conv_mode: str, device: str, dtype: str, chat_template: str | None
    ) -> ModelRunner: ...


def _refuse_upstream_llava(model: str) -> None:
    """An upstream (haotian-liu/LLaVA) checkpoint given to the HF runner is an error saying to use `--runner llava`
    (its model class is not in transformers, which refused to load it without saying what to do)."""
    from ..model_zoo import ZooError, detect_format

    if not Path(model).is_dir():
        return
    try:
        found = detect_format(model)
    except ZooError:  # a format model_zoo does not know: transformers may
        return
    if found in ("llava", "llava-lora"):
        raise ZooError(
            f"--model {model} is an upstream LLaVA checkpoint (format {found!r}, from its config.json), which "
            "transformers cannot load: use --runner llava, in the upstream LLaVA environment"
        )


def _load_hf(
    model: str, *, model_base: str | None, conv_mode: str, device: str, dtype: str, chat_template: str | None
) -> HFRunner:
    _refuse_upstream_llava(model)
    return HFRunner.from_pretrained(
        model, None if dtype == "auto" else dtype_from_name(dtype, "--dtype"), device, chat_template
    )


def _load_llava(
    model: str, *, model_base: str | None, conv_mode: str, device: str, dtype: str, chat_template: str | None
) -> UpstreamLlavaRunner:
    if chat_template is not None:
        raise BenchmarkError("--chat-template is for --runner hf; --runner llava renders prompts by --conv-mode")
    return UpstreamLlavaRunner(
        model, model_base, conv_mode, device, None if dtype == "auto" else dtype_from_name(dtype, "--dtype")
    )


RUNNERS: Registry[RunnerLoader] = Registry("runner", group="regate_plugin.runners")
"""Runner loaders by name (`regate eval --runner`); third-party packages add theirs under the
`regate_plugin.runners` entry-point group."""
RUNNERS.register("hf", _load_hf)
RUNNERS.register("llava", _load_llava)


def looks_like_path(model: str) -> bool:
    """Whether `--model` can only mean a local path: it starts with "/", "." or "~", holds a separator other than
    a hub id's one "/" (two or more, or os.sep / os.altsep where they are not "/"), or its first component exists
    here (`checkpoints/llava-7b-typo` beside a `checkpoints/` folder)."""
    separators = {s for s in (os.sep, os.altsep) if s and s != "/"}
    return (
        model.startswith(("/", ".", "~"))
        or model.count("/") > 1
        or any(s in model for s in separators)
        or ("/" in model and Path(model.split("/")[0]).exists())
    )


def locate_model(model: str) -> tuple[str, ZooEntry | None]:
    """What `--model` names, decided before anything loads (`model_zoo.locate`): the path or hub id to load, and
    its model_zoo entry. A path that names no directory is refused here, naming it and the closest directory
    beside it, rather than being asked of the hub."""
    from ..model_zoo import ZooError, entries, locate

    path = Path(model).expanduser()
    if not path.is_dir() and model not in entries() and looks_like_path(model):
        if path.exists():
            raise ZooError(f"--model {model}: is a file, not a checkpoint directory")
        if not path.parent.is_dir():
            missing = next(p for p in reversed([path, *path.parents]) if not p.exists())
            raise ZooError(f"--model {model}: no such checkpoint directory ({missing} does not exist)")
        siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
        close = difflib.get_close_matches(path.name, siblings, n=1)
        hint = f"; did you mean {path.parent / close[0]}?" if close else ""
        raise ZooError(f"--model {model}: no such checkpoint directory in {path.parent}{hint}")
    return locate(model)


def load_located(
    kind: str,
    model: str,
    entry: ZooEntry | None = None,
    model_base: str | None = None,
    conv_mode: str = "vicuna_v1",
    device: str = "cpu",
    dtype: str = "auto",
    chat_template: str | None = None,
) -> ModelRunner:
    """The runner registered as `kind` (`hf`: an HF-native checkpoint; `llava`: an upstream LLaVA checkpoint, run in
    the upstream environment) on `model` and `entry` as `locate_model` gives them. `dtype` "auto": the checkpoint's
    own (hf), float32 on the CPU and float16 elsewhere (llava). `chat_template` (Jinja text, hf) replaces the
    processor's own."""
    loader = RUNNERS.get(kind)
    if entry is not None:
        model_base = model_base or entry.model_base
    return loader(
        model, model_base=model_base, conv_mode=conv_mode, device=device, dtype=dtype, chat_template=chat_template
    )


def load_runner(
    kind: str,
    model: str,
    model_base: str | None = None,
    conv_mode: str = "vicuna_v1",
    device: str = "cpu",
    dtype: str = "auto",
) -> ModelRunner:
    """`load_located` of what `model` names: a directory, a hub id, or a model_zoo entry name (resolved, and
    verified when shipped); anything else is refused before a model loads."""
    return load_located(kind, *locate_model(model), model_base, conv_mode, device, dtype)
