"""Save a tiny VideoLLaMA2 student's parts (upstream env): a byte-level BPE tokenizer with Mistral's chat
template (trained here, so this env's tokenizers can read it), a random tiny Mistral with it as the base LLM,
and a random tiny CLIP tower with its image processor.

    python make_student.py TOKENIZER_OUT BASE_OUT CLIP_OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.llava_data import write_tiny_clip, write_tiny_reference  # noqa: E402
from tests.tokenizers_fixture import write_bpe_chat_tokenizer  # noqa: E402

if __name__ == "__main__":
    write_bpe_chat_tokenizer(Path(sys.argv[1]), "mistral")
    write_tiny_reference(Path(sys.argv[2]), Path(sys.argv[1]), arch="mistral")
    write_tiny_clip(Path(sys.argv[3]))
