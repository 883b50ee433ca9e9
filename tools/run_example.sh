#!/usr/bin/env bash
# Set up ./.venv and run the main job on the embedded default: 2 CPU processes under torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --nproc_per_node 2 launch/pretrain_liteppo.py --config examples/liteppo.yaml --dry-run "$@"
