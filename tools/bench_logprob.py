"""Benchmark: vocab-parallel log-prob + entropy (forward and backward) against naive fp32 log_softmax,
and, from the last hidden states, the fused path against the output layer's matmul plus the same.

Table 1, from logits: every version runs in the same process on the same random logits
``[tokens, vocab]`` (TP=1). Reports the median time of forward+backward and, on CUDA, the extra peak
memory over the inputs (CUDA events after warm-up); on CPU (perf_counter), the bytes of tensors each
version keeps alive for backward, beyond the logits themselves. Also the largest difference from the
naive results, as a sanity check.

Table 2, from hidden states ``[tokens, hidden]`` and an output weight ``[vocab, hidden]`` (what the
trainer has): "logits, then chunked" computes ``hidden @ weight.T`` whole and runs our chunked function
on it (with the gradient written in place); "fused" is `vocab_parallel_logprob_entropy_from_hidden`,
whose matmul runs per chunk forward and backward. Each version runs in a child process of its own, so
its peak memory is its own: on CPU the peak resident set (VmHWM) minus the resident set once the
inputs exist, in a child of its own whose C heap maps every allocation of 64 KiB or more apart (so the
resident set follows the live tensors, not the pages the allocator keeps), on CUDA
`max_memory_allocated` minus the memory allocated then. The gradients of the hidden states and of the
weight, which every version must produce, are reported apart ("net": the peak beyond them), as a
multiple of the full logits' size (``tokens x vocab`` in the dtype).

    python tools/bench_logprob.py --device cpu --size small --out bench_logprob.json
    python tools/bench_logprob.py --device cuda --size full          # bf16, 16,384 x 151,936
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.config import choices  # noqa: E402
from liteppo_mcore.models.logprob import (  # noqa: E402
    vocab_parallel_logprob_entropy,
    vocab_parallel_logprob_entropy_from_hidden,
)
from liteppo_mcore.utils.bench import emit, print_args, reset_peak_rss, resident_bytes  # noqa: E402

SIZES = {"small": (2048, 32768), "full": (16384, 151936)}
# tokens, vocabulary, hidden size of table 2 (from hidden states)
HIDDEN_SIZES = {"small": (8192, 32768, 512), "full": (16384, 151936, 4096)}
HIDDEN_VERSIONS = ("logits, then chunked", "fused (from hidden states)")
# --dtype -> torch dtype: one entry per config.choices.EXPLICIT_DTYPES (tests/unit/test_config_choices.py).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = float(1 << 30)


def naive(x: torch.Tensor, targets: torch.Tensor, temperature: float, entropy_grad: bool):
    """The textbook version: fp32 log_softmax of the whole logits, entropy from the same tensor."""
    logsm = torch.log_softmax(x.float() / temperature, dim=-1)
    logp = logsm.gather(1, targets.unsqueeze(1)).squeeze(1)
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, ent if entropy_grad else ent.detach()


def variants(args) -> dict[str, tuple[Callable, bool]]:
    """name -> (function, whether its loss has the entropy term, like the naive one, so grads compare)."""
    def ours(**kw):
        return lambda x, t: vocab_parallel_logprob_entropy(
            x, t, temperature=args.temperature, chunk_size=args.chunk_size, **kw)

    return {
        "naive fp32 log_softmax (entropy grad)": (lambda x, t: naive(x, t, args.temperature, True), True),
        "ours (entropy detached)": (ours(entropy_grad=False), False),
        "ours (entropy grad)": (ours(entropy_grad=True), True),
        "ours, grad in place (entr. detached)": (ours(entropy_grad=False, inplace_backward=True), False),
    }


def fwd_bwd(fn: Callable, x: torch.Tensor, targets, w_logp, w_ent):
    logp, ent = fn(x, targets)
    loss = (w_logp * logp).sum()
    if ent.requires_grad:
        loss = loss + (w_ent * ent).sum()
    loss.backward()
    return logp.detach(), ent.detach()


class SavedBytes:
    """Counts the bytes of distinct storages autograd saves for backward, and those beyond the logits'."""

    def __init__(self, logits: torch.Tensor):
        self.own = logits.untyped_storage().data_ptr()
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    @property
    def beyond_logits(self) -> int:
        return sum(size for ptr, size in self.seen.items() if ptr != self.own)


