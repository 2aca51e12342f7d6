#!/usr/bin/env bash
# The upstream-LLaVA environment (README, "Install for GPU training"): the real LLaVA from PyPI on its own transformers, beside ours.
#   REGATE_LLAVA_VENV=path   where it lives (default: .venv-llava)
#   REGATE_TORCH=spec        torch to install when the venv has none (default: torch==2.13.0, the CPU wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${REGATE_LLAVA_VENV:-.venv-llava}"
. scripts/venv.sh
make_venv "$venv"
"${pip[@]}" install transformers==4.37.2 tokenizers==0.15.2 accelerate==0.26.1 peft==0.7.1 \
  pillow shortuuid sentencepiece protobuf einops safetensors tqdm numpy av
# llava-torch declares torch==2.1.2 and friends; its code runs on the versions above.
"${pip[@]}" install --no-deps llava-torch==1.2.2.post1
# the `deepspeed` launcher of the README command for upstream LLaVA (tests/test_launch_llava.py starts it on two ranks)
"${pip[@]}" install deepspeed==0.19.8
"${pip[@]}" install --no-deps -e .
echo "setup: upstream-LLaVA env ready ($("$venv/bin/python" -c 'import transformers, llava; print("transformers", transformers.__version__)'))"
