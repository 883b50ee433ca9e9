"""The embedded default learns: README's main job (examples/tiny_cpu.yaml, 2 CPU processes) raises
the held-out greedy accuracy by at least 0.5 over its step-0 value, within the time budget; and it
prints what README's quick start says, line by line."""

import json
import os
import re
import time

import pytest

from tests.launch_utils import run_entry

TRAINING_BUDGET_S = 600  # the training run itself, after setup, on 2 cores

# README.md's quick start, in order: the layout, the kernels megatron-core runs without, where the
# configuration went, the step-0 evaluation, one line per 10 steps (acc every 50), the summary.
STEP = (r"step {}/300 \| reward [01]\.\d{{3}} \| clipfrac \d\.\d{{3}} \| len \d\.\d{}\| "
        r"\d+\.\d s/step \| eta (\d+m)?\d+s")
CONSOLE = [
    r"liteppo: layout world 2 = tp 1 x pp 1 x cp 1 x dp 2 \(backend gloo\)",
    r"liteppo: Transformer Engine and apex not installed: megatron-core uses its local layers, .*",
    r"liteppo: resolved configuration in (?P<dir>\S+)/config\.yaml",
    r"eval at step 0 \| accuracy [01]\.\d{3}",
    *(STEP.format(s, r" \| acc [01]\.\d{3} " if s % 50 == 0 else " ") for s in range(10, 301, 10)),
    r"liteppo: done: 300 steps in \d+\.\d s; eval/accuracy [01]\.\d{3} \(step 0\) -> [01]\.\d{3} \(step 300\), "
    r"best [01]\.\d{3} at step \d+",
    r"liteppo: outputs in (?P=dir): metrics\.jsonl, tensorboard, samples\.jsonl, reward_accuracy\.png",
    r"liteppo: last checkpoint (?P=dir)/checkpoints/iter_0000300; export it to Hugging Face with: "
    r"python tools/convert_mcore_to_hf\.py --ckpt (?P=dir)/checkpoints/iter_0000300 --out (?P=dir)/hf",
]


@pytest.mark.slow
def test_embedded_default_accuracy_rises_by_half(tmp_path):
    start = time.monotonic()
    proc = run_entry(["--config", "examples/tiny_cpu.yaml", f"output_dir={tmp_path}"], nproc=2,
                     timeout=TRAINING_BUDGET_S + 120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(CONSOLE), proc.stdout
    run_dir = re.escape(str(tmp_path))
    for pattern, line in zip(CONSOLE, lines):
        assert _matches(pattern, line, run_dir), (pattern, line)
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr, proc.stderr[-3000:]
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    assert evals[0][0] == 0 and evals[-1][0] == 300, evals
    rise = evals[-1][1] - evals[0][1]
    print(f"held-out accuracy {evals[0][1]:.3f} -> {evals[-1][1]:.3f} (+{rise:.3f}) in {elapsed:.0f} s: {evals}")
    assert rise >= 0.5, evals
    training_s = sum(r.get("perf/step_s", 0.0) for r in rows)
    assert training_s <= TRAINING_BUDGET_S, training_s


def _matches(pattern, line, run_dir):
    return re.fullmatch(pattern.replace("(?P<dir>\\S+)", run_dir).replace("(?P=dir)", run_dir), line)


def test_the_readme_quick_start_shows_this_console():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8").read()
    start = readme.index("```text\n", readme.index("## Quick start")) + len("```text\n")
    shown = readme[start:readme.index("```\n", start)].splitlines()
    head, tail = shown[:shown.index("...")], shown[shown.index("...") + 1:]
    assert len(head) == 5 and len(tail) == 4, shown
    for pattern, line in zip(CONSOLE[:5] + CONSOLE[-4:], head + tail):
        assert _matches(pattern, line, re.escape("outputs/tiny_cpu")), (pattern, line)
