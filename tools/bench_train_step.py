"""Benchmark: one actor PPO update as the trainer runs it, against the best stock megatron-core step.

Both sides do ONE OPTIMIZER STEP over the same number of real tokens: forward + backward over all
micro-batches through megatron's schedule, then the (Adam) optimizer step, on one device, random
weights (nothing is downloaded).

- baseline: megatron-core's own local layer spec with this project's SDPA core attention (the fastest
  stock configuration without Transformer Engine), megatron's vocab-parallel cross-entropy, full
  sequences of `seq_len` tokens at micro-batch 2 and 4, megatron DDP + optimizer, `optimizer.step()`;
- ours: `ModelUpdater.update` on a `TrainBatch` of variable-length prompt + response sequences
  (prompt lengths shared within a group, response lengths spread up to the sequence length), LitePPO
  settings: vocab-parallel log-prob and entropy, token-mean clipped policy loss over response masks,
  one guarded optimizer step; by sequences per micro-batch and by a token bound per micro-batch.
  With `train.offload_between_phases` OFF: the baseline keeps its optimizer states on the device, so
  the compared rows do too. The offload the trainer does by default (Adam moments to pinned host
  memory after the update, back before the next) is timed as its own row ("+ optimizer offload"),
  compared with the same case without it.

Reported per case: median (and min) seconds of the step (CUDA events after warm-up), real tokens/s, model
TFLOP/s and MFU (`liteppo_mcore.utils.flops`: Megatron's convention, padding not counted) against a
matmul rate measured in the same run, peak memory (reset before each case's build, so it includes
weights and optimizer states), and ours / baseline ratios. A table is printed last. `--rounds N` runs the
whole list of cases N times, every other round in reverse order, and takes each ratio as the median of
the rounds' own ratios: on a shared machine a slow minute then lands in one round, not on one side.
`--paired N` then times each of our cases against its baseline step by step (both built at once, one
step of each in turn, N pairs): the ratio of two steps a few tens of milliseconds apart, which a
machine's drift over seconds does not reach (`ratio_paired`, the median of the pairs).

    python tools/bench_train_step.py --device cuda --size full --out bench_train_step.json
    python tools/bench_train_step.py --device cpu --size small          # tiny shape, fp32, ~30 s
    python tools/bench_train_step.py --device cpu --size small --repeats 10 --rounds 5   # a robust ratio
    python tools/bench_train_step.py --device cpu --size small --paired 40   # + each pair of steps side by side
    LITEPPO_STRICT_DEVICE=1 python tools/bench_train_step.py --device cuda --size small --dtype fp32
        # the GPU code paths on a CPU machine (strict virtual-device mode): a functional check, CPU times
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from collections.abc import Callable
from importlib.metadata import version
from typing import TYPE_CHECKING

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.config import choices  # noqa: E402
from liteppo_mcore.utils.bench import (  # noqa: E402
    add_common_args,
    bench_device,
    device_name,
    emit,
    print_args,
    reset_peak_rss,
    resident_bytes,
    resolve_common_args,
    strict_virtual,
    time_calls,
)

if TYPE_CHECKING:
    import torch

GIB = float(1 << 30)
GROUP = 8  # responses per prompt
# Qwen2.5-1.5B; the small shape keeps its proportions loosely (GQA, tied embeddings, QKV bias).
SIZES = {
    "small": {"shape": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                        "num_query_groups": 2, "vocab_size": 1000},
              "seq_len": 128, "sequences": 8, "matmul_n": 1024},
    "full": {"shape": {"num_layers": 28, "hidden_size": 1536, "ffn_hidden_size": 8960, "num_attention_heads": 12,
                       "num_query_groups": 2, "vocab_size": 151936},
             "seq_len": 4096, "sequences": 16, "matmul_n": 8192},
}
# (name, micro-batch size in sequences, token bound in units of seq_len or None, baseline to compare with,
# packed). Every case of OURS runs with the optimizer-state offload off, like the baseline (no copies). The
# packed cases (train.pack_sequences, the trainer's default) hold as many tokens per pass as the baseline.
BASELINES = [("megatron local+SDPA, CE, mb 2", 2), ("megatron local+SDPA, CE, mb 4", 4)]
OURS = [("ours, padded, micro-batch 2", 2, None, BASELINES[0][0], False),
        ("ours, padded, micro-batch 4", 4, None, BASELINES[1][0], False),
        ("ours, packed, <= 2 x seq tokens/mb", None, 2, BASELINES[0][0], True),
        ("ours, packed, <= 4 x seq tokens/mb", None, 4, BASELINES[1][0], True)]
# The trainer's default, train.offload_between_phases=true, timed on its own: (name, token bound, the case
# of OURS it is compared with). It does something only on a GPU (or under the strict mode).
OFFLOAD = {2: ("ours, packed, <= 2 x seq + optimizer offload", 2, OURS[2][0]),
           4: ("ours, packed, <= 4 x seq + optimizer offload", 4, OURS[3][0])}


def selected_cases(micro_batches: list[int], offload_row: bool) -> tuple[list, list]:
    """(baselines, ours) for the chosen micro-batch sizes; ours as (name, micro, bound, versus, pack, offload)."""
    keep = set(micro_batches)
    baselines = [b for b in BASELINES if b[1] in keep]
    ours = [(*case, False) for case in OURS if (case[1] or case[2]) in keep]
    if offload_row:
        name, bound, versus = OFFLOAD[max(keep)]
        ours.append((name, None, bound, versus, True, True))
    return baselines, ours


def config_overrides(args, shape: dict, sequences: int, micro: int | None, max_tokens: int | None,
                     offload: bool = False, pack: bool = False) -> list[str]:
    """The LitePPO configuration (examples/liteppo.yaml's algorithm keys) for this shape and batch;
    the optimizer-state offload off unless asked for (the baseline makes no such copies)."""
    seq = args.seq_len
    model = [f"model.{k}={v}" for k, v in shape.items()] + [
        "model.family=qwen2", "model.tie_word_embeddings=true", f"model.max_position_embeddings={seq}",
        f"model.dtype={args.dtype}", f"model.attention_backend={args.attention_backend}"]
    algo = ["adv_estimator=reinforce", "reward_norm=group", "token_level_loss=true", "whiten_advantages=false",
            "advantage_clip=null", "dual_clip_loss=false", "use_kl_loss=false", "entropy_coef=0.0",
            "pg_clip=0.2", "ppo_epochs=1", "rollout.temperature=0.99"]
    batch = [f"rollout_batch_size={sequences // GROUP}", f"num_return_sequences_in_group={GROUP}",
             f"prompt_length={seq // 4}", f"response_length={seq - seq // 4}",
             f"train.mini_batch_size={sequences}", f"train.micro_batch_size={micro or sequences}",
             f"train.max_tokens_per_micro_batch={max_tokens if max_tokens else 'null'}",
             f"train.pack_sequences={'true' if pack else 'false'}"]
    optim = ["train.optimizer=adamw", "train.lr=1e-6", "train.clip_grad=1.0",
             f"train.offload_between_phases={'true' if offload else 'false'}",
             "parallel.backend=auto"]  # nccl with CUDA, gloo without (the strict mode's virtual GPU too)
    return model + algo + batch + optim


def rl_lengths(total: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and response lengths of an RL batch with exactly `total` tokens, each sequence <= seq_len.

    Groups of GROUP responses share a prompt (length in [seq/32, seq/4]); response lengths are spread
    over [10%, 100%] of the room left, then scaled so that the batch holds `total` tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = max(GROUP, round(total / (0.6 * seq_len) / GROUP) * GROUP)
    prompts = torch.randint(seq_len // 32, seq_len // 4 + 1, (n // GROUP,), generator=g).repeat_interleave(GROUP)
    room = seq_len - prompts
    budget = total - int(prompts.sum())
    if not n <= budget <= int(room.sum()):
        raise ValueError(f"{total} tokens cannot be split into {n} sequences of at most {seq_len}")
    raw = (torch.rand(n, generator=g) * 0.9 + 0.1) * room
    responses = torch.minimum((raw * budget / raw.sum()).floor().long().clamp(min=1), room)
    while int(responses.sum()) != budget:  # hand out the rounding remainder one token at a time
        short = budget - int(responses.sum())
        can = (responses < room) if short > 0 else (responses > 1)
        idx = can.nonzero().flatten()[:abs(short)]
        responses[idx] += 1 if short > 0 else -1
    return prompts, responses


def rl_batch(prompts, responses, vocab: int, seed: int):
    """A TrainBatch of random tokens with one advantage per response (outcome reward, group-centred)."""
    import torch

    from liteppo_mcore.update import TrainBatch

    g = torch.Generator().manual_seed(seed + 1)
    n, width = prompts.numel(), int((prompts + responses).max())
    tokens = torch.randint(0, vocab, (n, width), generator=g)
    advantages = torch.randn(n, 1, generator=g).expand(n, int(responses.max())).contiguous()
    return TrainBatch(tokens=tokens, prompt_lens=prompts, response_lens=responses, advantages=advantages)


# ---------------------------------------------------------------- the stock megatron-core step
def build_stock(cfg, groups, shape, dtype, padded_vocab: int, device):
    """megatron's local GPT layer with SDPA core attention, DDP and optimizer as megatron sets them up
    (megatron's get_model: the whole module on the device, in a Float16Module under bf16/fp16, since the
    local spec's torch norms are made on the CPU in fp32 whatever the configuration)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from liteppo_mcore.models.gpt import transformer_config
    from liteppo_mcore.models.layers import SDPACoreAttention

    config = transformer_config(shape, cfg, dtype)
    config.calculate_per_token_loss = False  # stock: mean loss per micro-batch, averaged over micro-batches
    layer = get_gpt_layer_local_spec(qk_layernorm=shape.qk_norm, normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    model = GPTModel(config=config, transformer_layer_spec=layer, vocab_size=padded_vocab,
                     max_sequence_length=shape.max_position_embeddings, parallel_output=True,
                     share_embeddings_and_output_weights=shape.tie_word_embeddings,
                     position_embedding_type="rope", rotary_base=int(shape.rope_theta)).to(device)
    if config.bf16 or config.fp16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    t = cfg.train
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=config.bf16, params_dtype=dtype), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, optimizer


def stock_step_fn(ddp, optimizer, micro_batches: list[dict]) -> Callable[[], dict[str, float]]:
    """One step: forward + backward of every micro-batch with megatron's cross-entropy, optimizer step."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        per_token = model(mb["tokens"], None, attention_mask=None, labels=mb["labels"])  # [b, s] CE

        def loss_func(output):
            mask = mb["loss_mask"]
            loss = (output.float() * mask).sum()
            num_tokens = mask.sum().to(torch.int)
            return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}

        return per_token, loss_func

    def step() -> dict[str, float]:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        b, s = micro_batches[0]["tokens"].shape
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[ddp],
            num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b, forward_only=False)
        applied, grad_norm, _ = optimizer.step()
        total = torch.stack([x["lm loss"] for x in store]).sum(0)
        return {"loss": float(total[0] / total[1]), "grad_norm": float(grad_norm), "applied": bool(applied)}

    step.info = {"offload_between_phases": False, "offload_active": False}  # the stock step makes no copies

    return step


def stock_micro_batches(sequences: int, micro: int, seq_len: int, vocab: int, device, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (sequences, seq_len + 1), generator=g)
    return [{"tokens": tokens[i:i + micro, :-1].to(device), "labels": tokens[i:i + micro, 1:].to(device),
             "loss_mask": torch.ones(min(micro, sequences - i), seq_len, device=device)}
            for i in range(0, sequences, micro)]


# ---------------------------------------------------------------- timing
def time_steps(step: Callable[[], dict], device, warmup: int, repeats: int) -> tuple[list[float], dict]:
    """Seconds of each of `repeats` steps after `warmup` untimed ones (CUDA events on GPU), and the
    last step's information."""
    return time_calls(step, device, warmup, repeats)


def matmul_tflops(device, dtype, n: int, repeats: int = 5) -> float:
    """Median TFLOP/s of n x n x n matmuls: the ceiling MFU is measured against."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    inner = 20 if device.type == "cuda" else 3

    def matmuls() -> dict:
        for _ in range(inner):
            torch.mm(a, b)
        return {}

    times, _ = time_steps(matmuls, device, warmup=1, repeats=repeats)
    return 2 * n ** 3 * inner / statistics.median(times) / 1e12


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_case(name: str, build: Callable[[], Callable[[], dict]], device, args) -> dict:
    """Build the case (weights, optimizer), time its step, free it. Peak memory spans build and steps.
    A step function's `info` attribute (how it was built) goes into the row."""
    import torch

    free_memory(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    # on a CPU: the peak resident set beyond the one before the build (weights, optimizer, activations)
    before = torch.cuda.memory_allocated() if cuda else reset_peak_rss()
    step = build()
    times, info = time_steps(step, device, args.warmup, args.repeats)
    hwm = resident_bytes("VmHWM")
    row = {"case": name, "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
           "last_step": info,
           "allocated_before_bytes": before,
           "static_bytes": torch.cuda.memory_allocated() if cuda else None,
           "peak_bytes": torch.cuda.max_memory_allocated() if cuda else (
               max(0, hwm - before) if hwm is not None and before is not None else None),
           "peak_memory": "max_memory_allocated" if cuda else "peak resident set beyond the start of the case",
           **getattr(step, "info", {})}
    del step
    free_memory(device)
    print(f"  {name}: {row['median_s']:.4f} s/step", flush=True)
    return row


# ---------------------------------------------------------------- our update
def ours_config(args, sequences: int, micro: int | None, max_tokens: int | None, offload: bool = False,
                pack: bool = False):
    """The validated configuration one of our cases runs with."""
    from liteppo_mcore.config import load_config

    return load_config(overrides=config_overrides(args, SIZES[args.size]["shape"], sequences, micro, max_tokens,
                                                  offload, pack), world_size=1)


def ours_builder(args, groups, sequences: int, micro: int | None, max_tokens: int | None, batch,
                 offload: bool = False, pack: bool = False) -> Callable:
    """A builder of our case: the actor as build_models makes it, ModelUpdater around it, update()."""
    def build() -> Callable[[], dict]:
        from liteppo_mcore.models.gpt import build_models
        from liteppo_mcore.update import ModelUpdater

        cfg = ours_config(args, sequences, micro, max_tokens, offload, pack)
        models = build_models(cfg, groups)
        updater = ModelUpdater(models.actor, "actor", cfg, groups, vocab_size=models.shape.vocab_size)
        counter = iter(range(1 << 30))

        def step() -> dict:
            metrics = updater.update(batch, step=next(counter))
            if metrics["actor/skipped_updates"]:
                raise RuntimeError(f"the update was skipped: {metrics}")
            return {"pg_loss": metrics["actor/pg_loss"], "grad_norm": metrics["actor/grad_norm"],
                    "entropy": metrics["actor/entropy"]}

        step.info = {"pack_sequences": bool(cfg.train.pack_sequences),
                     "offload_between_phases": bool(cfg.train.offload_between_phases),
                     "offload_active": bool(updater.offload)}
        return step

    return build


def padded_tokens(seq_lens, micro: int | None, max_tokens: int | None, pack: bool = False) -> int:
    """Tokens the model computes, padding included, under the trainer's micro-batch plan."""
    from liteppo_mcore.models.packing import pack_micro_batches
    from liteppo_mcore.update import plan_micro_batches

    if pack:
        assert max_tokens is not None  # the packed cases are token-bounded
        return sum(p.row_len for p in pack_micro_batches(seq_lens, max_tokens=max_tokens))
    plans = plan_micro_batches(seq_lens, micro_batch_size=micro or seq_lens.numel(), max_tokens=max_tokens,
                               pipeline=False, multiple=1)
    return sum(p.num_rows * p.seq_len for p in plans)


# ---------------------------------------------------------------- the run
def setup(args):
    """Process group (one rank) and megatron's groups, as the trainer starts them."""
    from liteppo_mcore.config import load_config
    from liteppo_mcore.parallel.mcore import initialize_model_parallel
    from liteppo_mcore.parallel.setup import init_distributed

    cfg = load_config(overrides=config_overrides(args, SIZES[args.size]["shape"], args.sequences, 2, None),
                      world_size=1)
    init_distributed(cfg)
    return cfg, initialize_model_parallel(1, 1, 1, seed=cfg.seed)


def add_rates(row: dict, shape, seq_lens: list[int], peak_tflops: float, **extra) -> dict:
    from liteppo_mcore.utils.flops import mfu, tflops_per_second, train_flops

    flops, seconds = train_flops(shape, seq_lens), row["median_s"]
    row.update({"tokens": sum(seq_lens), "sequences": len(seq_lens), "model_flops": flops,
                "tokens_per_s": sum(seq_lens) / seconds, "tflops": tflops_per_second(flops, seconds),
                "mfu": mfu(flops, seconds, peak_tflops)}, **extra)
    return row


def measure(args) -> dict:
    import torch

    from liteppo_mcore.models.gpt import resolve_dtype
    from liteppo_mcore.models.shapes import shape_from_config

    cfg, groups = setup(args)
    device = bench_device(args)
    dtype, shape, n = resolve_dtype(args.dtype), shape_from_config(cfg.model), SIZES[args.size]["matmul_n"]
    padded_vocab = shape.padded_vocab_size(1, cfg.model.make_vocab_size_divisible_by)
    peak = matmul_tflops(device, dtype, n)
    print(f"{args.dtype} matmul {n}^3: {peak:.2f} TFLOP/s", flush=True)
    total = args.sequences * args.seq_len
    baselines, ours = selected_cases(args.micro_batches, args.offload_row)
    cases = []  # (name, build, sequence lengths, add_rates keyword arguments): what one round runs
    for name, micro in baselines:
        data = stock_micro_batches(args.sequences, micro, args.seq_len, shape.vocab_size, device, cfg.seed)
        cases.append((name, lambda data=data: stock_step_fn(*build_stock(cfg, groups, shape, dtype, padded_vocab,
                                                                          device), data),
                      [args.seq_len] * args.sequences,
                      {"kind": "baseline", "micro_batch": micro, "max_tokens": None, "padded_tokens": total}))
    prompts, responses = rl_lengths(total, args.seq_len, cfg.seed)
    batch, lens = rl_batch(prompts, responses, shape.vocab_size, cfg.seed), prompts + responses
    for name, micro, bound, versus, pack, offload in ours:
        max_tokens = bound * args.seq_len if bound else None
        cases.append((name, ours_builder(args, groups, lens.numel(), micro, max_tokens, batch, offload, pack),
                      lens.tolist(),
                      {"kind": "ours + offload" if offload else "ours", "micro_batch": micro,
                       "max_tokens": max_tokens, "versus": versus,
                       "padded_tokens": padded_tokens(lens, micro, max_tokens, pack)}))
    runs: dict[str, list[dict]] = {name: [] for name, *_ in cases}
    for r in range(args.rounds):  # every other round in reverse order: a drift of the machine favours no side
        for name, build, *_ in (cases if r % 2 == 0 else cases[::-1]):
            runs[name].append(run_case(name, build, device, args))
    rows = [add_rates(merge_rounds(runs[name]), shape, seq_lens, peak, **rate) for name, _, seq_lens, rate in cases]
    add_ratios(rows)
    if args.paired:
        builds = {name: build for name, build, *_ in cases}
        for row in rows:
            if row.get("versus") is not None:
                add_paired(row, builds[row["versus"]], builds[row["case"]], device, args)
    return {"device": str(device), "gpu": device_name(device), "strict_device": strict_virtual(),
            "dtype": args.dtype, "size": args.size, "shape": SIZES[args.size]["shape"],
            "attention_backend": args.attention_backend, "seq_len": args.seq_len, "tokens_per_step": total,
            "warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds, "paired": args.paired,
            "timed": "one optimizer step: forward+backward of all micro-batches + optimizer step",
            "offload": "off in every compared case (as the baseline); the '+ optimizer offload' row times the "
                       "trainer's default train.offload_between_phases=true against the same case without it",
            "matmul": {"n": n, "dtype": args.dtype, "tflops": peak},
            "prompt_lens": prompts.tolist(), "response_lens": responses.tolist(),
            "torch": torch.__version__, "megatron_core": version("megatron-core"), "rows": rows}


def paired_ratios(base_step: Callable[[], dict], ours_step: Callable[[], dict], device, warmup: int,
                  pairs: int) -> list[float]:
    """Seconds of the baseline's step over ours, one pair of steps after the other, `pairs` times (the
    order swapped every other pair): both sides then see the same seconds of the machine, where
    separate runs (even rounds of them) see different ones."""
    for _ in range(warmup):
        base_step(), ours_step()
    ratios = []
    for i in range(pairs):
        order = (base_step, ours_step) if i % 2 == 0 else (ours_step, base_step)
        seconds = {id(fn): time_steps(fn, device, 0, 1)[0][0] for fn in order}
        ratios.append(seconds[id(base_step)] / seconds[id(ours_step)])
    return ratios


def add_paired(row: dict, build_base: Callable, build_ours: Callable, device, args) -> None:
    """`ratio_paired`: ours / baseline tokens/s from `paired_ratios` (both sides built and alive at once,
    so no peak memory from this part), the median over the pairs; `paired_ratios` each pair's."""
    free_memory(device)
    base_step, ours_step = build_base(), build_ours()
    per_token = row["tokens"] / row["versus_tokens"]
    ratios = paired_ratios(base_step, ours_step, device, args.warmup, args.paired)
    row["paired_ratios"] = [per_token * r for r in ratios]
    row["ratio_paired"] = statistics.median(row["paired_ratios"])
    del base_step, ours_step
    free_memory(device)
    print(f"  {row['case']}: paired with {row['versus']}: {row['ratio_paired']:.3f}x", flush=True)


def merge_rounds(runs: list[dict]) -> dict:
    """One row of a case run in several rounds: every round's step times (the median and minimum over
    all of them), each round's median (`round_median_s`), the largest peak memory of the rounds."""
    row = dict(runs[-1])
    row["times_s"] = [t for run in runs for t in run["times_s"]]
    row["median_s"], row["min_s"] = statistics.median(row["times_s"]), min(row["times_s"])
    row["round_median_s"] = [run["median_s"] for run in runs]
    peaks = [run["peak_bytes"] for run in runs if run["peak_bytes"] is not None]
    row["peak_bytes"] = max(peaks) if peaks else None
    return row


def add_ratios(rows: list[dict]) -> None:
    """ours / its baseline: throughput (tokens/s), model TFLOP/s and peak memory. With several rounds
    the throughput ratio is the median of the rounds' own ratios (`ratio_rounds`: each round's ours
    against the same round's baseline, run minutes apart at most), so a slow spell of the machine
    moves one round's ratio, not the result."""
    by_name = {r["case"]: r for r in rows}
    for row in rows:
        base = by_name.get(row.get("versus"))
        if base is None:
            continue
        per_token = row["tokens"] / base["tokens"]  # the same tokens on both sides; kept exact if not
        row["versus_tokens"] = base["tokens"]
        row["ratio_rounds"] = [per_token * b / o for o, b in zip(row["round_median_s"], base["round_median_s"])]
        row["ratio_tokens_per_s"] = statistics.median(row["ratio_rounds"])  # one round: tokens/s over tokens/s
        flops_per_token = (row["model_flops"] / row["tokens"]) / (base["model_flops"] / base["tokens"])
        row["ratio_tflops"] = row["ratio_tokens_per_s"] * flops_per_token
        if row["peak_bytes"] is not None and (base["peak_bytes"] or 0) >= 1 << 20:  # below 1 MiB: page noise
            row["ratio_peak_memory"] = row["peak_bytes"] / base["peak_bytes"]


def print_table(result: dict) -> None:
    print(f"\none actor update | {result['tokens_per_step']} tokens/step (seq {result['seq_len']}) | "
          f"{result['dtype']} on {result['gpu'] or result['device']} | "
          f"{result['matmul']['dtype']} matmul {result['matmul']['tflops']:.2f} TFLOP/s = 100% MFU")
    print(f"{'case':<40} {'s/step':>8} {'min s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'pad':>5} "
          f"{'peak GiB':>9}  {'vs ref: tok/s':>18} {'paired':>7} {'mem':>5}")
    for r in result["rows"]:
        pad = r["padded_tokens"] / r["tokens"] - 1
        peak = f"{r['peak_bytes'] / GIB:.2f}" if r.get("peak_bytes") is not None else "-"
        ratio = f"{r['ratio_tokens_per_s']:.2f}x" if "ratio_tokens_per_s" in r else "-"
        if len(r.get("ratio_rounds", ())) > 1:  # the rounds' spread
            ratio += f" ({min(r['ratio_rounds']):.2f}-{max(r['ratio_rounds']):.2f})"
        mem = f"{r['ratio_peak_memory']:.2f}x" if r.get("ratio_peak_memory") is not None else "-"
        paired = f"{r['ratio_paired']:.3f}x" if "ratio_paired" in r else "-"
        print(f"{r['case']:<40} {r['median_s']:>8.4f} {r['min_s']:>8.4f} {r['tokens_per_s']:>10.0f} "
              f"{r['tflops']:>8.3f} {100 * r['mfu']:>5.1f}% {100 * pad:>4.0f}% {peak:>9}  {ratio:>18} {paired:>7} "
              f"{mem:>5}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, SIZES)
    parser.add_argument("--sequences", type=int, default=None, help="baseline sequences per step (x seq_len tokens)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--attention-backend", choices=list(choices.EXPLICIT_ATTENTION_BACKENDS), default="sdpa",
                        help="ours")
    parser.add_argument("--micro-batches", type=int, nargs="+", choices=[2, 4], default=[2, 4],
                        help="the micro-batch sizes (and token bounds, in sequences) to run")
    parser.add_argument("--no-offload-row", dest="offload_row", action="store_false",
                        help="skip the row that times the optimizer-state offload")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every case this many times, every other round in reverse order; each ratio is "
                             "the median of the rounds' own ratios (a shared machine's speed drifts)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="also time each of our cases against its baseline in N pairs of steps, one right "
                             "after the other (`ratio_paired`: the median of the pairs' ratios)")
    args = parser.parse_args(argv)
    resolve_common_args(args, warmup=(2, 1), repeats=(5, 5))
    args.sequences = args.sequences or SIZES[args.size]["sequences"]
    args.seq_len = args.seq_len or SIZES[args.size]["seq_len"]
    if args.sequences % GROUP:
        parser.error(f"--sequences must be a multiple of {GROUP}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.paired < 0:
        parser.error("--paired must be >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if print_args(args):
        return
    emit(measure(args), args.out, print_table)


if __name__ == "__main__":
    main()
