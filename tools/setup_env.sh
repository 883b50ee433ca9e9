#!/usr/bin/env bash
# Create ./.venv (once) and install torch, pinned and FIRST so that pip never swaps it for a newer
# release, then this project with its test extras. Safe to run again: it only installs what is missing.
#   PYTHON=python3.12 TORCH_VERSION=2.11.0 bash tools/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "liteppo-mcore needs Python >= 3.10, found " + sys.version.split()[0])'
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q -e ".[test]"
