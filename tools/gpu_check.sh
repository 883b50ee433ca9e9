#!/usr/bin/env bash
# One command for a fresh GPU machine: install the carried wheels (never the network), run tests/gpu, then
# every benchmark at full size, each step under its own time budget inside one overall budget (5 minutes
# by default), and write one JSON (gpu_check.json) with a short table printed last.
#
#   bash tools/gpu_check.sh [--wheels DIR] [--out DIR] [--quick] [--dry-run] [--only STEPS] [--budget-s N]
#   bash tools/gpu_check.sh --fetch-wheels DIR     # on a machine WITH network: download the wheels first
#
#   --wheels DIR     the wheels to install (default: $LITEPPO_WHEELS, else gpu-wheels/ in the repository):
#                    megatron-core, omegaconf, antlr4-python3-runtime (required); math-verify and
#                    latex2sympy2_extended (the trainer tests); psutil (optional). Installed with
#                    `pip install --no-index --find-links DIR --no-deps --target <tmp>`; the project itself
#                    runs from the checkout (PYTHONPATH), nothing is built.
#   --out DIR        results (default: $OUT, else ${TMPDIR:-/tmp}/liteppo-gpu-check): gpu_check.json,
#                    logs/<step>.log, each benchmark's JSON, gpu_tests.xml, reports/ (the tests' numbers)
#   --quick          a subset for a rerun (about 2 minutes): fewer test cases, one micro-batch size, one
#                    bucket size, batch 64 only
#   --dry-run        everything but CUDA work: paths, wheels, that the tests collect, that every benchmark
#                    accepts its arguments (--print-args), the JSON with each step marked "dry"
#   --only STEPS     comma-separated steps to run: tests, bench_logprob, bench_weight_sync,
#                    bench_train_step, bench_rollout (install and env always run)
#   --budget-s N     the overall time budget in seconds (default 300; 150 with --quick)
#   --python PY      the interpreter (default: $PYTHON, else python3)
#
# Exit status: 0 when every step passed (or, with --dry-run, checked), 1 otherwise, 2 on bad usage.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${LITEPPO_WHEELS:-$REPO/gpu-wheels}"
OUT_DIR="${OUT:-${TMPDIR:-/tmp}/liteppo-gpu-check}"
PY="${PYTHON:-python3}"
MODE="full"
DRY=0
ONLY=""
BUDGET=""
FETCH=""
MIN_STEP_S=20
ALL_STEPS="tests bench_logprob bench_weight_sync bench_train_step bench_rollout"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "gpu_check: $*" >&2
    exit 2
}

while (($# > 0)); do
    case "$1" in
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
        --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
        --quick) MODE="quick"; shift ;;
        --dry-run) DRY=1; shift ;;
        --only) ONLY="${2:?--only needs a list of steps}"; shift 2 ;;
        --budget-s) BUDGET="${2:?--budget-s needs seconds}"; shift 2 ;;
        --fetch-wheels) FETCH="${2:?--fetch-wheels needs a folder}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

command -v "$PY" >/dev/null 2>&1 || die "no interpreter '$PY' (--python PY)"

# ------------------------------------------------------------------------------------------------ fetch
if [[ -n "$FETCH" ]]; then
    # For the GPU machine's python 3.12 on x86-64 Linux, from a machine that reaches PyPI.
    mkdir -p "$FETCH"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$FETCH" megatron-core==0.16.1 omegaconf==2.4.0 \
        "antlr4-python3-runtime>=4.9.3,<=4.13.2" math-verify==0.9.0 latex2sympy2_extended==1.11.0 "psutil>=5.9"
    ls -l "$FETCH"
    exit 0
fi

