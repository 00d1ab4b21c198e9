#!/usr/bin/env bash
# Create bench/.venv with PyTorch + NumPy for bench/pytorch_reference.py.
#
# By default torch comes from PyPI (the Linux x86_64 wheel there pulls the CUDA
# runtime packages too: a big download, harmless on CPU).  Set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU-only wheel
# where that index is reachable.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --upgrade pip >/dev/null
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$venv/bin/pip" install --index-url "$TORCH_INDEX_URL" torch
fi
"$venv/bin/pip" install torch numpy
"$venv/bin/python" -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__, "threads", torch.get_num_threads())'
