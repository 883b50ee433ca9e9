#!/usr/bin/env bash
# Create ./.venv (once) and install torch, pinned and FIRST so that pip never swaps it for a newer
# release, then this project with its test extras. Safe to run again: it only installs what is missing.
#   PYTHON=python3.12 TORCH_VERSION=2.11.0 bash tools/setup_env.sh
#   bash tools/setup_env.sh --print-torch-install   # the torch install command it would run, and why
#
# Which torch build: on a machine with an NVIDIA GPU (nvidia-smi lists one) the default index's, which
# is the CUDA build on Linux. Without one, the CPU build from PyTorch's CPU wheel index
# (TORCH_CPU_INDEX) when it answers, so that no CUDA libraries (several GB) are downloaded; when it
# does not answer, the default index, said so. Either way the installed build is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

index_answers() {
    "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)
EOF
}

# The pip arguments for torch, in TORCH_ARGS, and a line saying why, in TORCH_WHY.
choose_torch() {
    TORCH_ARGS=("torch==${TORCH_VERSION}")
    if has_gpu; then
        TORCH_WHY="a GPU is present: torch ${TORCH_VERSION} from the default index (the CUDA build)"
    elif index_answers "$TORCH_CPU_INDEX"; then
        # The CPU index's torch is `X+cpu`, which sorts above the default index's `X` for `torch==X`.
        TORCH_ARGS+=(--extra-index-url "$TORCH_CPU_INDEX")
        TORCH_WHY="no GPU: the CPU build of torch ${TORCH_VERSION} from ${TORCH_CPU_INDEX}"
    else
        TORCH_WHY="no GPU, and ${TORCH_CPU_INDEX} does not answer: torch ${TORCH_VERSION} from the default index"
        TORCH_WHY+=" (on Linux that may be the CUDA build with its NVIDIA packages; set TORCH_CPU_INDEX to a"
        TORCH_WHY+=" reachable CPU index)"
    fi
}

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "liteppo-mcore needs Python >= 3.10, found " + sys.version.split()[0])'
choose_torch
if [[ ${1:-} == --print-torch-install ]]; then
    echo "$TORCH_WHY"
    printf 'pip install'
    printf ' %q' "${TORCH_ARGS[@]}"
    echo
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" 2>/dev/null; then
    echo "setup_env: $TORCH_WHY" >&2
    .venv/bin/python -m pip install -q "${TORCH_ARGS[@]}"
fi
.venv/bin/python -c "import torch; print('setup_env: torch', torch.__version__, '(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU build)')" >&2
.venv/bin/python -m pip install -q -e ".[test]"
