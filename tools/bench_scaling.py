"""Benchmark: how one actor update's time and peak memory grow with sequence length and with batch size,
ours (packed, the trainer's default) against stock megatron-core, on the same real tokens.

Each point runs `tools/bench_train_step.py` in a child process of its own (its peak memory is its own)
with the case "ours, packed, <= 4 x seq tokens/mb" and its baseline "megatron local+SDPA, CE, mb 4":
1x, 2x and 4x the sequence length (prompts and responses both scale) at the base batch, then 1x, 2x and
4x the batch at the base length. "per token vs 1x" is the step time per real token divided by that of
the 1x point: 1.00 is linear growth; above it, the share of attention (quadratic in the length) or of
something else that grows faster than the tokens. Peak memory: the child's peak resident set beyond the
start of the case on CPU, `max_memory_allocated` on CUDA.

    python tools/bench_scaling.py --device cpu --size small --out bench_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.utils.bench import emit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OURS = "ours, packed, <= 4 x seq tokens/mb"
STOCK = "megatron local+SDPA, CE, mb 4"
FACTORS = (1, 2, 4)
BASE = {"small": (128, 8), "full": (4096, 16)}  # seq_len, sequences
GIB = float(1 << 30)


def run_point(args, seq_len: int, sequences: int) -> dict:
    """One bench_train_step run (child process): our packed case and its baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "point.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_train_step.py"), "--device", args.device, "--size",
               args.size, "--seq-len", str(seq_len), "--sequences", str(sequences), "--micro-batches", "4",
               "--no-offload-row", "--out", out]
        if args.warmup is not None:
            cmd += ["--warmup", str(args.warmup)]
        if args.repeats is not None:
            cmd += ["--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_scaling: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        with open(out, encoding="utf-8") as f:
            result = json.load(f)
    rows = {r["case"]: r for r in result["rows"]}
    point = {"seq_len": seq_len, "sequences": sequences, "tokens": result["tokens_per_step"]}
    for side, name in (("ours", OURS), ("stock", STOCK)):
        r = rows[name]
        point[side] = {"median_s": r["median_s"], "peak_bytes": r["peak_bytes"], "padded_tokens": r["padded_tokens"]}
    return point


def measure(args) -> dict:
    seq, n = BASE[args.size]
    points = []
    for axis in ("length", "batch"):
        for f in FACTORS:
            if axis == "batch" and f == 1:
                continue  # the same point as length 1x
            point = run_point(args, seq * f if axis == "length" else seq, n * f if axis == "batch" else n)
            point.update(axis=axis, factor=f)
            points.append(point)
            print(f"  {axis} x{f}: ours {point['ours']['median_s']:.3f} s, stock {point['stock']['median_s']:.3f} s",
                  flush=True)
    base = points[0]
    for p in points:
        for side in ("ours", "stock"):
            per_token = p[side]["median_s"] / p["tokens"]
            p[side]["per_token_vs_1x"] = per_token / (base[side]["median_s"] / base["tokens"])
        p["ours_vs_stock_time"] = p["ours"]["median_s"] / p["stock"]["median_s"]
        peaks = (p["ours"]["peak_bytes"], p["stock"]["peak_bytes"])
        p["ours_vs_stock_memory"] = peaks[0] / peaks[1] if all(peaks) else None
    return {"device": args.device, "size": args.size, "base_seq_len": seq, "base_sequences": n,
            "ours": OURS, "stock": STOCK, "points": points}


def print_table(result: dict) -> None:
    print(f"\none actor update vs size | {result['device']} {result['size']} | base: "
          f"{result['base_sequences']} x {result['base_seq_len']} tokens | ours = {result['ours']!r}, "
          f"stock = {result['stock']!r}")
    print(f"{'point':<10} {'tokens':>7} {'ours s':>8} {'stock s':>8} {'ours/stock':>10}  "
          f"{'per token vs 1x: ours':>21} {'stock':>6}  {'peak GiB ours':>13} {'stock':>6} {'ratio':>6}")
    for p in result["points"]:
        peak = [p[s]["peak_bytes"] for s in ("ours", "stock")]
        peak_txt = " ".join(f"{b / GIB:>6.3f}" if b is not None else f"{'-':>6}" for b in peak)
        ratio = f"{p['ours_vs_stock_memory']:.2f}x" if p["ours_vs_stock_memory"] else "-"
        print(f"{p['axis'] + ' x' + str(p['factor']):<10} {p['tokens']:>7} {p['ours']['median_s']:>8.3f} "
              f"{p['stock']['median_s']:>8.3f} {p['ours_vs_stock_time']:>9.2f}x  "
              f"{p['ours']['per_token_vs_1x']:>21.2f} {p['stock']['per_token_vs_1x']:>6.2f}  "
              f"{'':>7}{peak_txt} {ratio:>6}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(BASE), default="small")
    parser.add_argument("--warmup", type=int, default=None, help="passed to bench_train_step")
    parser.add_argument("--repeats", type=int, default=None, help="passed to bench_train_step")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    emit(measure(args), args.out, print_table)


if __name__ == "__main__":
    main()
