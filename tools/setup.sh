#!/usr/bin/env bash
# Installs dnascale and its dependencies into the active Python (use a venv if you want isolation).
# On a CPU-only machine torch is pinned to the local CPU wheel; a GPU machine keeps the torch it has.
# DeepSpeed ships only as an sdist: build it without isolation so its build does not fetch another torch,
# and with DS_BUILD_OPS=0 so its C++/CUDA ops are JIT-built on first use instead of at install time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extras="test"
[ "${1:-}" = "--gpu" ] && extras="test,gpu"
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install --quiet torch==2.13.0
fi
$PY -m pip install --quiet "setuptools>=70.1"  # 70.1+ builds wheels without the separate wheel package
DS_BUILD_OPS=0 $PY -m pip install --quiet --no-build-isolation -e ".[${extras}]"
$PY -c "import torch, deepspeed, megatron.core, webdataset; print(f'dnascale setup ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}')" 2>/dev/null
