"""Benchmark: the actor -> rollout engine weight sync (weight exporter stream, `hf` engine load).

After every update the trainer streams the actor's weights to an engine that keeps its own copy
(`WeightExporter.buckets()` -> `HFEngine.update_weights`). This times, for several bucket sizes:

- export: iterating the stream to the end, reading every tensor of every bucket (what any engine must
  at least do);
- export + hf load: `HFEngine.update_weights(exporter.buckets())`, exactly as `Trainer.sync_weights`;

against two baselines in the same run, over the same bytes on the same device (the floor any sync has):

- a plain `model.state_dict()` copy: every parameter copied into a preallocated tensor (`copy_`, the
  embedding trimmed to the real vocabulary, a tied output layer once);
- one flat copy of that many bytes (the device-to-device memcpy rate, no per-tensor cost).

Rates are GB/s of exported bytes (1 GB = 1e9 bytes; the bytes the stream carries, vocabulary padding
trimmed), medians of repeats after warm-up (CUDA events on GPU, perf_counter on CPU). Memory: the
exporter's own `peak_bytes` and, on GPU, `max_memory_allocated` above what was allocated before the case
(the engine's weights are its own state, not extra). Random weights, nothing downloaded. With --tp/--pp
the script starts itself under torchrun (tp x pp processes); every rank iterates the stream (it is
collective), rank 0 holds the engine, times are the slowest rank's, and the baselines copy each rank's
own shards (so compare rates, GB/s, not times). A table is printed last.

    python tools/bench_weight_sync.py --device cuda --size full --out bench_weight_sync.json
    python tools/bench_weight_sync.py --device cpu --size small          # tiny shape, fp32, ~10 s
    python tools/bench_weight_sync.py --device cpu --size small --tp 2   # under torchrun, 2 processes
    LITEPPO_STRICT_DEVICE=1 python tools/bench_weight_sync.py --device cuda --size small --dtype fp32 --pp 2
        # the GPU code paths on a CPU machine (strict virtual-device mode): a functional check, CPU times
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.utils.bench import (  # noqa: E402
    add_common_args,
    device_name,
    emit,
    print_args,
    resolve_common_args,
    strict_virtual,
)
from liteppo_mcore.utils.bench import time_calls as bench_time_calls  # noqa: E402

if TYPE_CHECKING:
    import torch

MIB = 1 << 20
GIB = float(1 << 30)
# Qwen2.5-1.5B (head_dim 128, tied embeddings, QKV bias); the small shape keeps GQA, ties, biases and a
# padded vocabulary (1000 -> 1024), so the trimming is exercised.
SIZES = {
    "small": {"shape": {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 352, "num_attention_heads": 4,
                        "num_query_groups": 2, "vocab_size": 1000},
              "buckets_mib": [0.25, 1.0, 4.0]},
    "full": {"shape": {"num_layers": 28, "hidden_size": 1536, "ffn_hidden_size": 8960, "num_attention_heads": 12,
                       "num_query_groups": 2, "vocab_size": 151936},
             "buckets_mib": [64.0, 256.0, 1024.0]},
}
TARGET_S = 0.5  # the whole 1.5B actor exported and loaded (tracker issue 10)


def config_overrides(args) -> list[str]:
    """A qwen2-shaped actor alone (no critic, no reference), at this layout and dtype."""
    shape = SIZES[args.size]["shape"]
    return [f"model.{k}={v}" for k, v in shape.items()] + [
        "model.family=qwen2", "model.tie_word_embeddings=true", "model.max_position_embeddings=4096",
        f"model.dtype={args.dtype}", "adv_estimator=reinforce", "use_kl_loss=false", "add_token_level_kl=false",
        f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", "rollout.engine=hf",
        "parallel.backend=auto"]  # nccl with CUDA, gloo without (the strict mode's virtual GPU too)


def relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """Run this very script under torchrun with `nproc` processes; its return code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__)] + argv
    return subprocess.run(cmd).returncode


def setup(args):
    """Process group, megatron's groups and the actor, as the trainer builds them."""
    import torch.distributed as dist

    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.mcore import initialize_model_parallel
    from liteppo_mcore.parallel.setup import init_distributed

    cfg = load_config(overrides=config_overrides(args), world_size=args.tp * args.pp)
    init_distributed(cfg)
    if dist.get_world_size() != args.tp * args.pp:
        raise SystemExit(f"world size {dist.get_world_size()} != tp x pp = {args.tp * args.pp}")
    groups = initialize_model_parallel(args.tp, args.pp, 1, seed=cfg.seed)
    models = build_models(cfg, groups)
    return cfg, groups, models


