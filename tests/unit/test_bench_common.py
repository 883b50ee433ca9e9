"""What the benchmarks share (liteppo_mcore/utils/bench.py) and their collectives: every tensor a benchmark
sends over a process group is on the device that group's collectives take (CUDA for a group that is NCCL
on a GPU machine), checked under the strict virtual-device mode in two gloo processes."""

import argparse
import os
import sys

import pytest

from tests.distributed.spawn import run_gloo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def collectives_worker(rank, world_size):
    """time_calls' slowest-rank reduction and the weight-sync benchmark's byte count over PP, under the
    strict mode, where the default group stands for an NCCL group: a host tensor sent over it fails."""
    import types

    import torch
    import torch.distributed as dist

    from liteppo_mcore.parallel.device import on_gpu
    from liteppo_mcore.utils.bench import time_calls

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench_weight_sync import model_bytes

    out = {"strict": on_gpu()}  # enters the strict mode (LITEPPO_STRICT_DEVICE=1 in the environment)
    times, last = time_calls(lambda: rank, torch.device("cpu"), warmup=1, repeats=3)
    out["times"], out["last"] = times, last
    stage = torch.nn.Linear(4 + rank, 3, bias=False)  # 3 x (4 + rank) fp32 parameters on this stage
    groups = types.SimpleNamespace(tp_size=1, pp_size=world_size, pp_group=dist.group.WORLD)
    shape = types.SimpleNamespace(vocab_size=3)
    out["model_bytes"] = model_bytes(stage, groups, shape, padded_vocab=3)
    return out


def test_collectives_send_on_the_group_device():
    r0, r1 = run_gloo(collectives_worker, 2, env={"LITEPPO_STRICT_DEVICE": "1"}, timeout=180)
    assert r0["strict"] and r1["strict"]
    assert (r0["last"], r1["last"]) == (0, 1)
    assert len(r0["times"]) == 3 and r0["times"] == r1["times"]  # each repeat: the slowest rank's time
    assert r0["model_bytes"] == r1["model_bytes"] == 4 * 3 * (4 + 5)  # both stages, summed over PP


def test_device_cpu_turns_the_strict_mode_off(monkeypatch):
    """`--device cpu` is a CPU run: no virtual GPU, even when the environment asks for the strict mode."""
    from liteppo_mcore.utils.bench import add_common_args, resolve_common_args

    monkeypatch.setenv("LITEPPO_STRICT_DEVICE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    parser = argparse.ArgumentParser()
    add_common_args(parser, {"small": {}, "full": {}})
    args = parser.parse_args(["--device", "cpu"])
    assert resolve_common_args(args, warmup=(2, 1), repeats=(5, 3)) is False
    assert (args.size, args.dtype, args.warmup, args.repeats) == ("small", "fp32", 1, 3)
    assert os.environ["LITEPPO_STRICT_DEVICE"] == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_device_cuda_without_cuda_needs_the_strict_mode(monkeypatch):
    import torch

    from liteppo_mcore.utils.bench import add_common_args, resolve_common_args

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: --device cuda is a real GPU run")
    parser = argparse.ArgumentParser()
    add_common_args(parser, {"small": {}, "full": {}})
    monkeypatch.delenv("LITEPPO_STRICT_DEVICE", raising=False)
    with pytest.raises(SystemExit, match="LITEPPO_STRICT_DEVICE=1"):
        resolve_common_args(parser.parse_args(["--device", "cuda"]), warmup=(2, 1), repeats=(5, 3))
    monkeypatch.setenv("LITEPPO_STRICT_DEVICE", "1")
    args = parser.parse_args(["--device", "cuda", "--size", "small", "--dtype", "fp32"])
    assert resolve_common_args(args, warmup=(2, 1), repeats=(5, 3)) is True
    assert (args.warmup, args.repeats) == (2, 5)


PEAK_PROBE = """
import json, sys
import torch
from liteppo_mcore.utils.bench import reset_peak_rss, resident_bytes
n = 8 << 20  # bytes: above glibc's first mmap threshold, so its free raises the threshold past it
for _ in range(3):  # allocated, touched and freed: later ones come from the heap and stay resident there
    x = torch.ones(n // 4)
    del x
base = reset_peak_rss()
y = torch.ones(n // 4)
print(json.dumps({"bytes": n, "peak": resident_bytes("VmHWM") - base}))
"""


def test_the_cpu_peak_counts_memory_that_reuses_a_freed_heap():
    """reset_peak_rss gives the C heap's free pages back first: an allocation that takes memory freed
    before the measured span still grows the resident set, so the peak sees it (without that, glibc hands
    the freed, still-resident pages back and the peak reads about zero, or below zero)."""
    import json
    import subprocess

    from liteppo_mcore.utils.bench import release_free_heap

    if not release_free_heap():
        pytest.skip("no glibc malloc_trim on this system")
    proc = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["peak"] >= 0.9 * out["bytes"], out
