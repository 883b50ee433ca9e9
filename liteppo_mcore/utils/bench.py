"""What the benchmarks in tools/ share: timing a call the same way on CPU and GPU, and writing results.

Timing: `warmup` untimed calls, then `repeats` timed ones; CUDA events around each call on a GPU
(synchronized before and after), `time.perf_counter` on a CPU. With several ranks the slowest rank's
time counts (a collective step is done when every rank is).

Devices: `--device cuda` places everything as on a GPU (`bench_device`). On a machine without CUDA it is
accepted only under the strict virtual-device mode (`LITEPPO_STRICT_DEVICE=1`): a functional run of the
GPU code paths whose times are CPU times (the JSON says so: `strict_device`). `--device cpu` is a plain
CPU run, with the strict mode turned off for the process.
"""

from __future__ import annotations

import ctypes
import gc
import json
import time
from collections.abc import Callable
from typing import Any


def time_calls(fn: Callable[[], Any], device, warmup: int, repeats: int, *,
               before: Callable[[], None] | None = None) -> tuple[list[float], Any]:
    """(seconds of each timed call, the last call's return value). `before` runs untimed before each
    timed call (e.g. a barrier)."""
    import torch
    import torch.distributed as dist

    out = None
    for _ in range(warmup):
        out = fn()
    times: list[float] = []
    events = device.type == "cuda" and torch.cuda.is_available()  # not under the strict mode on a CPU
    for _ in range(repeats):
        if before is not None:
            before()
        if events:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - begin)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        times = max_over_ranks(times)
    return times, out


def max_over_ranks(values: list[float], group=None) -> list[float]:
    """Element-wise maximum over the ranks of `group` (default: all), sent on the device the group's
    collectives take (CUDA for NCCL, the CPU for gloo)."""
    import torch
    import torch.distributed as dist

    from liteppo_mcore.parallel.device import collective_device

    box = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return box.cpu().tolist()


STRICT_ENV = "LITEPPO_STRICT_DEVICE"


def check_cuda_or_strict() -> None:
    """`--device cuda` needs a GPU, or the strict virtual-device mode for a functional run."""
    import torch

    from liteppo_mcore.parallel import strict_device

    if not torch.cuda.is_available() and not strict_device.requested():
        raise SystemExit(f"--device cuda: no CUDA device here. Run on a GPU machine, or set {STRICT_ENV}=1 "
                         "for a functional run of the GPU code paths on the CPU (times are then CPU times).")


def strict_virtual() -> bool:
    """Whether 'cuda' is the strict mode's virtual device (no real GPU): times are CPU times."""
    import torch

    from liteppo_mcore.parallel import strict_device

    return not torch.cuda.is_available() and strict_device.requested()


def bench_device(args):
    """The device a benchmark places its models and data on: this process's GPU (the strict mode's
    virtual one without CUDA, entered here so that every tensor made from now on carries it) or the CPU."""
    import torch

    if args.device == "cuda":
        from liteppo_mcore.parallel.device import compute_device

        return compute_device()
    return torch.device("cpu")


def device_name(device) -> str | None:
    """The GPU's name, the strict mode's virtual device, or None on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "virtual cuda (strict device mode on the CPU: CPU times)"


def print_args(args) -> bool:
    """With --print-args: print the resolved arguments as one JSON line; returns whether it did (the
    caller then exits)."""
    if not getattr(args, "print_args", False):
        return False
    print(json.dumps({k: v for k, v in sorted(vars(args).items()) if k != "print_args"}, default=str))
    return True


def emit(result: dict, out_path: str | None, print_table: Callable[[dict], None]) -> None:
    """Write the JSON (when asked), then print the table last."""
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)
    print_table(result)


def add_common_args(parser, sizes) -> None:
    """--device, --size, --dtype, --warmup, --repeats and --out, the options every benchmark takes."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--size", choices=sorted(sizes), default=None, help="default: full on cuda, small on cpu")
    # A subset of config.choices.EXPLICIT_DTYPES on purpose: the benchmarks run bf16 (GPU) and fp32 (CPU)
    # only, no fp16 (bench_rollout's dtype table has none); tests/unit/test_config_choices.py checks the subset.
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: per device)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: per device)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--print-args", action="store_true",
                        help="print the resolved arguments as JSON and exit: no device work (tools/gpu_check.sh "
                             "--dry-run checks a GPU run's arguments with it on any machine)")


def resolve_common_args(args, *, warmup: tuple[int, int], repeats: tuple[int, int]) -> bool:
    """Fill the device-dependent defaults (`warmup`/`repeats` as (gpu, cpu)); returns whether on a GPU.
    `--device cpu` hides the GPUs (and turns the strict virtual-device mode off) before anything asks
    torch about CUDA; `--device cuda` without CUDA needs the strict mode (module doc)."""
    import os

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ[STRICT_ENV] = "0"  # a CPU run, not a virtual GPU (children inherit it too)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not getattr(args, "print_args", False):
        check_cuda_or_strict()
    gpu = args.device == "cuda"
    args.size = args.size or ("full" if gpu else "small")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else warmup[0 if gpu else 1]
    args.repeats = args.repeats if args.repeats is not None else repeats[0 if gpu else 1]
    return gpu


def resident_bytes(field: str = "VmRSS") -> int | None:
    """This process's resident set now (VmRSS) or at its peak (VmHWM), from /proc/self/status; None where
    there is no such file (not Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim(0)`, every arena): memory
    freed earlier but still resident would otherwise take later allocations without growing the resident
    set, and a peak measured from it would miss them. False where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def reset_peak_rss() -> int | None:
    """Reset this process's peak resident set (VmHWM) to the current one (Linux >= 4.0: write 5 to
    /proc/self/clear_refs) and return the current resident set: a later `resident_bytes("VmHWM")` minus it
    is the peak memory taken since. The C heap's free pages are released first (`release_free_heap`), so
    what is allocated since grows the resident set even where it reuses memory freed before. None where
    that is not possible."""
    gc.collect()  # tensors in reference cycles: freed now, not during the measured span
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    return resident_bytes("VmRSS")
