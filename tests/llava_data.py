"""Generated training data in the LLaVA conversation format, and a tiny reference LLM saved with its tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .tokenizers_fixture import WORDS

# Role names inside a message would break upstream's round split (a "tokenization mismatch" masks the sample).
PHRASE_WORDS = [w for w in WORDS if w not in ("USER", "ASSISTANT")]


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(PHRASE_WORDS) for _ in range(n))


def conversation_samples(n: int, seed: int = 0, modality: str = "image", long_every: int = 0) -> list[dict]:
    """Multi-turn samples: the placeholder sometimes mid-text, some text-only, some opening with a gpt turn."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        turns = []
        rounds = 1 + i % 3
        for r in range(rounds):
            question = _phrase(rng, rng.randint(2, 8)) + "?"
            if r == 0 and i % 5 != 4:
                question = f"<{modality}>\n{question}" if i % 2 == 0 else f"{question} <{modality}>"
            words = rng.randint(1, 12) * (8 if long_every and i % long_every == 0 else 1)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": _phrase(rng, words) + "."}]
        if i % 7 == 6:
            turns.insert(0, {"from": "gpt", "value": "hello"})
        sample = {"id": f"s{i:04d}", "conversations": turns}
        if i % 5 != 4:
            sample[modality] = f"{i:04d}.{'jpg' if modality == 'image' else 'mp4'}"
        samples.append(sample)
    return samples


def caption_samples(n: int, seed: int = 0) -> list[dict]:
    """Projector-pretraining samples (template `plain`)."""
    rng = random.Random(seed)
    return [
        {
            "id": f"c{i:04d}",
            "image": f"{i:04d}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\n" + _phrase(rng, 3)},
                {"from": "gpt", "value": _phrase(rng, rng.randint(2, 10))},
            ],
        }
        for i in range(n)
    ]


def write_json(path: Path, samples: list[dict], jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        path.write_text(json.dumps(samples, indent=1))
    return path


def write_tiny_reference(
    directory: Path, tokenizer_dir: Path, seed: int = 0, hidden: int = 32, layers: int = 2, arch: str = "llama"
) -> Path:
    """A random tiny causal LM (`arch`: llama, mistral or qwen2) saved with the tokenizer it shares with the student."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[arch]
    config_cls, model_cls = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model_cls(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_clip(directory: Path, image_size: int = 28, patch_size: int = 14, seed: int = 0) -> Path:
    """A random tiny CLIPVisionModel and its CLIPImageProcessor, loadable by LLaVA's `CLIPVisionTower`."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    CLIPVisionModel(config).save_pretrained(directory)
    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def write_videos(folder: Path, n: int, frames: int = 6, size: int = 30) -> Path:
    """`n` short mp4 files (`0000.mp4`, ...) written with PyAV, each a colour ramp."""
    import av
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with av.open(str(folder / f"{i:04d}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for f in range(frames):
                pixels = np.full((size, size, 3), (i * 37 + f * 20) % 255, dtype=np.uint8)
                pixels[:, : size // 2, 1] = (f * 40) % 255
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode())
    return folder
