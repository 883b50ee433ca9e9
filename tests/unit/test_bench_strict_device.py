"""The strict-mode cost benchmark runs end to end: both modes come out as asked (plain, then strict),
every step has a positive time, the ratios are computed from them, and the table is printed last."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_both_modes_run_and_the_ratio_is_reported(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_strict_device.py"), "--warmup", "0",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["plain"]["strict"] is False and result["strict"]["strict"] is True
    for key, ratio in result["ratios"].items():
        assert result["plain"][key] > 0 and result["strict"][key] > 0
        assert abs(ratio - result["strict"][key] / result["plain"][key]) < 1e-12
    assert proc.stdout.strip().splitlines()[-1].startswith("forward + backward")
