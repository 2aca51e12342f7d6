import av
import numpy as np
import torch
from PIL import Image

from .constants import MAX_FRAMES, MODAL_INDEX_MAP, NUM_FRAMES


def tokenizer_multimodal_token(prompt, tokenizer, multimodal_token="<image>", return_tensors=None):
    """Chunks around the modal tag tokenized without special tokens, joined by the tag's index."""
    index = MODAL_INDEX_MAP.get(multimodal_token)
    if index is None:
        input_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    else:
        input_ids = []
        for n, chunk in enumerate(prompt.split(multimodal_token)):
            if n:
                input_ids.append(index)
            input_ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return torch.tensor(input_ids, dtype=torch.long) if return_tensors == "pt" else input_ids


def _square(image, background):
    width, height = image.size
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def process_image(image_path, processor, aspect_ratio="pad"):
    """A one-frame stack, [1, 3, H, W] (upstream preprocesses a list of one image)."""
    image = Image.open(image_path).convert("RGB")
    if aspect_ratio == "pad":
        image = _square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess([image], return_tensors="pt")["pixel_values"]


def frame_sample(duration, num_frames):
    """Upstream's `uniform` sampling: the middle of each of `num_frames` equal segments of `duration - 1`."""
    segment = float(duration - 1) / num_frames
    return np.round(np.array([segment * (i + 0.5) for i in range(num_frames)]) + 1e-6).astype(int)


def process_video(video_path, processor, aspect_ratio="pad", num_frames=NUM_FRAMES):
    """Every frame decoded (PyAV here, decord upstream), `frame_sample`'s frames kept, black frames appended up to
    `num_frames` (sized `(*last.size, 3)`, as upstream), at most MAX_FRAMES, then squared and preprocessed."""
    with av.open(str(video_path)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    images = [frames[i] for i in frame_sample(len(frames), num_frames)]
    while len(images) < num_frames:
        images.append(Image.fromarray(np.zeros((*images[-1].size, 3), dtype=np.uint8)))
    images = images[:MAX_FRAMES]
    if aspect_ratio == "pad":
        images = [_square(image, tuple(int(x * 255) for x in processor.image_mean)) for image in images]
    return processor.preprocess(images, return_tensors="pt")["pixel_values"]