def one_run(fn: Callable, x: torch.Tensor, pristine: torch.Tensor, inputs, counter=None) -> tuple:
    """(milliseconds, (logp, entropy)) of one forward+backward from pristine logits (restored each time:
    one version writes its gradient into them)."""
    with torch.no_grad():
        x.copy_(pristine)
    x.grad = None
    cuda = x.device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
    begin = time.perf_counter()
    if counter is not None:
        with counter.context():
            outputs = fwd_bwd(fn, x, *inputs)
    else:
        outputs = fwd_bwd(fn, x, *inputs)
    if cuda:
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), outputs
    return (time.perf_counter() - begin) * 1e3, outputs


def extra_peak(fn: Callable, x: torch.Tensor, pristine: torch.Tensor, inputs) -> float:
    """Bytes allocated at the peak of one forward+backward beyond what existed before (the grad included)."""
    with torch.no_grad():
        x.copy_(pristine)
    x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(fn, x, *inputs)
    torch.cuda.synchronize()
    x.grad = None
    return float(torch.cuda.max_memory_allocated() - base)


def measure_one(name: str, fn: Callable, same_loss: bool, x, pristine, inputs, args, reference) -> tuple:
    """One table row, and this version's (logp, entropy, grad) from its last run."""
    cuda = x.device.type == "cuda"
    counter = None if cuda else SavedBytes(x)
    one_run(fn, x, pristine, inputs, counter)  # the first warm-up run also counts saved tensors on CPU
    for _ in range(args.warmup - 1):
        one_run(fn, x, pristine, inputs)
    times = []
    for _ in range(args.repeats):
        elapsed, (logp, ent) = one_run(fn, x, pristine, inputs)
        times.append(elapsed)
    outputs = (logp, ent, x.grad.clone())
    x.grad = None
    row = {"version": name, "median_ms": statistics.median(times), "times_ms": times}
    if cuda:
        row["extra_peak_bytes"] = extra_peak(fn, x, pristine, inputs)
    else:
        row["saved_for_backward_bytes"] = counter.total
        row["saved_beyond_logits_bytes"] = counter.beyond_logits
    if reference is not None:
        row["max_abs_diff_vs_naive"] = {
            "logp": (logp - reference[0]).abs().max().item(),
            "entropy": (ent - reference[1]).abs().max().item(),
            "grad": (outputs[2].float() - reference[2].float()).abs().max().item() if same_loss else None}
    return row, outputs


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    n, v = SIZES[args.size]
    gen = torch.Generator(device=device).manual_seed(0)
    pristine = (torch.randn(n, v, generator=gen, device=device) * 2).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    inputs = (targets, torch.rand(n, generator=gen, device=device), torch.rand(n, generator=gen, device=device))
    x = pristine.clone().requires_grad_(True)
    rows, reference = [], None
    for name, (fn, same_loss) in variants(args).items():
        row, outputs = measure_one(name, fn, same_loss, x, pristine, inputs, args, reference)
        if reference is None:  # the first version, the naive one, is the reference
            reference = outputs
        rows.append(row)
    for row in rows:
        row["time_ratio_vs_naive"] = row["median_ms"] / rows[0]["median_ms"]
    logits_bytes = pristine.numel() * pristine.element_size()
    floor_ms = 3 * logits_bytes / (args.bandwidth_tbs * 1e12) * 1e3 if device.type == "cuda" else None
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": args.dtype, "tokens": n, "vocab": v, "temperature": args.temperature,
            "chunk_size": args.chunk_size, "logits_bytes": logits_bytes, "memory_floor_ms": floor_ms,
            "torch": torch.__version__, "rows": rows}


# ---------------------------------------------------------------------------------------------------
# Table 2: from the last hidden states, one child process per version

def _hidden_inputs(n: int, v: int, h: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = (torch.randn(n, h, generator=gen, device=device)).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen, device=device) * h ** -0.5 * 2).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    w_logp, w_ent = torch.rand(n, generator=gen, device=device), torch.rand(n, generator=gen, device=device)
    return hidden, weight, targets, w_logp, w_ent


