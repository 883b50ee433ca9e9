#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (CPU; GPU and SGLang tests skip cleanly without them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Strict virtual-device mode (liteppo_mcore/parallel/strict_device.py): host/device mixes fail as on a GPU.
export LITEPPO_STRICT_DEVICE=${LITEPPO_STRICT_DEVICE:-1}
exec .venv/bin/python -m pytest -q --timeout 900 "$@"
