#!/usr/bin/env bash
# The torchrun command line of a liteppo job, computed from SLURM's variables.
#
# single_node.sbatch and multi_node.sbatch source this file for its functions, and every node of a
# job runs it as a program (through srun) to start its torchrun agent:
#
#   bash launch/slurm/torchrun_cmd.sh [--print] [--] [key.path=value ...]
#
# --print writes the command line (shell-quoted, one line) to stdout instead of running it. Because
# everything comes from environment variables, the command can be computed and run without SLURM:
# set SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_JOB_ID (and CONFIG, GPUS_PER_NODE) by hand.
#
# The command (torchrun is `python -m torch.distributed.run`, so the chosen interpreter's torch runs):
#
#   $PYTHON -m torch.distributed.run --nnodes $NNODES --nproc_per_node $GPUS_PER_NODE
#       --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT --rdzv_id $RDZV_ID
#       --rdzv_conf join_timeout=$RDZV_JOIN_TIMEOUT --max_restarts 0 --shutdown-timeout $SHUTDOWN_TIMEOUT
#       launch/pretrain_liteppo.py --config $CONFIG [$EXTRA_OVERRIDES] [parallel.timeout_minutes=...] [args]
#
# Rendezvous rule (every node must compute the same endpoint, so only job-wide facts are used):
#   MASTER_ADDR, first match wins:
#     1. MASTER_ADDR already in the environment (the batch scripts export theirs to every srun task;
#        set it yourself to pin an address, e.g. that of a fast interface);
#     2. the first host of LITEPPO_TRAIN_NODELIST (the training nodes when some nodes run SGLang),
#        else of SLURM_JOB_NODELIST (else SLURM_NODELIST), expanded with `scontrol show hostnames`,
#        or, where scontrol is missing or fails, by the built-in parser below (prefix[01-03,7],other);
#     3. SLURM_LAUNCH_NODE_IPADDR (the node srun was started from);
#     4. `hostname` (only right for one node).
#   MASTER_PORT: MASTER_PORT if set, else 10000 + SLURM_JOB_ID % 20000, else 29500. Deriving it from
#     the job id keeps two jobs sharing a node apart, and 10000-29999 stays below Linux's ephemeral
#     range (32768+) where outgoing connections pick their ports.
#   RDZV_ID: RDZV_ID if set, else SLURM_JOB_ID, else "liteppo".
#   NNODES: LITEPPO_NNODES (set by the batch scripts), else SLURM_NNODES, else 1. Node ranks are not
#     passed: the c10d rendezvous numbers the agents as they join.
#
# Other inputs: CONFIG (required; relative paths are from the repository root), GPUS_PER_NODE
# (processes per node; default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1),
# PYTHON or VENV, EXTRA_OVERRIDES (space-separated key=value words), TIMEOUT_MINUTES (sets
# parallel.timeout_minutes), RDZV_JOIN_TIMEOUT (seconds the agents wait for each other; default 900,
# generous because nodes of a large job start their containers at different speeds), SHUTDOWN_TIMEOUT
# (seconds torchrun gives its workers between forwarding a SIGTERM and killing them; default 110:
# the trainer saves at the next safe point, which must fit in it, and it must end before the job
# does: keep it below the lead of the batch scripts' `#SBATCH --signal=B:TERM@120`), LITEPPO_ROOT.

# ---------------------------------------------------------------------------------------------------
# Messages. Setup errors exit with 2, the status of an invalid configuration.

liteppo_log() { echo "liteppo-slurm: $*" >&2; }

liteppo_die() {
    echo "liteppo-slurm: error: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------------
# Node lists.

# Split a SLURM host list on the commas that are outside brackets: "a[1-2,4],b" -> "a[1-2,4]" "b".
_liteppo_split_hostlist() {
    local s=$1 out="" depth=0 ch i
    for ((i = 0; i < ${#s}; i++)); do
        ch=${s:i:1}
        case $ch in
            "[") depth=$((depth + 1)); out+=$ch ;;
            "]") depth=$((depth - 1)); out+=$ch ;;
            ",")
                if ((depth == 0)); then
                    printf '%s\n' "$out"
                    out=""
                else
                    out+=$ch
                fi
                ;;
            *) out+=$ch ;;
        esac
    done
    if [[ -n $out ]]; then printf '%s\n' "$out"; fi
}

