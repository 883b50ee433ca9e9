#!/usr/bin/env bash
# The SGLang servers of one node, for rollout.mode=disaggregated. multi_node.sbatch runs this on each
# of its last SGLANG_NODES nodes (one srun task per node); single_node.sbatch runs it on the node's
# last SGLANG_GPUS GPUs. It starts SGLANG_NUM_SERVERS servers of SGLANG_TP GPUs each and lives as
# long as they do: when one exits, the others are stopped and this script fails, so the trainer's
# requests fail with that server's URL instead of hanging.
#
# Inputs (environment):
#   SGLANG_MODEL        Hugging Face model directory (required; the config's model.hf_path)
#   SGLANG_TP           GPUs per server (--tp-size), default 1
#   SGLANG_NUM_SERVERS  servers on this node, default 1; server i uses GPUs i*TP .. i*TP+TP-1 of
#                       CUDA_VISIBLE_DEVICES (--base-gpu-id) and port SGLANG_PORT + i*SGLANG_PORT_STRIDE
#   SGLANG_PORT         first HTTP port, default 30000
#   SGLANG_PORT_STRIDE  port step between servers of a node, default 10 (SGLang may take ports right
#                       above its HTTP port for itself)
#   SGLANG_HOST         bind address, default 0.0.0.0 (the trainer nodes connect from outside)
#   SGLANG_MEM_FRACTION --mem-fraction-static; default: SGLang's own (the GPUs are the servers' alone)
#   SGLANG_SEED         --random-seed, default 0
#   SGLANG_PYTHON       interpreter with SGLang installed, default PYTHON, else python3
#   SGLANG_EXTRA_ARGS   more server flags, e.g. "--attention-backend fa3"
#   SGLANG_LAUNCHER     replaces "$SGLANG_PYTHON -m sglang.launch_server" (a stand-in server in tests)
#
# The flags match the servers the trainer launches itself in colocated mode (token ids in and out:
# --skip-tokenizer-init), except --enable-memory-saver, which dedicated servers do not need.

set -euo pipefail

say() { builtin echo "sglang-node $(hostname): $*"; }

[[ -n ${SGLANG_MODEL:-} ]] || { say "error: SGLANG_MODEL is not set (the Hugging Face model directory)" >&2; exit 2; }

tp=${SGLANG_TP:-1}
count=${SGLANG_NUM_SERVERS:-1}
port=${SGLANG_PORT:-30000}
stride=${SGLANG_PORT_STRIDE:-10}
if [[ -n ${SGLANG_LAUNCHER:-} ]]; then
    read -r -a launcher <<<"$SGLANG_LAUNCHER"
else
    launcher=("${SGLANG_PYTHON:-${PYTHON:-python3}}" -m sglang.launch_server)
fi
read -r -a extra <<<"${SGLANG_EXTRA_ARGS:-}"

# Pre-temperature log-probs would be wrong for the trainer (docs/sglang.md), and the trainer's
# torchrun variables must not leak into the servers' own process groups.
unset SGLANG_RETURN_ORIGINAL_LOGPROB RETURN_ORIGINAL_LOGPROB RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE \
    GROUP_RANK ROLE_RANK MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID
export PYTHONUNBUFFERED=1

pids=()
# shellcheck disable=SC2329  # invoked by the EXIT trap
stop_all() {
    local pid
    for pid in "${pids[@]}"; do
        # Each server leads its own process group (setsid), so its scheduler/worker children go too.
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
trap stop_all EXIT
trap 'exit 143' TERM INT

for ((i = 0; i < count; i++)); do
    p=$((port + i * stride))
    cmd=("${launcher[@]}" --model-path "$SGLANG_MODEL" --host "${SGLANG_HOST:-0.0.0.0}" --port "$p"
        --tp-size "$tp" --base-gpu-id "$((i * tp))" --random-seed "${SGLANG_SEED:-0}"
        --skip-tokenizer-init --trust-remote-code)
    if [[ -n ${SGLANG_MEM_FRACTION:-} ]]; then
        cmd+=(--mem-fraction-static "$SGLANG_MEM_FRACTION")
    fi
    cmd+=("${extra[@]}")
    say "server $i on port $p: ${cmd[*]}"
    setsid "${cmd[@]}" &
    pids+=("$!")
done

# Block until the first server exits; the EXIT trap then stops the others.
status=0
wait -n || status=$?   # every background job here is a server
say "a server exited (status $status); stopping the others" >&2
exit "$((status == 0 ? 1 : status))"
