# Shortcuts for the project's scripts. `make` lists the targets; `make -n TARGET` prints what one runs.
# The suite's pytest arguments go in ARGS: make test ARGS='-m "not slow"'

ARGS ?=
# The lint tools' versions are pinned in tools/lint.sh, their settings in pyproject.toml.

.DEFAULT_GOAL := help
.PHONY: help setup test lint lint-setup example

help:
	@echo "make setup              create .venv: torch first, then this package with its test extras (tools/setup_env.sh)"
	@echo "make test [ARGS=...]    run the test suite (tools/run_tests.sh); ARGS go to pytest,"
	@echo "                        e.g. make test ARGS='-m \"not slow\"' or ARGS=tests/unit/test_config.py"
	@echo "make lint               ruff check and mypy, configured in pyproject.toml (tools/lint.sh)"
	@echo "make lint-setup         install the pinned ruff and mypy into .venv (make lint does this first)"
	@echo "make example            train the embedded default on 2 CPU processes (tools/run_example.sh)"

setup:
	bash tools/setup_env.sh

test:
	bash tools/run_tests.sh $(ARGS)

lint-setup:
	bash tools/lint.sh --install-only

lint:
	bash tools/lint.sh

example:
	bash tools/run_example.sh
