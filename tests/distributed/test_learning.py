"""The embedded default learns: README's main job (examples/tiny_cpu.yaml, 2 CPU processes) raises
the held-out greedy accuracy by at least 0.5 over its step-0 value, within the time budget."""

import json
import os
import time

import pytest

from tests.launch_utils import run_entry

TRAINING_BUDGET_S = 600  # the training run itself, after setup, on 2 cores


@pytest.mark.slow
def test_embedded_default_accuracy_rises_by_half(tmp_path):
    start = time.monotonic()
    proc = run_entry(["--config", "examples/tiny_cpu.yaml", f"output_dir={tmp_path}"], nproc=2,
                     timeout=TRAINING_BUDGET_S + 120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    assert evals[0][0] == 0 and evals[-1][0] == 300, evals
    rise = evals[-1][1] - evals[0][1]
    print(f"held-out accuracy {evals[0][1]:.3f} -> {evals[-1][1]:.3f} (+{rise:.3f}) in {elapsed:.0f} s: {evals}")
    assert rise >= 0.5, evals
    training_s = sum(r.get("perf/step_s", 0.0) for r in rows)
    assert training_s <= TRAINING_BUDGET_S, training_s
