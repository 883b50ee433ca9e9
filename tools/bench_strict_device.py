"""Benchmark: what the strict virtual-device mode costs on the CPU (the price of running the whole suite
under it).

The same work runs in two fresh one-process gloo jobs, the plain CPU compatibility layer first, then
the strict mode (LITEPPO_STRICT_DEVICE=1; the mode cannot be left once entered, hence two processes):
building a small megatron GPT, a forward-only pass over a batch (`forward_per_token`), and a
forward + backward of the same batch. Reports the median seconds of each and the ratio strict / plain.

    python tools/bench_strict_device.py --out bench_strict_device.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.utils.bench import emit  # noqa: E402

SIZES = {"small": ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128"],
         "medium": ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=512"]}
COMMON = ["model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
          "model.max_position_embeddings=256", "adv_estimator=reinforce", "use_kl_loss=false"]


def _child(size: str, rows: int, seq: int, warmup: int, repeats: int) -> dict:
    """One mode's measurements, in this process (LITEPPO_STRICT_DEVICE set by the parent)."""
    import torch
    import torch.distributed as dist

    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.forward import SequenceBatch, forward_per_token
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.device import compute_device
    from liteppo_mcore.parallel.mcore import initialize_model_parallel
    from liteppo_mcore.parallel.setup import free_port
    from liteppo_mcore.utils.bench import time_calls

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    cfg = load_config(overrides=COMMON + SIZES[size])
    begin = time.perf_counter()
    groups = initialize_model_parallel(1, 1, 1, seed=cfg.seed)
    actor = build_models(cfg, groups).actor
    build_s = time.perf_counter() - begin
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (rows, seq), generator=g)
    batch = SequenceBatch(tokens, torch.full((rows,), seq // 2), torch.full((rows,), seq - seq // 2))
    device = compute_device()

    def forward_only():
        return forward_per_token(actor, batch, groups, vocab_size=256, micro_batch_size=rows)["logp"]

    def forward_backward():
        actor.zero_grad(set_to_none=True)
        actor(tokens.to(device), None, attention_mask=None).float().logsumexp(-1).mean().backward()

    fwd, logp = time_calls(forward_only, torch.device("cpu"), warmup, repeats)
    bwd, _ = time_calls(forward_backward, torch.device("cpu"), warmup, repeats)
    dist.destroy_process_group()
    from liteppo_mcore.parallel import strict_device

    return {"strict": strict_device.is_active(), "build_s": build_s, "forward_s": statistics.median(fwd),
            "forward_backward_s": statistics.median(bwd), "logp_sum": float(logp.double().sum())}


def _run_mode(strict: bool, args) -> dict:
    env = {**os.environ, "LITEPPO_STRICT_DEVICE": "1" if strict else "0", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--size", args.size, "--rows", str(args.rows),
           "--seq", str(args.seq), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench_strict_device: the {'strict' if strict else 'plain'} run failed:\n"
                         f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(result: dict) -> None:
    plain, strict = result["plain"], result["strict"]
    print(f"strict virtual-device mode vs the plain CPU layer | size {result['size']}, batch "
          f"{result['rows']} x {result['seq']} tokens, median of {result['repeats']}")
    print(f"{'step':<20} {'plain s':>10} {'strict s':>10} {'strict / plain':>15}")
    for key, label in (("build_s", "build the actor"), ("forward_s", "forward_per_token"),
                       ("forward_backward_s", "forward + backward")):
        print(f"{label:<20} {plain[key]:>10.4f} {strict[key]:>10.4f} {strict[key] / plain[key]:>15.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for each mode's process")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.size, args.rows, args.seq, args.warmup, args.repeats)))
        return 0
    plain, strict = _run_mode(False, args), _run_mode(True, args)
    if plain["strict"] or not strict["strict"]:
        raise SystemExit("bench_strict_device: the modes did not come out as asked (CUDA present?)")
    if abs(plain["logp_sum"] - strict["logp_sum"]) > 1e-3 * max(1.0, abs(plain["logp_sum"])):
        print(f"note: the two modes initialize megatron differently (CPU vs GPU path): log-prob sums "
              f"{plain['logp_sum']:.4f} vs {strict['logp_sum']:.4f}")
    result = {"size": args.size, "rows": args.rows, "seq": args.seq, "repeats": args.repeats,
              "plain": plain, "strict": strict,
              "ratios": {k: strict[k] / plain[k] for k in ("build_s", "forward_s", "forward_backward_s")}}
    emit(result, args.out, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
