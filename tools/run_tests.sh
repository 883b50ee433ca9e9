#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (CPU; GPU and SGLang tests skip cleanly without them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Strict virtual-device mode (liteppo_mcore/parallel/strict_device.py): host/device mixes fail as on a GPU.
export LITEPPO_STRICT_DEVICE=${LITEPPO_STRICT_DEVICE:-1}
# tests/gpu without a GPU: a rehearsal of their code on the CPU (CUDA-only tests still skip).
export LITEPPO_GPU_TESTS_ON_CPU=${LITEPPO_GPU_TESTS_ON_CPU:-1}
exec .venv/bin/python -m pytest -q --timeout 900 "$@"
