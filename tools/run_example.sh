#!/usr/bin/env bash
# Set up ./.venv and run the main job on the embedded default: LitePPO on the built-in max_digit task
# with a tiny GPT, 2 CPU processes under torchrun (about a minute of training on 2 cores).
# Extra arguments are config overrides, e.g. `bash tools/run_example.sh max_steps=50 output_dir=/tmp/run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --nproc_per_node 2 launch/pretrain_liteppo.py --config examples/tiny_cpu.yaml "$@"
