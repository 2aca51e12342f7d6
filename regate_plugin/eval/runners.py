"""Model runners: frames plus a `Prompt` in, greedy text out.

`HFVideoRunner` serves the HF-native LLaVA family through its processor's chat template: video models
(`LlavaNextVideoForConditionalGeneration`, `LlavaOnevisionForConditionalGeneration`, Qwen2-VL) get the frames as
one video, image-only models (`LlavaForConditionalGeneration`) get them as images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .mvbench import Prompt


class HFVideoRunner:
    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        self.video = "video" in getattr(processor, "valid_modalities", ()) or hasattr(processor, "video_processor")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> HFVideoRunner:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        local = Path(path).is_dir()
        processor = AutoProcessor.from_pretrained(path, local_files_only=local)
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=local, dtype=dtype).to(device)
        return cls(model, processor)

    def _messages(self, n_frames: int, prompt: Prompt) -> list[dict[str, Any]]:
        visual = [{"type": "video"}] if self.video else [{"type": "image"}] * n_frames
        messages = [{"role": "user", "content": [*visual, {"type": "text", "text": prompt.user}]}]
        if prompt.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        return messages

    @torch.no_grad()
    def generate(self, frames: list[Image.Image], prompt: Prompt) -> str:
        text = self.processor.apply_chat_template(self._messages(len(frames), prompt), add_generation_prompt=True)
        text += prompt.prefill
        visual = {"videos": [frames]} if self.video else {"images": frames}
        inputs = self.processor(text=text, return_tensors="pt", **visual).to(self.model.device)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        out = self.model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=prompt.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in prompt.stop:
            completion = completion.split(stop)[0]
        return completion
