"""The rollout benchmark runs end to end in its CPU small mode: every engine at every batch size, exactly
the requested new tokens per row, finite throughputs, ratios against transformers, the table last.

It runs in a subprocess (fresh process group and megatron state, CUDA hidden) under a hard time limit:
about 15 s on an idle 2-core machine.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_rollout import BASELINE, MEGATRON, OURS, SIZES  # noqa: E402

from tests.gpu.check_report import SUMMARIES  # noqa: E402

TIMEOUT_S = 180


def test_cpu_small_mode_writes_every_engine(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_rollout.py"), "--device", "cpu",
                           "--size", "small", "--repeats", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    small = SIZES["small"]
    assert (result["device"], result["dtype"], result["cuda_graphs"]) == ("cpu", "fp32", False)
    assert (result["prompt_tokens"], result["new_tokens"]) == (small["prompt_tokens"], small["new_tokens"])
    engines = [BASELINE, MEGATRON["cpu"], OURS]
    assert [(r["engine"], r["batch"]) for r in result["rows"]] == [(e, b) for b in small["batches"] for e in engines]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["new_tokens"] == row["batch"] * small["new_tokens"] and len(row["times_s"]) == 2
        for key in ("median_s", "tokens_per_s", "ratio_vs_transformers"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["engine"], key)
        if row["engine"] == BASELINE:
            assert row["ratio_vs_transformers"] == 1.0
    # the table is printed last: its final line is ours at the largest batch
    last = proc.stdout.rstrip().splitlines()[-1]
    assert last.startswith(OURS) and f" {small['batches'][-1]} " in last
    summary = SUMMARIES["bench_rollout"](result)  # tools/gpu_check.sh's summary reads this JSON
    assert summary["problems"] == [] and summary["headline"].startswith(f"fast engine b{small['batches'][0]}: ")


def test_gpu_code_paths_run_under_the_strict_mode(tmp_path):
    """`--device cuda` on a CPU machine under LITEPPO_STRICT_DEVICE=1: every engine placed as on a GPU (no
    CUDA graphs: there is no GPU to capture on), host/device mixes fail as CUDA would; CPU times."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2", LITEPPO_STRICT_DEVICE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_rollout.py"), "--device", "cuda",
                           "--size", "small", "--dtype", "fp32", "--batches", "4", "--warmup", "0", "--repeats", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert (result["device"], result["strict_device"], result["cuda_graphs"]) == ("cuda:0", True, False)
    assert [r["engine"] for r in result["rows"]] == [BASELINE, MEGATRON["cpu"], OURS]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["new_tokens"] == 4 * SIZES["small"]["new_tokens"]
