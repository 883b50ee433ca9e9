"""The train-step benchmark runs end to end in its CPU small mode and writes every case, with finite numbers.

It runs in a subprocess (fresh process group, megatron state and CUDA hidden) under a hard time limit:
about 15 s on an idle 2-core machine, 60 s under load.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_train_step import BASELINES, OURS  # noqa: E402

TIMEOUT_S = 240


def _finite_positive(row, keys):
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row["case"], key, value)


def test_cpu_small_mode_writes_every_case(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_train_step.py"), "--device", "cpu",
                           "--size", "small", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {row["case"]: row for row in result["rows"]}
    assert list(rows) == [name for name, _ in BASELINES] + [case[0] for case in OURS]
    assert result["matmul"]["tflops"] > 0 and result["dtype"] == "fp32"
    assert "one optimizer step" in result["timed"]

    for row in rows.values():
        _finite_positive(row, ["median_s", "tokens_per_s", "tflops", "mfu", "model_flops", "tokens"])
        assert len(row["times_s"]) == result["repeats"] and row["mfu"] < 1.5
        # same real tokens on both sides; padding only adds computed tokens
        assert row["tokens"] == result["tokens_per_step"] <= row["padded_tokens"]
        assert all(math.isfinite(v) for v in row["last_step"].values() if isinstance(v, float))
    for name, _, _, versus in OURS:
        row = rows[name]
        assert row["versus"] == versus and row["kind"] == "ours"
        _finite_positive(row, ["ratio_tokens_per_s", "ratio_tflops"])
        assert row["last_step"]["grad_norm"] > 0
    for name, _ in BASELINES:
        assert rows[name]["last_step"]["applied"] is True
        assert rows[name]["padded_tokens"] == rows[name]["tokens"]
    # the table is printed last
    assert proc.stdout.rstrip().splitlines()[-1].startswith(OURS[-1][0])