# ---------------------------------------------------------------- timing and memory
def time_calls(fn: Callable[[], None], device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones (CUDA events on GPU), the slowest
    rank's when several ranks take part (the stream is collective: the sync is done when all are)."""
    import torch.distributed as dist

    return bench_time_calls(fn, device, warmup, repeats, before=dist.barrier)[0]


def run_case(name: str, build: Callable[[], Callable[[], int | None]], device, args, nbytes: int) -> dict:
    """Build the case (its buffers count as its extra memory), time it, free it; GB/s of `nbytes`."""
    import torch

    cuda = device.type == "cuda" and torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else None
    fn = build()
    times = time_calls(fn, device, args.warmup, args.repeats)
    median = statistics.median(times)
    row = {"case": name, "median_s": median, "min_s": min(times), "times_s": times, "bytes": nbytes,
           "gb_per_s": nbytes / median / 1e9,
           "cuda_peak_extra_bytes": torch.cuda.max_memory_allocated() - before if cuda else None}
    del fn
    gc.collect()
    print(f"  {name}: {median * 1e3:.2f} ms, {row['gb_per_s']:.2f} GB/s", flush=True)
    return row


# ---------------------------------------------------------------- the cases
def baseline_tensors(model, shape) -> list[torch.Tensor]:
    """This rank's parameters as `model.state_dict()` holds them, the embedding (and an untied output
    layer) trimmed to the real vocabulary as views, a tied output layer's second copy left out: the
    same bytes the exporter sends (with TP, this rank's shards)."""
    params = dict(model.named_parameters())
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    out = []
    for name, tensor in model.state_dict().items():
        if name not in params or (tied and name.startswith("output_layer.")):
            continue
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            tensor = tensor[: local_vocab_rows(tensor, params[name], shape)]
        out.append(tensor)
    return out


def local_vocab_rows(tensor, param, shape) -> int:
    """Rows of this rank's vocabulary shard that hold real tokens (the padding sits at the end)."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return shape.vocab_size
    start = ps.get_tensor_model_parallel_rank() * tensor.shape[0]
    return max(0, min(tensor.shape[0], shape.vocab_size - start))


def state_dict_copy(model, shape) -> Callable[[], Callable[[], None]]:
    """Baseline: every parameter copied into its own preallocated tensor, one `copy_` each."""
    import torch

    def build():
        src = baseline_tensors(model, shape)
        dst = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in src]

        @torch.no_grad()
        def run():
            for d, s in zip(dst, src):
                d.copy_(s)
        return run
    return build


def flat_copy(nbytes: int, device) -> Callable[[], Callable[[], None]]:
    """Baseline: one copy of `nbytes` bytes, the memcpy rate with no per-tensor cost."""
    import torch

    def build():
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    return build


def export_only(exporter) -> Callable[[], Callable[[], None]]:
    """The stream iterated to the end, every tensor of every bucket read (its bytes counted). The bucket
    is dropped before the next is asked for: a loop variable still bound would keep it alive while the
    exporter builds the next one (up to two buckets held; see the memory columns of the hf load)."""
    def build():
        def run():
            total = 0
            for bucket in exporter.buckets():
                total += sum(t.numel() * t.element_size() for _, t in bucket)
                del bucket
            if total != exporter.total_bytes:
                raise RuntimeError(f"the stream carried {total} bytes, the plan says {exporter.total_bytes}")
        return run
    return build


def export_and_load(exporter, engine) -> Callable[[], Callable[[], None]]:
    """What Trainer.sync_weights does: the engine loads the stream, bucket by bucket."""
    return lambda: (lambda: engine.update_weights(exporter.buckets()))


# ---------------------------------------------------------------- byte accounting
def model_bytes(model, groups, shape, padded_vocab: int) -> int:
    """Bytes of the whole actor (every stage, TP shards gathered), a tied output layer once, vocabulary
    padding trimmed: what the stream must carry, counted from megatron's parameters alone."""
    import torch
    import torch.distributed as dist

    from liteppo_mcore.parallel.device import collective_device

    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    total, padding = 0, 0
    for name, p in model.named_parameters():
        if tied and name.startswith("output_layer."):
            continue
        tp = groups.tp_size if getattr(p, "tensor_model_parallel", False) else 1
        total += p.numel() * p.element_size() * tp
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            padding += (padded_vocab - shape.vocab_size) * p.shape[1] * p.element_size()
    if groups.pp_size == 1:
        return total - padding
    box = torch.tensor([total - padding], dtype=torch.float64, device=collective_device(groups.pp_group))
    dist.all_reduce(box, group=groups.pp_group)
    return int(box.item())


def loaded_matches(engine, model, groups) -> bool | None:
    """On one process: does the engine hold the actor's embedding and last MLP weight after a load?"""
    if groups.tp_size * groups.pp_size > 1 or engine.model is None:
        return None
    import torch

    emb = model.embedding.word_embeddings.weight
    last = model.decoder.layers[-1].mlp.linear_fc2.weight
    n = len(model.decoder.layers) - 1
    return bool(torch.equal(engine.get_weight("model.embed_tokens.weight"), emb[: engine.shape.vocab_size])
                and torch.equal(engine.get_weight(f"model.layers.{n}.mlp.down_proj.weight"), last))


# ---------------------------------------------------------------- the run
def measure(args) -> dict:
    import torch
    import torch.distributed as dist

    from liteppo_mcore.rollout.exporter import WeightExporter
    from liteppo_mcore.rollout.hf_engine import HFEngine

    cfg, groups, models = setup(args)
    device = next(models.actor.parameters()).device
    actor, shape, dtype = models.actor, models.shape, next(models.actor.parameters()).dtype
    engine = HFEngine(shape, groups, eos_token_ids=[0], dtype=dtype, device=device)
    exported = WeightExporter(actor, groups, shape, 1 << 30).total_bytes
    local = sum(t.numel() * t.element_size() for t in baseline_tensors(actor, shape))
    rows = [run_case("state_dict copy (per tensor)", state_dict_copy(actor, shape), device, args, local),
            run_case("flat copy (one tensor)", flat_copy(local, device), device, args, local)]
    rows[0]["kind"] = rows[1]["kind"] = "baseline"
    for mib in args.buckets_mib:
        exporter = WeightExporter(actor, groups, shape, int(mib * MIB))
        for kind, build in (("export", export_only(exporter)),
                            ("export + hf load", export_and_load(exporter, engine))):
            row = run_case(f"{kind}, bucket {mib:g} MiB", build, device, args, exported)
            row.update(kind=kind, bucket_mib=mib, bucket_bytes=exporter.bucket_bytes,
                       buckets=sum(1 for _ in exporter.buckets()), exporter_peak_bytes=exporter.peak_bytes,
                       max_tensor_bytes=exporter.max_tensor_bytes)
            rows.append(row)
    add_ratios(rows)
    hf_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters()) if engine.model else None
    return {"device": str(device), "gpu": device_name(device), "strict_device": strict_virtual(),
            "dtype": str(dtype).replace("torch.", ""), "size": args.size, "shape": SIZES[args.size]["shape"],
            "tp": args.tp, "pp": args.pp, "world_size": dist.get_world_size(),
            "warmup": args.warmup, "repeats": args.repeats, "target_s": TARGET_S,
            "exported_bytes": exported, "model_bytes": model_bytes(actor, groups, shape, models.padded_vocab_size),
            "hf_model_bytes": hf_bytes, "baseline_bytes_rank0": local,
            "padded_vocab_size": models.padded_vocab_size,
            "loaded_matches_actor": loaded_matches(engine, actor, groups),
            "torch": torch.__version__, "rows": rows}


