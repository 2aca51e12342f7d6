#!/usr/bin/env bash
# The VideoLLaMA2-pinned environment: the versions DAMO-NLP-SG/VideoLLaMA2 (c0bb03a) pins, with our CPU torch, at
# the versions of constraints/videollama2.txt, for the VideoLLaMA2 re-creation, `gap` precompute on transformers
# 4.40 and the install test. The two `pip install` lines are the README's (tests/test_environments.py checks that
# they agree).
#   REGATE_VIDEOLLAMA2_VENV=path  where it lives (default: .venv-videollama2)
#   REGATE_TORCH=spec             torch to install when the venv has none (default: torch==2.13.0, the CPU wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${REGATE_VIDEOLLAMA2_VENV:-.venv-videollama2}"
. scripts/venv.sh
make_venv "$venv"
"${pip[@]}" install -c constraints/videollama2.txt transformers accelerate peft einops numpy pillow sentencepiece protobuf av
"${pip[@]}" install -c constraints/videollama2.txt -e .
echo "setup: VideoLLaMA2-pinned env ready ($("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)'))"
