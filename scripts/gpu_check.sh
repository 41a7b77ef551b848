#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): run on a machine with one CUDA GPU, the package
# installed (.venv from `make test`; flash-attn is used by the MPT benchmark if installed), from any folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
