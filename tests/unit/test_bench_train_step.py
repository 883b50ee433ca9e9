"""The train-step benchmark runs end to end in its CPU small mode and writes every case, with finite numbers;
our compared cases run with the optimizer-state offload off (the baseline makes no copies), the offload is
its own row; under the strict virtual-device mode both sides build and step on the (virtual) GPU.

Each run is a subprocess (fresh process group, megatron state and CUDA hidden) under a hard time limit:
about 15 s on an idle 2-core machine, 60 s under load.
"""

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_train_step import (  # noqa: E402
    BASELINES,
    OFFLOAD,
    OURS,
    SIZES,
    add_ratios,
    config_overrides,
    merge_rounds,
    paired_ratios,
)

from tests.gpu.check_report import SUMMARIES  # noqa: E402

TIMEOUT_S = 240


def _finite_positive(row, keys):
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row["case"], key, value)


def _run(tmp_path, *args, strict=False):
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2", LITEPPO_STRICT_DEVICE="1" if strict else "0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_train_step.py"), *args,
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def test_our_compared_cases_run_with_the_offload_off():
    """The trainer's default is offload on; the cases compared with the baseline must not pay for it."""
    from liteppo_mcore.config import load_config

    args = argparse.Namespace(seq_len=128, dtype="fp32", attention_backend="sdpa", device="cpu", size="small")
    assert load_config(overrides=[], world_size=1).train.offload_between_phases is True  # the default
    shape = SIZES["small"]["shape"]
    for _, micro, bound, _, pack in OURS:
        cfg = load_config(overrides=config_overrides(args, shape, 16, micro, bound and bound * 128, pack=pack),
                          world_size=1)
        assert cfg.train.offload_between_phases is False, (micro, bound)
        assert cfg.train.pack_sequences is pack and (not pack or cfg.micro_batch_tokens == bound * 128)
    cfg = load_config(overrides=config_overrides(args, shape, 16, 4, None, offload=True), world_size=1)
    assert cfg.train.offload_between_phases is True


def test_cpu_small_mode_writes_every_case(tmp_path):
    proc, result = _run(tmp_path, "--device", "cpu", "--size", "small")
    rows = {row["case"]: row for row in result["rows"]}
    offload_name, _, offload_versus = OFFLOAD[4]
    assert list(rows) == [name for name, _ in BASELINES] + [case[0] for case in OURS] + [offload_name]
    assert result["matmul"]["tflops"] > 0 and result["dtype"] == "fp32" and result["strict_device"] is False
    assert "one optimizer step" in result["timed"]

    for row in rows.values():
        _finite_positive(row, ["median_s", "tokens_per_s", "tflops", "mfu", "model_flops", "tokens"])
        assert len(row["times_s"]) == result["repeats"] and row["mfu"] < 1.5
        # same real tokens on both sides; padding only adds computed tokens
        assert row["tokens"] == result["tokens_per_step"] <= row["padded_tokens"]
        assert all(math.isfinite(v) for v in row["last_step"].values() if isinstance(v, float))
        assert row["offload_active"] is False  # nothing to offload on a CPU
    for name, _, _, versus, pack in OURS:
        row = rows[name]
        assert row["versus"] == versus and row["kind"] == "ours"
        assert row["offload_between_phases"] is False and row["pack_sequences"] is pack
        _finite_positive(row, ["ratio_tokens_per_s", "ratio_tflops"])
        assert row["last_step"]["grad_norm"] > 0
    offload = rows[offload_name]
    assert offload["kind"] == "ours + offload" and offload["versus"] == offload_versus
    assert offload["offload_between_phases"] is True
    for name, _ in BASELINES:
        assert rows[name]["last_step"]["applied"] is True
        assert rows[name]["padded_tokens"] == rows[name]["tokens"]
        assert rows[name]["offload_between_phases"] is False
    # the table is printed last
    assert proc.stdout.rstrip().splitlines()[-1].startswith(offload_name)
    # tools/gpu_check.sh's summary reads this JSON
    assert SUMMARIES["bench_train_step"](result)["headline"].startswith("ours/stock tokens/s: mb2 ")


