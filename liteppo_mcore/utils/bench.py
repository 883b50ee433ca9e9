"""What the benchmarks in tools/ share: timing a call the same way on CPU and GPU, and writing results.

Timing: `warmup` untimed calls, then `repeats` timed ones; CUDA events around each call on a GPU
(synchronized before and after), `time.perf_counter` on a CPU. With several ranks the slowest rank's
time counts (a collective step is done when every rank is).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, List, Optional, Tuple


def time_calls(fn: Callable[[], Any], device, warmup: int, repeats: int, *,
               before: Optional[Callable[[], None]] = None) -> Tuple[List[float], Any]:
    """(seconds of each timed call, the last call's return value). `before` runs untimed before each
    timed call (e.g. a barrier)."""
    import torch
    import torch.distributed as dist

    out = None
    for _ in range(warmup):
        out = fn()
    times: List[float] = []
    for _ in range(repeats):
        if before is not None:
            before()
        if device.type == "cuda":
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
        box = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        times = box.tolist()
    return times, out


def emit(result: dict, out_path: Optional[str], print_table: Callable[[dict], None]) -> None:
    """Write the JSON (when asked), then print the table last."""
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)
    print_table(result)


def add_common_args(parser, sizes) -> None:
    """--device, --size, --dtype, --warmup, --repeats and --out, the options every benchmark takes."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--size", choices=sorted(sizes), default=None, help="default: full on cuda, small on cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: per device)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: per device)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def resolve_common_args(args, *, warmup: Tuple[int, int], repeats: Tuple[int, int]) -> bool:
    """Fill the device-dependent defaults (`warmup`/`repeats` as (gpu, cpu)); returns whether on a GPU.
    `--device cpu` hides the GPUs before anything asks torch about CUDA."""
    import os

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.size = args.size or ("full" if gpu else "small")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else warmup[0 if gpu else 1]
    args.repeats = args.repeats if args.repeats is not None else repeats[0 if gpu else 1]
    return gpu