def _hidden_fn(version: str, args) -> Callable:
    if version == HIDDEN_VERSIONS[0]:
        return lambda hid, w, t: vocab_parallel_logprob_entropy(hid @ w.t(), t, temperature=args.temperature,
                                                               chunk_size=args.chunk_size, inplace_backward=True)
    return lambda hid, w, t: vocab_parallel_logprob_entropy_from_hidden(hid, w, t, temperature=args.temperature,
                                                                       chunk_size=args.chunk_size)


def hidden_child(args) -> dict:
    """One version of table 2, in this (fresh) process: times, peak memory, results' checksums."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    n, v, h = args.hidden_shape
    hidden, weight, targets, w_logp, w_ent = _hidden_inputs(n, v, h, dtype, device)
    version_fn = _hidden_fn(args.child, args)

    def fn(hid, t):
        return version_fn(hid, weight, t)

    cuda = device.type == "cuda"

    def run() -> tuple[float, tuple]:
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        out = fwd_bwd(fn, hidden, targets, w_logp, w_ent)  # the loss of logp, the entropy's term when it has a grad
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - begin) * 1e3, out

    for _ in range(args.warmup):  # first calls load kernels and grow thread pools: not the version's memory
        run()
    hidden.grad = weight.grad = None
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_peak_rss()
        if base is None:
            raise RuntimeError("bench_logprob: peak memory on CPU needs Linux's /proc/self/clear_refs")
    times = []
    for _ in range(args.repeats):
        elapsed, (logp, ent) = run()
        times.append(elapsed)
    peak = (torch.cuda.max_memory_allocated() if cuda else resident_bytes("VmHWM") or 0) - base
    grads = hidden.grad.numel() * hidden.grad.element_size() + weight.grad.numel() * weight.grad.element_size()
    return {"version": args.child, "median_ms": statistics.median(times), "times_ms": times,
            "extra_peak_bytes": int(peak), "gradient_bytes": int(grads),
            "logp_sum": float(logp.double().sum()), "entropy_sum": float(ent.double().sum()),
            "grad_hidden_sum": float(hidden.grad.double().abs().sum()),
            "grad_weight_sum": float(weight.grad.double().abs().sum())}


def _child_argv(args, version: str, warmup: int, repeats: int) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--child", version, "--device", args.device,
            "--dtype", args.dtype, "--temperature", repr(args.temperature), "--warmup", str(warmup),
            "--repeats", str(repeats), "--hidden-shape", *map(str, args.hidden_shape)]
    return argv + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])


# The CPU memory child's C heap: every allocation of 64 KiB or more is mapped on its own and unmapped
# when freed (a fixed threshold, which glibc then no longer raises), so the resident set follows the
# live tensors; with the default heap, pages freed by one tensor stay resident for the next, and the
# peak resident set depends on where the allocator placed them.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


def _run_child(args, version: str, warmup: int, repeats: int, env: dict) -> dict:
    proc = subprocess.run(_child_argv(args, version, warmup, repeats), capture_output=True, text=True,
                          check=False, env={**os.environ, "LITEPPO_STRICT_DEVICE": "0", **env})
    if proc.returncode != 0:
        raise RuntimeError(f"bench_logprob: the child for {version!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_hidden(args) -> dict:
    """Table 2: each version in its own child process, the same inputs (seeded) in each. On CPU the peak
    memory comes from a second child per version, with the C heap of MEMORY_CHILD_ENV (one warm-up, one
    measured call); the times from the first, with the default heap."""
    n, v, h = args.hidden_shape
    rows = []
    for version in HIDDEN_VERSIONS:
        row = _run_child(args, version, args.warmup, args.repeats, {})
        if args.device == "cpu":
            memory = _run_child(args, version, 1, 1, MEMORY_CHILD_ENV)
            row["extra_peak_bytes"] = memory["extra_peak_bytes"]
            row["peak_memory_env"] = MEMORY_CHILD_ENV
        rows.append(row)
    logits_bytes = n * v * torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    first = rows[0]
    for row in rows:
        row["time_ratio_vs_unfused"] = row["median_ms"] / first["median_ms"]
        row["extra_peak_x_logits"] = row["extra_peak_bytes"] / logits_bytes
        row["net_peak_x_logits"] = (row["extra_peak_bytes"] - row["gradient_bytes"]) / logits_bytes
        row["rel_diff_vs_unfused"] = max(abs(row[k] - first[k]) / max(abs(first[k]), 1e-30)
                                         for k in ("logp_sum", "entropy_sum", "grad_hidden_sum", "grad_weight_sum"))
    return {"tokens": n, "vocab": v, "hidden": h, "logits_bytes": logits_bytes, "rows": rows}


def print_hidden_table(result: dict) -> None:
    size = result["logits_bytes"]
    print(f"\nfrom hidden states: fwd+bwd | {result['tokens']} tokens x {result['hidden']} hidden x "
          f"{result['vocab']} vocab | full logits {size / GIB:.3f} GiB | one child process per version")
    print(f"{'version':<30} {'median ms':>10} {'vs unfused':>10}  {'extra peak, x logits':>20}  "
          f"{'net of grads':>12}  rel. diff")
    for row in result["rows"]:
        print(f"{row['version']:<30} {row['median_ms']:>10.1f} {row['time_ratio_vs_unfused']:>9.2f}x  "
              f"{row['extra_peak_bytes'] / GIB:>9.3f} GiB ({row['extra_peak_x_logits']:.3f}x)  "
              f"{row['net_peak_x_logits']:>11.3f}x  {row['rel_diff_vs_unfused']:.1e}")


def print_table(result: dict) -> None:
    cuda = result["device"].startswith("cuda")
    size = result["logits_bytes"]
    print(f"\nlog-prob + entropy fwd+bwd | {result['tokens']} tokens x {result['vocab']} vocab | "
          f"{result['dtype']} on {result['device']} | logits {size / GIB:.3f} GiB")
    if result["memory_floor_ms"] is not None:
        print(f"memory-bound floor (read logits twice, write grad once): {result['memory_floor_ms']:.2f} ms")
    mem_head = "extra peak, x logits" if cuda else "saved for bwd: all / beyond logits, x logits"
    print(f"{'version':<40} {'median ms':>10} {'vs naive':>9}  {mem_head:<46} max |diff| logp/ent/grad")
    for row in result["rows"]:
        if cuda:
            mem_txt = f"{row['extra_peak_bytes'] / GIB:.3f} GiB ({row['extra_peak_bytes'] / size:.2f}x)"
        else:
            mem_txt = (f"{row['saved_for_backward_bytes'] / size:.4f}x / "
                       f"{row['saved_beyond_logits_bytes'] / size:.4f}x")
        diff = row.get("max_abs_diff_vs_naive")
        diff_txt = "" if diff is None else (f"{diff['logp']:.1e}/{diff['entropy']:.1e}/"
                                            + ("-" if diff["grad"] is None else f"{diff['grad']:.1e}"))
        print(f"{row['version']:<40} {row['median_ms']:>10.2f} {row['time_ratio_vs_naive']:>8.2f}x  "
              f"{mem_txt:<46} {diff_txt}")


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full" if cuda else "small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=list(choices.EXPLICIT_DTYPES), default="bf16")
    parser.add_argument("--temperature", type=float, default=0.99)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: automatic)")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 on cuda, 1 on cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default: 10 on cuda, 3 on cpu")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.3, help="GPU memory bandwidth for the floor")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--hidden-shape", type=int, nargs=3, default=None, metavar=("TOKENS", "VOCAB", "HIDDEN"),
                        help="table 2's sizes (default: by --size)")
    parser.add_argument("--table", choices=["both", "logits", "hidden"], default="both")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one version of table 2 (internal)
    parser.add_argument("--print-args", action="store_true",
                        help="print the resolved arguments as JSON and exit: no device work")
    args = parser.parse_args(argv)
    args.hidden_shape = tuple(args.hidden_shape or HIDDEN_SIZES[args.size])
    gpu = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (10 if gpu else 3)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if print_args(args):
        return
    if args.child is not None:
        print(json.dumps(hidden_child(args)))
        return
    result: dict = {}
    if args.table in ("both", "logits"):
        result = measure(args)
    if args.table in ("both", "hidden"):
        result["from_hidden"] = measure_hidden(args)

    def tables(r: dict) -> None:
        if "rows" in r:
            print_table(r)
        if "from_hidden" in r:
            print_hidden_table(r["from_hidden"])

    emit(result, args.out, tables)  # the JSON, then the tables last


if __name__ == "__main__":
    main()
