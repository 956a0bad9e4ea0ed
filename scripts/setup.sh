#!/usr/bin/env bash
# Create .venv (once) and install nanoseek into it. Needs only python3 (>= 3.11) and pip.
# On a machine without an NVIDIA GPU it installs the CPU build of torch 2.13.0 (never the multi-GB CUDA wheels);
# with `nvidia-smi` present it installs the default (CUDA) torch build.
# Usage: bash scripts/setup.sh [extra]   e.g. `bash scripts/setup.sh test` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
  have=$("$PY" -c 'import sys; print("Python", sys.version.split()[0])' 2>/dev/null || echo "not a Python that runs")
  echo "error: nanoseek needs Python >= 3.11; '$PY' is $have (name another: PYTHON=python3.12 bash $0)" >&2
  exit 1
}
if [ ! -x .venv/bin/pip ]; then  # none yet, or one a failed attempt left without pip: make it anew
  "$PY" -m venv --clear .venv || {
    echo "error: '$PY -m venv' failed; install Python's venv module (Debian/Ubuntu: apt install python3-venv)" >&2
    exit 1
  }
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch>=2.9"
  else
    # PyPI's Linux torch is the CUDA build (several GB of nvidia wheels): take the CPU build from PyTorch's own index,
    # and plain pip's choice only where that index is out of reach (a machine whose pip already has a CPU wheel)
    .venv/bin/pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 15 \
      || .venv/bin/pip install -q torch==2.13.0
  fi
fi
extra=${1:-}
if [ -n "$extra" ]; then
  .venv/bin/pip install -q -e ".[$extra]"
else
  .venv/bin/pip install -q -e .
fi
