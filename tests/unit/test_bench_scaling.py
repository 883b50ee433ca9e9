"""tools/bench_scaling.py: one real point (a bench_train_step child process) and the table's arithmetic."""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_scaling  # noqa: E402


def test_one_point_runs_ours_packed_and_the_stock_baseline_on_the_same_tokens():
    args = argparse.Namespace(device="cpu", size="small", warmup=0, repeats=1)
    point = bench_scaling.run_point(args, 64, 8)
    assert point["tokens"] == 64 * 8
    for side in ("ours", "stock"):
        assert point[side]["median_s"] > 0 and point[side]["peak_bytes"] > 0
        assert point[side]["padded_tokens"] >= point["tokens"]
    assert point["stock"]["padded_tokens"] == point["tokens"]  # full sequences


def test_per_token_growth_is_relative_to_the_first_point(monkeypatch, capsys):
    def fake(args, seq_len, sequences):
        tokens = seq_len * sequences
        ours = 1e-3 * tokens * (seq_len / 128)  # grows faster than the tokens with the length
        return {"seq_len": seq_len, "sequences": sequences, "tokens": tokens,
                "ours": {"median_s": ours, "peak_bytes": 2 * tokens, "padded_tokens": tokens},
                "stock": {"median_s": 2e-3 * tokens, "peak_bytes": 4 * tokens, "padded_tokens": tokens}}

    monkeypatch.setattr(bench_scaling, "run_point", fake)
    result = bench_scaling.measure(argparse.Namespace(device="cpu", size="small", warmup=0, repeats=1))
    points = {(p["axis"], p["factor"]): p for p in result["points"]}
    assert list(points) == [("length", 1), ("length", 2), ("length", 4), ("batch", 2), ("batch", 4)]
    assert abs(points[("length", 4)]["ours"]["per_token_vs_1x"] - 4.0) < 1e-9
    assert abs(points[("batch", 4)]["ours"]["per_token_vs_1x"] - 1.0) < 1e-9
    assert all(abs(p["stock"]["per_token_vs_1x"] - 1.0) < 1e-9 for p in points.values())
    assert abs(points[("batch", 2)]["ours_vs_stock_time"] - 0.5) < 1e-9
    assert abs(points[("length", 1)]["ours_vs_stock_memory"] - 0.5) < 1e-9
    bench_scaling.print_table(result)
    assert "length x4" in capsys.readouterr().out