def add_ratios(rows: list[dict]) -> None:
    """Each case against the state_dict copy: time ratio (x its time) and rate ratio (x its GB/s)."""
    base = rows[0]
    for row in rows:
        row["time_vs_state_dict_copy"] = row["median_s"] / base["median_s"]
        row["rate_vs_state_dict_copy"] = row["gb_per_s"] / base["gb_per_s"]


def print_table(result: dict) -> None:
    cuda = result["device"].startswith("cuda") and not result.get("strict_device")
    print(f"\nweight sync | {result['exported_bytes'] / GIB:.4f} GiB exported ({result['dtype']}, "
          f"{result['shape']['num_layers']} layers) | tp {result['tp']} pp {result['pp']} | "
          f"{result['gpu'] or result['device']} | target {result['target_s']} s at full size")
    print(f"{'case':<34} {'median ms':>10} {'min ms':>9} {'GB/s':>8} {'x floor time':>13} {'buckets':>8} "
          f"{'exporter peak MiB':>18} {'cuda extra MiB':>15}")
    for r in result["rows"]:
        peak = f"{r['exporter_peak_bytes'] / MIB:.2f}" if "exporter_peak_bytes" in r else "-"
        extra = f"{r['cuda_peak_extra_bytes'] / MIB:.1f}" if cuda else "-"
        print(f"{r['case']:<34} {r['median_s'] * 1e3:>10.2f} {r['min_s'] * 1e3:>9.2f} {r['gb_per_s']:>8.2f} "
              f"{r['time_vs_state_dict_copy']:>12.2f}x {r.get('buckets', '-'):>8} {peak:>18} {extra:>15}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, SIZES)  # --out is written by rank 0
    parser.add_argument("--buckets-mib", type=float, nargs="+", default=None,
                        help="bucket sizes in MiB (default: 64 256 1024 at full size, 0.25 1 4 at small)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (runs under torchrun when > 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (runs under torchrun when > 1)")
    args = parser.parse_args(argv)
    resolve_common_args(args, warmup=(2, 1), repeats=(10, 5))
    args.buckets_mib = args.buckets_mib or SIZES[args.size]["buckets_mib"]
    if args.tp < 1 or args.pp < 1 or any(not (m > 0 and math.isfinite(m)) for m in args.buckets_mib):
        parser.error("--tp, --pp and --buckets-mib must be positive")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if print_args(args):
        return
    if args.tp * args.pp > 1 and "RANK" not in os.environ:
        sys.exit(relaunch_under_torchrun(argv, args.tp * args.pp))
    import torch.distributed as dist

    result = measure(args)
    if dist.get_rank() == 0:
        emit(result, args.out, print_table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
