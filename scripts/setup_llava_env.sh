#!/usr/bin/env bash
# The upstream-LLaVA environment (README, "Install into your training environment"): the real LLaVA from PyPI on
# its own transformers, beside ours, at the versions of constraints/llava.txt. The three `pip install` lines are
# the README's (tests/test_environments.py checks that they agree).
#   REGATE_LLAVA_VENV=path   where it lives (default: .venv-llava)
#   REGATE_TORCH=spec        torch to install when the venv has none (default: torch==2.13.0, the CPU wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${REGATE_LLAVA_VENV:-.venv-llava}"
. scripts/venv.sh
make_venv "$venv"
"${pip[@]}" install -c constraints/llava.txt transformers accelerate peft deepspeed einops pillow shortuuid sentencepiece protobuf av
"${pip[@]}" install -c constraints/llava.txt --no-deps llava-torch
"${pip[@]}" install -c constraints/llava.txt -e .
echo "setup: upstream-LLaVA env ready ($("$venv/bin/python" -c 'import transformers, llava; print("transformers", transformers.__version__)'))"