# Expand one entry: "gpu[007-009,12]-ib" -> gpu007-ib gpu008-ib gpu009-ib gpu12-ib (zero padding as
# written; several bracket groups expand as their product, as scontrol does).
_liteppo_expand_entry() {
    local entry=$1
    if [[ $entry != *"["* ]]; then
        printf '%s\n' "$entry"
        return 0
    fi
    local prefix=${entry%%\[*} rest=${entry#*\[}
    local inner=${rest%%\]*} suffix=${rest#*\]}
    local -a parts
    local part lo hi n
    IFS=, read -r -a parts <<<"$inner"
    for part in "${parts[@]}"; do
        lo=${part%%-*}
        hi=${part#*-}
        [[ $lo =~ ^[0-9]+$ && $hi =~ ^[0-9]+$ ]] ||
            liteppo_die "cannot parse the host list entry '$entry' (install scontrol, or set MASTER_ADDR)"
        for ((n = 10#$lo; n <= 10#$hi; n++)); do
            _liteppo_expand_entry "$(printf '%s%0*d%s' "$prefix" "${#lo}" "$n" "$suffix")"
        done
    done
}

# One host per line, in allocation order: scontrol's answer when it gives one (it needs the cluster's
# configuration, so a bare client can fail), else the built-in parser's.
liteppo_expand_nodelist() {
    local list=$1 entry out
    if command -v scontrol >/dev/null 2>&1 && out=$(scontrol show hostnames "$list" 2>/dev/null) && [[ -n $out ]]; then
        printf '%s\n' "$out"
        return 0
    fi
    while IFS= read -r entry; do
        _liteppo_expand_entry "$entry"
    done < <(_liteppo_split_hostlist "$list")
}

# (Read whole, not through `head -n1`: with pipefail, head closing the pipe early would fail the caller.)
liteppo_first_host() {
    local -a hosts
    mapfile -t hosts < <(liteppo_expand_nodelist "$1")
    printf '%s\n' "${hosts[0]:-}"
}

# ---------------------------------------------------------------------------------------------------
# Resolution of every input (idempotent: what is already set stays, so srun tasks agree with the
# batch script that exported the values).

# The repository root: LITEPPO_ROOT, else where this file lives, else the submit directory.
liteppo_resolve_root() {
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." 2>/dev/null && pwd) || here=""
    local candidate
    for candidate in "${LITEPPO_ROOT:-}" "$here" "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
        if [[ -n $candidate && -f $candidate/launch/pretrain_liteppo.py ]]; then
            LITEPPO_ROOT=$(cd "$candidate" && pwd)
            export LITEPPO_ROOT
            return 0
        fi
    done
    liteppo_die "cannot find the repository (launch/pretrain_liteppo.py): submit from the repository root" \
        "or set LITEPPO_ROOT=/path/to/liteppo-mcore (sbatch --export=ALL,LITEPPO_ROOT=...)"
}

liteppo_resolve_config() {
    [[ -n ${CONFIG:-} ]] || liteppo_die "CONFIG is not set: set CONFIG=examples/liteppo.yaml (or your YAML file)"
    local path=$CONFIG
    [[ $path == /* ]] || path=$LITEPPO_ROOT/$path
    [[ -f $path ]] || liteppo_die "CONFIG=$CONFIG: no such file (relative paths are from $LITEPPO_ROOT)"
    export CONFIG
}

# PYTHON, else VENV/bin/python, else the repository's .venv (not inside a container, whose Python
# is its own), else python3 from PATH.
liteppo_resolve_python() {
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -n ${VENV:-} ]]; then
            PYTHON=$VENV/bin/python
        elif [[ -z ${CONTAINER_IMAGE:-} && -x $LITEPPO_ROOT/.venv/bin/python ]]; then
            PYTHON=$LITEPPO_ROOT/.venv/bin/python
        else
            PYTHON=python3
        fi
    fi
    command -v "$PYTHON" >/dev/null 2>&1 ||
        liteppo_die "PYTHON=$PYTHON is not an executable on $(hostname): set PYTHON=/path/to/python or VENV=/path/to/venv"
    export PYTHON
}

liteppo_resolve_gpus_per_node() {
    if [[ -z ${GPUS_PER_NODE:-} ]]; then
        if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
            GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
        elif command -v nvidia-smi >/dev/null 2>&1 && [[ $(nvidia-smi -L 2>/dev/null | grep -c '^GPU') -gt 0 ]]; then
            GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
        else
            # No GPU: one process per node unless told otherwise (GPUS_PER_NODE is then a process count).
            GPUS_PER_NODE=1
        fi
    fi
    [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || liteppo_die "GPUS_PER_NODE=$GPUS_PER_NODE must be a positive integer"
    export GPUS_PER_NODE
}

liteppo_resolve_rendezvous() {
    LITEPPO_NNODES=${LITEPPO_NNODES:-${SLURM_NNODES:-1}}
    [[ $LITEPPO_NNODES =~ ^[1-9][0-9]*$ ]] || liteppo_die "the node count ($LITEPPO_NNODES) must be a positive integer"
    export LITEPPO_NNODES

    local list_var=""
    if [[ -n ${LITEPPO_TRAIN_NODELIST:-} ]]; then
        list_var=LITEPPO_TRAIN_NODELIST
    elif [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
        list_var=SLURM_JOB_NODELIST
    elif [[ -n ${SLURM_NODELIST:-} ]]; then
        list_var=SLURM_NODELIST
    fi
    if [[ -n ${MASTER_ADDR:-} ]]; then
        LITEPPO_MASTER_ADDR_FROM=${LITEPPO_MASTER_ADDR_FROM:-"MASTER_ADDR from the environment"}
    elif [[ -n $list_var ]]; then
        MASTER_ADDR=$(liteppo_first_host "${!list_var}")
        [[ -n $MASTER_ADDR ]] || liteppo_die "$list_var=${!list_var} names no host"
        LITEPPO_MASTER_ADDR_FROM="first host of $list_var=${!list_var}"
    elif [[ -n ${SLURM_LAUNCH_NODE_IPADDR:-} ]]; then
        MASTER_ADDR=$SLURM_LAUNCH_NODE_IPADDR
        LITEPPO_MASTER_ADDR_FROM="SLURM_LAUNCH_NODE_IPADDR"
    else
        MASTER_ADDR=$(hostname)
        LITEPPO_MASTER_ADDR_FROM="hostname of this machine (no SLURM node list)"
    fi

    if [[ -n ${MASTER_PORT:-} ]]; then
        LITEPPO_MASTER_PORT_FROM=${LITEPPO_MASTER_PORT_FROM:-"MASTER_PORT from the environment"}
    elif [[ ${SLURM_JOB_ID:-} =~ ^[0-9]+$ ]]; then
        MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
        LITEPPO_MASTER_PORT_FROM="10000 + SLURM_JOB_ID($SLURM_JOB_ID) % 20000"
    else
        MASTER_PORT=29500
        LITEPPO_MASTER_PORT_FROM="torch's default (no SLURM_JOB_ID)"
    fi
    RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-liteppo}}
    export MASTER_ADDR MASTER_PORT RDZV_ID LITEPPO_MASTER_ADDR_FROM LITEPPO_MASTER_PORT_FROM
}

# Everything a node needs before it can build the command. Safe to call more than once.
liteppo_resolve_all() {
    liteppo_resolve_root
    liteppo_resolve_config
    liteppo_resolve_python
    liteppo_resolve_gpus_per_node
    liteppo_resolve_rendezvous
}

# ---------------------------------------------------------------------------------------------------
# The configuration overrides: EXTRA_OVERRIDES, then TIMEOUT_MINUTES, then the arguments (later
# overrides win, so what is given on the command line beats the environment). Result: LITEPPO_ARGS.
liteppo_overrides() {
    LITEPPO_ARGS=()
    if [[ -n ${EXTRA_OVERRIDES:-} ]]; then
        local -a extra
        read -r -a extra <<<"$EXTRA_OVERRIDES"
        LITEPPO_ARGS+=("${extra[@]}")
    fi
    if [[ -n ${TIMEOUT_MINUTES:-} ]]; then
        LITEPPO_ARGS+=("parallel.timeout_minutes=$TIMEOUT_MINUTES")
    fi
    LITEPPO_ARGS+=("$@")
}

# The command of one node, in the array LITEPPO_CMD (call liteppo_resolve_all first).
liteppo_build_cmd() {
    liteppo_overrides "$@"
    LITEPPO_CMD=("$PYTHON" -m torch.distributed.run
        --nnodes "$LITEPPO_NNODES"
        --nproc_per_node "$GPUS_PER_NODE"
        --rdzv_backend c10d
        --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
        --rdzv_id "$RDZV_ID"
        --rdzv_conf "join_timeout=${RDZV_JOIN_TIMEOUT:-900}"
        --max_restarts 0
        --shutdown-timeout "${SHUTDOWN_TIMEOUT:-110}"
        "$LITEPPO_ROOT/launch/pretrain_liteppo.py" --config "$CONFIG"
        "${LITEPPO_ARGS[@]}")
}

# Validate the configuration for the job's world size on the batch host, in a fraction of a second,
# before any node (or SGLang server) is started: a typo then costs nothing. Needs the project's
# Python here, so the batch scripts skip it when the job runs in a container.
liteppo_precheck() {
    local world_size=$1
    shift
    liteppo_overrides "$@"
    if ! (cd "$LITEPPO_ROOT" && env -u RANK -u LOCAL_RANK WORLD_SIZE="$world_size" \
        "$PYTHON" launch/pretrain_liteppo.py --config "$CONFIG" --print-config "${LITEPPO_ARGS[@]}" >/dev/null); then
        liteppo_die "the configuration above is invalid for WORLD_SIZE=$world_size" \
            "(nodes x GPUS_PER_NODE); nothing was launched"
    fi
}

# ---------------------------------------------------------------------------------------------------
# Disaggregated SGLang servers: wait until every URL answers /health.

_liteppo_http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -sf -o /dev/null --max-time 5 "$1"
    else
        "${PYTHON:-python3}" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" \
            >/dev/null 2>&1
    fi
}

# liteppo_wait_healthy TIMEOUT_S PID URL...: PID is the process that runs the servers; if it exits
# first, waiting stops at once with an error instead of running into the time limit.
liteppo_wait_healthy() {
    local timeout=$1 pid=$2
    shift 2
    local deadline=$((SECONDS + timeout)) url
    local -a pending=("$@") still
    while ((${#pending[@]})); do
        still=()
        for url in "${pending[@]}"; do
            _liteppo_http_ok "$url/health" || still+=("$url")
        done
        pending=("${still[@]}")
        ((${#pending[@]})) || break
        kill -0 "$pid" 2>/dev/null ||
            liteppo_die "the SGLang servers exited before answering /health (waiting for: ${pending[*]}); see their log"
        ((SECONDS < deadline)) ||
            liteppo_die "the SGLang servers did not answer /health within ${timeout}s (waiting for: ${pending[*]});" \
                "raise SGLANG_START_TIMEOUT or see their log"
        sleep "${SGLANG_POLL_S:-5}"
    done
    liteppo_log "SGLang servers healthy: $*"
}

# ---------------------------------------------------------------------------------------------------
# Run as a program: compute the command of this node and print or run it.

liteppo_torchrun_main() {
    local print=0
    while (($#)); do
        case $1 in
            --print) print=1; shift ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    liteppo_resolve_all
    liteppo_build_cmd "$@"
    if ((print)); then
        printf '%q ' "${LITEPPO_CMD[@]}" | sed 's/ $//'
        echo
        return 0
    fi
    cd "$LITEPPO_ROOT"
    liteppo_log "node ${SLURMD_NODENAME:-$(hostname)}: rendezvous $MASTER_ADDR:$MASTER_PORT" \
        "(address: $LITEPPO_MASTER_ADDR_FROM; port: $LITEPPO_MASTER_PORT_FROM), id $RDZV_ID," \
        "$LITEPPO_NNODES node(s) x $GPUS_PER_NODE process(es)"
    liteppo_log "exec: $(printf '%q ' "${LITEPPO_CMD[@]}")"
    exec "${LITEPPO_CMD[@]}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    liteppo_torchrun_main "$@"
fi