for step in ${ONLY//,/ }; do
    [[ " $ALL_STEPS " == *" $step "* ]] || die "--only: unknown step '$step' (steps: $ALL_STEPS)"
done
if [[ -z "$BUDGET" ]]; then
    if [[ "$MODE" == "quick" ]]; then BUDGET=150; else BUDGET=300; fi
fi
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "--budget-s must be a number of seconds, got '$BUDGET'"

mkdir -p "$OUT_DIR/logs" "$OUT_DIR/reports"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"  # paths given relative to where the command runs
if [[ -d "$WHEELS" ]]; then WHEELS="$(cd "$WHEELS" && pwd)"; fi
cd "$REPO"
rm -f "$OUT_DIR/steps.jsonl" "$OUT_DIR/gpu_check.json" "$OUT_DIR/gpu_tests.xml" "$OUT_DIR"/reports/*.json
SITE="${TMPDIR:-/tmp}/liteppo-gpu-site"
if ((DRY == 1)); then  # nothing is installed: the interpreter's own packages
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
REPORT=("$PY" -m tests.gpu.check_report)
START_NS=$(date +%s%N)
DEADLINE=$(($(date +%s) + BUDGET))
NO_CUDA=""

selected() {
    [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]
}

elapsed_s() {  # seconds since $1 (nanoseconds), one decimal
    local ns=$(($(date +%s%N) - $1))
    printf '%d.%d' $((ns / 1000000000)) $(((ns / 100000000) % 10))
}

record() {  # name status rc seconds budget log result note [-- command...]
    local name="$1" status="$2" rc="$3" seconds="$4" budget="$5" log="$6" result="$7" note="$8"
    shift 8
    local extra=()
    [[ -n "$log" ]] && extra+=("--log=$log")
    [[ -n "$result" ]] && extra+=("--result=$result")
    "${REPORT[@]}" step "$OUT_DIR" --name "$name" --status "$status" --rc "$rc" --seconds "$seconds" \
        --budget "$budget" "--note=$note" "${extra[@]}" "$@"
    printf '== %-18s %-8s %6ss  %s\n' "$name" "$status" "$seconds" "$note"
}

# run_step NAME BUDGET RESULT -- COMMAND...: the command under `timeout`, its output in logs/NAME.log.
# With --dry-run the command is a check (collection, argument parsing) and a pass is marked "dry".
run_step() {
    local name="$1" budget="$2" result="$3"
    shift 4
    local log="logs/$name.log" left=$((DEADLINE - $(date +%s)))
    if [[ -n "$NO_CUDA" ]]; then
        record "$name" skipped 0 0 "$budget" "" "" "$NO_CUDA" -- "$@"
        return 0
    fi
    if ((DRY == 0 && left < MIN_STEP_S)); then
        record "$name" skipped 0 0 "$budget" "" "" "no time left (${left} s of the ${BUDGET} s budget)" -- "$@"
        return 0
    fi
    if ((DRY == 0 && budget > left)); then budget=$left; fi
    local start rc=0 status note=""
    start=$(date +%s%N)
    timeout --kill-after=10 "$budget" "$@" >"$OUT_DIR/$log" 2>&1 || rc=$?
    if ((rc == 0)); then
        status=ok
        ((DRY == 1)) && status=dry
    elif ((rc == 124 || rc == 137)); then
        status=timeout
        note="past its ${budget} s budget"
    else
        status=failed
        note="exit status $rc: $(grep -v '^\s*$' "$OUT_DIR/$log" | tail -n 1 | cut -c1-160)"
    fi
    if [[ -n "$result" && "$status" == ok && ! -s "$OUT_DIR/$result" ]]; then
        status=failed
        note="no result file $result"
    fi
    [[ "$status" == failed || "$status" == timeout ]] && tail -n 15 "$OUT_DIR/$log" | sed 's/^/   | /'
    record "$name" "$status" "$rc" "$(elapsed_s "$start")" "$budget" "$log" "$result" "$note" -- "$@"
}

# ------------------------------------------------------------------------------------------------ wheels
start=$(date +%s%N)
wheels_json="$OUT_DIR/wheels.json"
if "${REPORT[@]}" wheels "$WHEELS" >"$wheels_json"; then
    status=ok
    note="$WHEELS"
else
    status=failed
    note="missing required wheels in $WHEELS (megatron-core, omegaconf, antlr4-python3-runtime); fetch them with --fetch-wheels"
fi
packages=()
while IFS= read -r pkg; do
    [[ -n "$pkg" ]] && packages+=("$pkg")
done < <("${REPORT[@]}" wheels "$WHEELS" --names || true)
missing=$("$PY" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["missing"]))' "$wheels_json")
[[ -n "$missing" && "$status" == ok ]] && note="$WHEELS (no wheel of: $missing; the trainer tests need it unless installed)"
if ((DRY == 1)); then
    [[ "$status" == ok ]] && status=dry
    note="would install ${packages[*]:-nothing} into $SITE; $note"
    record install "$status" 0 "$(elapsed_s "$start")" 60 "" "" "$note"
elif [[ "$status" == ok ]]; then
    rm -rf "$SITE"
    rc=0
    if "$PY" -m pip --version >/dev/null 2>&1; then
        install=("$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --target "$SITE"
            --disable-pip-version-check "${packages[@]}")
    else  # no pip on this interpreter: a wheel is a zip of its files
        install=("${REPORT[@]}" unpack "$WHEELS" "$SITE" "${packages[@]}")
        note="$note (no pip: wheels unpacked)"
    fi
    "${install[@]}" >"$OUT_DIR/logs/install.log" 2>&1 || rc=$?
    if ((rc != 0)); then
        status=failed
        note="exit status $rc (logs/install.log): $(tail -n 1 "$OUT_DIR/logs/install.log" | cut -c1-160)"
    fi
    record install "$status" "$rc" "$(elapsed_s "$start")" 60 logs/install.log "" "$note" -- "${install[@]}"
else
    record install "$status" 2 "$(elapsed_s "$start")" 60 "" "" "$note"
fi

# ------------------------------------------------------------------------------------------------ env
start=$(date +%s%N)
env_json="$OUT_DIR/env.json"
rc=0
"${REPORT[@]}" env >"$env_json" 2>"$OUT_DIR/logs/env.log" || rc=$?
env_note=$("${REPORT[@]}" env-note "$env_json") || rc=$?
if ((DRY == 1)); then
    record env dry 0 "$(elapsed_s "$start")" 30 logs/env.log env.json "$env_note"
elif ((rc == 0)); then
    record env ok 0 "$(elapsed_s "$start")" 30 logs/env.log env.json "$env_note"
else
    NO_CUDA="no CUDA device (env: $env_note)"
    record env failed "$rc" "$(elapsed_s "$start")" 30 logs/env.log env.json "$NO_CUDA"
fi

# ------------------------------------------------------------------------------------------------ tests
if [[ "$MODE" == "quick" ]]; then
    # one backend, and the trainer matrix's plain and full-KL variants only
    TEST_SELECT=(-k "not (test_build_and_one_update and local) and not (test_one_step_per_engine_and_variant and (kl_loss or gae_critic))")
else
    TEST_SELECT=()
fi
if selected tests; then
    if ((DRY == 1)); then
        run_step tests 60 "" -- "$PY" -m pytest tests/gpu -q --collect-only -p no:cacheprovider "${TEST_SELECT[@]}"
    else
        run_step tests 110 gpu_tests.xml -- env LITEPPO_REQUIRE_GPU=1 LITEPPO_GPU_REPORT_DIR="$OUT_DIR/reports" \
            "$PY" -m pytest tests/gpu -q -rfEs -p no:cacheprovider --disable-warnings \
            --junitxml "$OUT_DIR/gpu_tests.xml" "${TEST_SELECT[@]}"
    fi
fi

# ------------------------------------------------------------------------------------------------ benchmarks
bench() {  # NAME BUDGET ARGS...: tools/NAME.py on the GPU at full size, its JSON in NAME.json
    local name="$1" budget="$2"
    shift 2
    selected "$name" || return 0
    local args=(--device cuda --size full "$@")
    if ((DRY == 1)); then
        run_step "$name" 60 "" -- "$PY" "tools/$name.py" "${args[@]}" --out "$OUT_DIR/$name.json" --print-args
    else
        run_step "$name" "$budget" "$name.json" -- "$PY" "tools/$name.py" "${args[@]}" --out "$OUT_DIR/$name.json"
    fi
}

if [[ "$MODE" == "quick" ]]; then
    bench bench_logprob 30 --warmup 1 --repeats 3
    bench bench_weight_sync 30 --warmup 1 --repeats 3 --buckets-mib 256
    bench bench_train_step 60 --warmup 1 --repeats 1 --micro-batches 2 --no-offload-row
    bench bench_rollout 45 --warmup 1 --repeats 1 --batches 64 --new-tokens 32 --skip-megatron
else
    bench bench_logprob 40 --warmup 2 --repeats 5
    bench bench_weight_sync 45 --warmup 1 --repeats 5
    bench bench_train_step 100 --warmup 1 --repeats 2
    bench bench_rollout 90 --warmup 1 --repeats 1 --batches 64 256 --new-tokens 64
fi

# ------------------------------------------------------------------------------------------------ summary
summary_mode="$MODE"
((DRY == 1)) && summary_mode=dry
"$PY" - "$OUT_DIR/machine.json" "$wheels_json" "$env_json" "$BUDGET" "$(elapsed_s "$START_NS")" "$MODE" <<'PYEOF'
import json
import sys

path, wheels, env, budget, wall, mode = sys.argv[1:7]


def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


json.dump({"wheels": load(wheels), "env": load(env), "budget_s": int(budget), "wall_s": float(wall),
           "selection": mode}, open(path, "w"), indent=2)
PYEOF
"${REPORT[@]}" summarize "$OUT_DIR" --mode "$summary_mode" --extra "$OUT_DIR/machine.json"
