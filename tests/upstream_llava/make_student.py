"""Save a tiny LLaVA student's parts with this env's transformers (upstream env): the base LLM (a random tiny
Llama with the given tokenizer), a random tiny CLIP tower with its image processor, and a pretrained-projector
file as LLaVA's stage 1 writes it (`mm_projector.bin`, for --pretrain_mm_mlp_adapter).

    python make_student.py TOKENIZER_DIR BASE_OUT CLIP_OUT PROJECTOR_OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.llava_data import write_tiny_clip, write_tiny_reference  # noqa: E402

if __name__ == "__main__":
    import torch
    from transformers import AutoConfig

    write_tiny_reference(Path(sys.argv[2]), Path(sys.argv[1]))
    write_tiny_clip(Path(sys.argv[3]))
    tower, llm = (
        AutoConfig.from_pretrained(sys.argv[3]).hidden_size,
        AutoConfig.from_pretrained(sys.argv[2]).hidden_size,
    )
    torch.manual_seed(1)
    mlp2x_gelu = torch.nn.Sequential(torch.nn.Linear(tower, llm), torch.nn.GELU(), torch.nn.Linear(llm, llm))
    torch.save({f"model.mm_projector.{k}": v for k, v in mlp2x_gelu.state_dict().items()}, sys.argv[4])
