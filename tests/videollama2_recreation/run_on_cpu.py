"""Run a train script as `python videollama2/train.py ...` would, on a CPU: its `__main__` asks for
flash_attention_2, which transformers refuses without flash-attn, so that request is mapped to eager here (the
shim a CPU user of the unmodified upstream script needs; the plugin's launcher takes --attn_implementation).

    python run_on_cpu.py videollama2/train.py ARGS...
"""

import runpy
import sys

from transformers import PretrainedConfig

_attn = PretrainedConfig._attn_implementation
PretrainedConfig._attn_implementation = _attn.setter(
    lambda self, value: _attn.fset(self, "eager" if value == "flash_attention_2" else value)
)
sys.argv = sys.argv[1:]
sys.path.insert(0, ".")
runpy.run_path(sys.argv[0], run_name="__main__")
