"""Save a tiny random LLaVA-1.5 checkpoint as upstream LLaVA's fine-tuning writes it (upstream env): a
LlavaLlamaForCausalLM whose config names a local CLIP tower, with an mlp2x_gelu projector and a sentencepiece
tokenizer. Its directory name must contain "llava" for `load_pretrained_model`.

    python make_checkpoint.py TOKENIZER_DIR WORK_DIR OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.llava_data import write_tiny_clip, write_tiny_reference  # noqa: E402

if __name__ == "__main__":
    import torch
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import AutoConfig, AutoTokenizer

    tokenizer_dir, work, out = map(Path, sys.argv[1:4])
    base = write_tiny_reference(work / "base", tokenizer_dir)
    clip = write_tiny_clip(work / "clip")
    config = LlavaConfig.from_pretrained(base)
    config.update(
        {
            "mm_vision_tower": str(clip),
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_projector_type": "mlp2x_gelu",
            "mm_hidden_size": AutoConfig.from_pretrained(clip).hidden_size,
            "image_aspect_ratio": "pad",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "mm_patch_merge_type": "flat",
        }
    )
    torch.manual_seed(2)
    model = LlavaLlamaForCausalLM.from_pretrained(base, config=config)
    with torch.no_grad():  # large random weights, so that greedy outputs depend on the image and the question
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base, use_fast=False).save_pretrained(out)
