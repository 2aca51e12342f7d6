"""Our runners as an lmms-eval model (docs/EVAL.md), registered through lmms-eval's `lmms_eval.models`
entry-point group, so that a checkpoint can be cross-checked on lmms-eval's tasks:

    pip install -e ".[lmms-eval]"   # from a checkout of regate-plugin
    lmms-eval --model regate --model_args pretrained=DIR,batch_size=8 --tasks pope,mme

lmms-eval's stock prompts and scorers differ from the reference scripts (docs/EVAL.md), so its numbers are a
second opinion; `regate eval <benchmark>` is the reference-exact harness. Decoding is greedy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms
from PIL import Image

from .base import Prompt, Request
from .frames import VisualSource, sample_official
from .runners import load_runner

MODEL_ID = "regate"
IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")


def manifests() -> Any:
    """The `lmms_eval.models` entry point's payload."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.RegateLMM")


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


class RegateLMM(lmms):
    """A "simple" lmms-eval model: images arrive as PIL images, videos as paths (sampled to `num_frames`)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        runner: str = "hf",
        model_base: str | None = None,
        conv_mode: str = "vicuna_v1",
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int | str = 1,
        num_frames: int | str = 8,
        max_new_tokens: int | str = 128,
        **unused: Any,
    ) -> None:
        super().__init__()
        self.runner = load_runner(runner, pretrained, model_base, conv_mode, device, dtype)
        self.batch_size = int(batch_size)
        self.num_frames = int(num_frames)
        self.max_new_tokens = int(max_new_tokens)

    def request(self, context: str, gen_kwargs: dict[str, Any], visuals: Iterable[Any]) -> Request:
        images: list[Image.Image] = []
        video = False
        for visual in _flatten(visuals):
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
            elif isinstance(visual, (str, Path)):
                images += sample_official(VisualSource(Path(visual)), self.num_frames, None)
                video = True
            else:
                raise TypeError(f"regate lmms-eval model: unsupported visual of type {type(visual).__name__}")
        until = gen_kwargs.get("until") or ()
        stop = (until,) if isinstance(until, str) else tuple(until)
        prompt = Prompt(
            IMAGE_PLACEHOLDER.sub("", context).strip(),
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            stop=stop,
        )
        return Request(tuple(images), prompt, video)

    def generate_until(self, requests: list[Any]) -> list[str]:
        from tqdm.auto import tqdm

        built = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            built.append(self.request(context, dict(gen_kwargs), doc_to_visual(self.task_dict[task][split][doc_id])))
        outputs: list[str] = []
        for start in tqdm(range(0, len(built), self.batch_size), desc="regate", disable=self.rank != 0):
            outputs += self.runner.generate(built[start : start + self.batch_size])
        return outputs

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the regate lmms-eval model generates only: choose generate_until tasks")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the regate lmms-eval model does not support multi-round tasks")
