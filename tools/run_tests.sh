#!/usr/bin/env bash
# README command B: set up, then run the whole test suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec python -m pytest -q "$@"
