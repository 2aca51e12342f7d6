"""Save a tiny random Llama reference LLM with the given tokenizer, from this env's transformers (upstream env).

python make_reference.py TOKENIZER_DIR OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.llava_data import write_tiny_reference  # noqa: E402

if __name__ == "__main__":
    write_tiny_reference(Path(sys.argv[2]), Path(sys.argv[1]))
