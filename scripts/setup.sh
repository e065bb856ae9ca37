#!/usr/bin/env bash
# Create .venv (if missing) and install edgeskin with everything the pipeline and tests need.
# torch is pinned to the build this project is tested with (on our machines it comes from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "installing torch 2.14.1 + torchvision 0.29.1 (several GB; once)"
  .venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/python -m pip install --quiet -e ".[compress,runtime,jetson,phone,bench,keras,timm,dev]"