def test_both_sides_build_and_step_on_the_gpu_under_the_strict_mode(tmp_path):
    """`--device cuda` on a CPU machine under LITEPPO_STRICT_DEVICE=1: every tensor is placed as on a GPU
    and host/device mixes fail as CUDA would (e.g. a baseline whose norms megatron made on the CPU)."""
    _, result = _run(tmp_path, "--device", "cuda", "--size", "small", "--dtype", "fp32", "--warmup", "0",
                     "--repeats", "1", "--micro-batches", "2", "--rounds", "2", "--paired", "2", strict=True)
    assert result["strict_device"] is True and result["device"] == "cuda:0" and result["rounds"] == 2
    for row in result["rows"]:  # both rounds' steps are in every row; every compared row has a ratio per round
        assert len(row["times_s"]) == 2 and len(row["round_median_s"]) == 2, row["case"]
        assert "versus" not in row or len(row["ratio_rounds"]) == 2
        # and, from --paired, one ratio per pair of steps side by side
        assert "versus" not in row or (len(row["paired_ratios"]) == 2 and row["ratio_paired"] > 0), row["case"]
    rows = {row["case"]: row for row in result["rows"]}
    offload_name = OFFLOAD[2][0]
    assert list(rows) == [BASELINES[0][0], OURS[0][0], OURS[2][0], offload_name]
    assert rows[BASELINES[0][0]]["last_step"]["applied"] is True
    assert (rows[OURS[0][0]]["pack_sequences"], rows[OURS[2][0]]["pack_sequences"]) == (False, True)
    for name in (OURS[0][0], OURS[2][0]):
        assert (rows[name]["offload_between_phases"], rows[name]["offload_active"]) == (False, False)
        assert rows[name]["last_step"]["grad_norm"] > 0
    # on a (virtual) GPU the offload row really moves the optimizer states
    assert (rows[offload_name]["offload_between_phases"], rows[offload_name]["offload_active"]) == (True, True)
    for row in rows.values():
        assert all(math.isfinite(v) for v in row["last_step"].values() if isinstance(v, float)), row["case"]


def test_a_ratio_over_rounds_is_the_median_of_each_rounds_own_ratio():
    """--rounds: a case's row holds every round's steps; its ratio compares each round's ours with the same
    round's baseline, then takes the median, so one slow round on one side does not decide it."""
    def run(times, peak):
        return {"case": "x", "times_s": times, "median_s": sorted(times)[len(times) // 2], "peak_bytes": peak}

    base = merge_rounds([run([1.0, 1.0, 1.0], 10 << 20), run([2.0, 2.0, 2.0], 12 << 20),
                         run([1.0, 1.0, 1.0], 11 << 20)])
    ours = merge_rounds([run([1.25, 1.25, 1.25], 20 << 20), run([2.0, 2.0, 2.0], 20 << 20),
                         run([4.0, 4.0, 4.0], 20 << 20)])  # the last round slow on our side only
    assert base["round_median_s"] == [1.0, 2.0, 1.0] and len(base["times_s"]) == 9 and base["peak_bytes"] == 12 << 20
    rows = []
    for name, row, versus in (("base", base, None), ("ours", ours, "base")):
        row.update(case=name, tokens=1000, model_flops=2e12, tokens_per_s=1000 / row["median_s"],
                   tflops=2.0 / row["median_s"])
        if versus:
            row["versus"] = versus
        rows.append(row)
    add_ratios(rows)
    assert rows[1]["ratio_rounds"] == [0.8, 1.0, 0.25]
    assert rows[1]["ratio_tokens_per_s"] == 0.8  # the median round; all steps pooled would give 1.0 / 2.0
    assert abs(rows[1]["ratio_tflops"] - 0.8) < 1e-12  # the same flops per token on both sides
    assert abs(rows[1]["ratio_peak_memory"] - (20 / 12)) < 1e-12


def test_paired_ratios_time_the_two_sides_step_by_step_in_alternating_order(monkeypatch):
    """--paired: one step of each side in turn (the order swapped every pair), each pair's ratio the
    baseline's seconds over ours; warm-up steps of both sides are not timed."""
    import torch

    from liteppo_mcore.utils import bench

    clock = [0.0]
    calls = []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def step(name, seconds):
        def run():
            calls.append(name)
            clock[0] += seconds.pop(0)
            return {}
        return run

    base = step("base", [9.0, 3.0, 3.0, 6.0, 3.0])
    ours = step("ours", [9.0, 2.0, 1.0, 4.0, 4.0])
    ratios = paired_ratios(base, ours, torch.device("cpu"), warmup=1, pairs=4)
    assert calls == ["base", "ours", "base", "ours", "ours", "base", "base", "ours", "ours", "base"]
    assert ratios == [1.5, 3.0, 1.5, 0.75]
