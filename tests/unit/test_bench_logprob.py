"""tools/bench_logprob.py's table from hidden states: each version in its own child process, the same
results from both, peak memory measured per process, and the fused path's peak well below the
whole-logits one once the work runs in chunks."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS, VOCAB, HIDDEN = 2048, 8192, 32


def test_hidden_table_measures_each_version_apart(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_logprob.py"), "--device", "cpu", "--table", "hidden",
         "--dtype", "fp32", "--hidden-shape", str(TOKENS), str(VOCAB), str(HIDDEN), "--chunk-size", "128",
         "--warmup", "1", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())["from_hidden"]
    assert (result["tokens"], result["vocab"], result["hidden"]) == (TOKENS, VOCAB, HIDDEN)
    assert result["logits_bytes"] == TOKENS * VOCAB * 4
    unfused, fused = result["rows"]
    assert unfused["version"].startswith("logits") and fused["version"].startswith("fused")
    for row in (unfused, fused):
        assert row["gradient_bytes"] == (TOKENS + VOCAB) * HIDDEN * 4
        assert row["median_ms"] > 0 and row["extra_peak_bytes"] > 0
        assert row["rel_diff_vs_unfused"] < 1e-4  # the same log-probs and gradients
    # the unfused version holds the whole logits (and their gradient, in place): at least 1x of them
    assert unfused["extra_peak_bytes"] >= result["logits_bytes"]
    # the fused one holds a few 128-row chunks: far less, but the measurement sees the gradients and at
    # least one chunk's fp32 buffer (memory freed in the warm-up and taken again counts)
    assert fused["net_peak_x_logits"] < 0.5, fused
    assert fused["extra_peak_bytes"] >= fused["gradient_bytes"] + 128 * VOCAB * 4, fused
    assert "from hidden states" in proc.stdout and "fused (from hidden states)" in proc.stdout
