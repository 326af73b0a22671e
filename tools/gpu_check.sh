#!/usr/bin/env bash
# One call that checks the GPU path on a CUDA machine: environment, install from a wheel folder, kernel build,
# pytest -m gpu, the kernel bench and the MFU benchmark, each with its own time budget (under 6 minutes in all).
#   bash tools/gpu_check.sh [--wheels DIR] [--target DIR] [--out DIR] [--quick] [--skip STEP]... [--budget STEP=S]...
# Writes DIR/summary.md (printed at the end), DIR/summary.json and one log per step; exit status 1 if a step
# failed. The Python half is tools/gpu_check.py. Python: $PYTHON, else the first of python3/python with torch.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [[ -z $py ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      py=$candidate
      break
    fi
  done
fi
if [[ -z $py ]]; then
  echo "gpu_check.sh: no python with torch on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec "$py" "$here/gpu_check.py" "$@"
