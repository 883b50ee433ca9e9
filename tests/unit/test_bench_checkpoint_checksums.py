"""The checksum benchmark runs end to end: every step has a positive time, the ratios are computed
from them, the size is what was asked, and the table is printed last."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_benchmark_reports_times_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_checkpoint_checksums.py"), "--mb", "8",
                           "--files", "2", "--repeats", "1", "--dir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    s = result["seconds"]
    assert all(v > 0 for v in s.values())
    assert abs(result["ratios"]["verify/write"] - s["verify"] / s["write"]) < 1e-12
    assert 8 << 20 <= result["bytes"] < 9 << 20 and result["files"] == 2
    assert proc.stdout.strip().splitlines()[-1].startswith("hashing:")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bench-ckpt-")]  # cleaned up
