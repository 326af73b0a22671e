#!/usr/bin/env bash
# Installs dnascale and its dependencies into the active Python (use a venv if you want isolation).
#
#   bash tools/setup.sh            the versions CI is green with: every dependency pinned by tools/constraints.txt
#   bash tools/setup.sh --gpu      the same plus the [gpu] extra (flash-attn, mamba-ssm, causal-conv1d)
#   bash tools/setup.sh --latest   the newest releases pyproject.toml allows, constraints ignored (use a scratch
#                                  venv): prints every package that drifted from the pins, then runs the test
#                                  suite; exits non-zero when the suite fails, with the report in latest-check.log
#   bash tools/setup.sh --freeze   rewrites tools/constraints.txt from the active environment (after a green CI)
#
# On a CPU-only machine torch is pinned to the local CPU wheel; a GPU machine keeps the torch it has (torch is
# deliberately absent from the constraints). DeepSpeed ships only as an sdist: build it without isolation so its
# build does not fetch another torch, and with DS_BUILD_OPS=0 so its C++/CUDA ops are JIT-built on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extras="test"
mode="pinned"
for arg in "$@"; do
  case "$arg" in
    --gpu) extras="test,gpu" ;;
    --latest) mode="latest" ;;
    --freeze) mode="freeze" ;;
    *) echo "error: tools/setup.sh: unknown option '$arg'; expected --gpu, --latest or --freeze" >&2; exit 2 ;;
  esac
done

if [ "$mode" = "freeze" ]; then
  {
    sed -n '/^#/p' tools/constraints.txt
    $PY -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-[a-z0-9-]*|triton)==' | grep -v '^#'
  } > tools/constraints.txt.new
  mv tools/constraints.txt.new tools/constraints.txt
  echo "tools/constraints.txt: $(grep -c '==' tools/constraints.txt) pins written from $($PY -c 'import sys; print(sys.executable)')"
  exit 0
fi

if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install --quiet torch==2.13.0
fi
if [ "$mode" = "pinned" ]; then
  pins=(-c tools/constraints.txt)
  $PY -m pip install --quiet "setuptools>=70.1"  # 70.1+ builds wheels without the wheel package (not in freeze)
  DS_BUILD_OPS=0 $PY -m pip install --quiet --no-build-isolation "${pins[@]}" -e ".[${extras}]"
  $PY tools/version_drift.py --check
else
  $PY -m pip install --quiet --upgrade "setuptools>=70.1"
  DS_BUILD_OPS=0 $PY -m pip install --quiet --no-build-isolation --upgrade --upgrade-strategy eager -e ".[${extras}]"
  $PY tools/version_drift.py
fi
$PY -c "import torch, deepspeed, megatron.core, webdataset, transformers; print(f'dnascale setup ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}')" 2>/dev/null

if [ "$mode" = "latest" ]; then
  # The weekly-style check: the suite against the newest releases. Its failures are the report, not a secret.
  status=0
  DNASCALE_HYPOTHESIS_PROFILE=ci $PY -m pytest -q -p no:cacheprovider 2>&1 | tee latest-check.log || status=$?
  { echo; echo "== drift from tools/constraints.txt =="; $PY tools/version_drift.py; } | tee -a latest-check.log
  if [ "$status" -ne 0 ]; then
    echo "latest-check FAILED (pytest exit $status): the newest releases break dnascale; see latest-check.log" >&2
  else
    echo "latest-check passed: the newest releases work; 'bash tools/setup.sh --freeze' records them as the pins"
  fi
  exit "$status"
fi
