#!/usr/bin/env bash
# Create .venv and install umtrain with its test dependencies. On a CPU machine torch==2.13.0 is installed first
# (a local CPU wheel; an unpinned torch would pull GBs of CUDA). Set UMTRAIN_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "${UMTRAIN_TORCH:-torch>=2.6}"
  else
    python -m pip install -q "${UMTRAIN_TORCH:-torch==2.13.0}"
  fi
fi
python -m pip install -q -e ".[dev]"
echo "umtrain installed in $(pwd)/.venv (activate with: . .venv/bin/activate)"
