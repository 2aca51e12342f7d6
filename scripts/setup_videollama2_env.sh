#!/usr/bin/env bash
# The VideoLLaMA2-pinned environment: the versions DAMO-NLP-SG/VideoLLaMA2 (c0bb03a) pins,
# with our CPU torch, for the VideoLLaMA2 re-creation, `gap` precompute on transformers 4.40 and the install test.
#   REGATE_VIDEOLLAMA2_VENV=path  where it lives (default: .venv-videollama2)
#   REGATE_TORCH=spec             torch to install when the venv has none (default: torch==2.13.0, the CPU wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${REGATE_VIDEOLLAMA2_VENV:-.venv-videollama2}"
. scripts/venv.sh
make_venv "$venv"
"${pip[@]}" install transformers==4.40.0 tokenizers==0.19.1 accelerate==0.26.1 peft==0.4.0 einops==0.6.1 \
  numpy==1.24.4 pillow sentencepiece protobuf safetensors tqdm av
"${pip[@]}" install --no-deps -e .
echo "setup: VideoLLaMA2-pinned env ready ($("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)'))"
