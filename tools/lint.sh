#!/usr/bin/env bash
# Lint: ruff check and mypy with the settings in pyproject.toml ([tool.ruff], [tool.mypy]). The pinned
# versions are installed into .venv when it has others or none (.venv itself: tools/setup_env.sh).
#   bash tools/lint.sh                 # check; exit status 1 on any finding
#   bash tools/lint.sh --install-only  # only install the pinned ruff and mypy
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF_VERSION=0.17.6
MYPY_VERSION=2.4.1
[ -x .venv/bin/python ] || bash tools/setup_env.sh
if ! .venv/bin/ruff --version 2>/dev/null | grep -qx "ruff ${RUFF_VERSION}" ||
   ! .venv/bin/mypy --version 2>/dev/null | grep -q "^mypy ${MYPY_VERSION}\b"; then
    echo "lint: installing ruff==${RUFF_VERSION} mypy==${MYPY_VERSION} into .venv" >&2
    .venv/bin/python -m pip install -q "ruff==${RUFF_VERSION}" "mypy==${MYPY_VERSION}"
fi
[[ ${1:-} == --install-only ]] && exit 0
.venv/bin/ruff check liteppo_mcore tools launch tests examples
.venv/bin/mypy
echo "lint: ruff and mypy found nothing"
