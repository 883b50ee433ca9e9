"""Benchmark: rollout decode throughput of the `fast` engine against transformers `generate` and megatron.

Every engine generates EXACTLY `new_tokens` sampled tokens for every prompt (the stop id is outside the
vocabulary, so EOS never ends a row early), from the same fixed-length random prompts, on one device,
random weights (nothing is downloaded). Rows, per batch size:

- transformers `generate`: the `hf` engine's model and generation config (left padding, static
  sampling settings), called plainly: without `output_logits` and without the engine's log-prob
  processor (one `[B, V]` row of log-probs per step), which favours the baseline slightly;
- megatron: on CUDA, megatron-core's `StaticInferenceEngine` (its dynamic engine underneath, CUDA
  graphs on) over a stock megatron `GPTModel` of the same shape, asked for log-probs; on the CPU our
  `mcore` engine over the megatron actor (full recompute per token, no KV cache: megatron-core's
  inference engines do not run on a CPU). Its weights are its own random ones (same shape);
- ours: `FastEngine.generate` (static KV cache; one CUDA graph per batch bucket on CUDA, eager on
  the CPU), per-token log-probs included.

Reported: median seconds per `generate` call after warm-up (CUDA events on GPU), new tokens/s, and
the ratio to transformers at the same batch size. JSON with every repeat; the table is printed last.

    python tools/bench_rollout.py --device cuda --size full --out bench_rollout.json
    python tools/bench_rollout.py --device cpu --size small          # tiny shape, fp32, under a minute
    LITEPPO_STRICT_DEVICE=1 python tools/bench_rollout.py --device cuda --size small --dtype fp32 --skip-megatron
        # the GPU code paths on a CPU machine (strict virtual-device mode, no CUDA graphs): CPU times
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.models.shapes import ModelShape  # noqa: E402
from liteppo_mcore.rollout.engine import SamplingParams  # noqa: E402
from liteppo_mcore.utils.bench import (  # noqa: E402
    add_common_args,
    bench_device,
    device_name,
    emit,
    print_args,
    resolve_common_args,
    strict_virtual,
    time_calls,
)

# Qwen2.5-1.5B (qkv bias, tied, GQA 12/2, head_dim 128); the small shape keeps its kind.
SIZES = {
    "small": {"shape": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2, head_dim=16, vocab_size=1000),
              "batches": [4, 8], "prompt_tokens": 16, "new_tokens": 16},
    "full": {"shape": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                           num_query_groups=2, head_dim=128, vocab_size=151936),
             "batches": [64, 256], "prompt_tokens": 256, "new_tokens": 512},
}
BASELINE = "transformers generate"
MEGATRON = {"cuda": "megatron-core StaticInferenceEngine", "cpu": "megatron actor, mcore engine (no KV cache)"}
OURS = "ours: fast engine"


def make_shape(size: str, max_len: int) -> ModelShape:
    return ModelShape(family="qwen2", max_position_embeddings=max_len, rope_theta=1e6, norm_epsilon=1e-6,
                      tie_word_embeddings=True, **SIZES[size]["shape"])


def random_weights(shape: ModelShape, dtype: torch.dtype, device: torch.device):
    """The transformers model with normal(0, 0.02) weights, and its weight stream (HF names)."""
    from liteppo_mcore.rollout.hf_engine import build_hf_model

    model = build_hf_model(shape, dtype, device)
    # drawn where the data really is: the GPU, or the CPU (also under the strict mode's virtual device)
    draw = device if device.type == "cpu" or torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=draw).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=draw, dtype=torch.float32) * 0.02)
    stream = [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    return model, stream


def timed(fn: Callable[[], int], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of `repeats` calls after `warmup` untimed ones; each call returns its new-token count."""
    return time_calls(fn, device, warmup, repeats)[0]


def check_count(counts: list[int], new_tokens: int, name: str) -> int:
    """Every row must have produced exactly `new_tokens` (else the throughputs would not compare)."""
    if any(c != new_tokens for c in counts):
        raise RuntimeError(f"{name}: rows produced {sorted(set(counts))} tokens, expected {new_tokens} each")
    return sum(counts)


# ---------------------------------------------------------------- engines
def hf_runner(engine, prompts: list[list[int]], params: SamplingParams, stop: int) -> Callable[[], int]:
    """transformers `generate` with the hf engine's model and config, minus the engine's log-prob processor."""
    from liteppo_mcore.rollout.hf_engine import _rng_devices

    width = len(prompts[0])
    ids = torch.tensor(prompts, dtype=torch.long, device=engine.device)
    config = engine._generation_config(params, [stop])
    config.output_logits, config.return_dict_in_generate = False, False

    def run() -> int:
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(engine.device)):
            torch.manual_seed(params.seed)
            out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return check_count([out.shape[1] - width] * out.shape[0], params.max_new_tokens, BASELINE)

    return run


def engine_runner(engine, prompts: list[list[int]], params: SamplingParams, name: str) -> Callable[[], int]:
    """An engine of the rollout protocol: `generate`, counting the new tokens of every row."""
    def run() -> int:
        out = engine.generate(prompts, params)
        return check_count([len(g[0].token_ids) for g in out], params.max_new_tokens, name)

    return run


def megatron_cpu_runner(shape: ModelShape, args, prompts, params: SamplingParams) -> Callable[[], int]:
    """Our mcore engine over the megatron actor as the trainer builds it (one-process group)."""
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.mcore import initialize_model_parallel
    from liteppo_mcore.parallel.setup import init_distributed
    from liteppo_mcore.rollout.mcore_engine import MCoreEngine

    cfg = load_config(overrides=_megatron_overrides(shape, args), world_size=1)
    init_distributed(cfg)
    groups = initialize_model_parallel(1, 1, 1, seed=cfg.seed)
    models = build_models(cfg, groups)
    engine = MCoreEngine(models.actor, groups, vocab_size=shape.vocab_size, eos_token_ids=[shape.vocab_size],
                         max_sequence_length=shape.max_position_embeddings)
    return engine_runner(engine, prompts, params, MEGATRON["cpu"])


def _megatron_overrides(shape: ModelShape, args) -> list[str]:
    model = {k: getattr(shape, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                            "num_query_groups", "vocab_size", "max_position_embeddings")}
    return ([f"model.{k}={v}" for k, v in model.items()] +
            ["model.family=qwen2", "model.tie_word_embeddings=true", f"model.dtype={args.dtype}",
             f"model.rope_theta={shape.rope_theta}", "parallel.backend=auto",
             f"prompt_length={args.prompt_tokens}", f"response_length={args.new_tokens}"])


class _IdTokenizer:
    """Just enough of a megatron tokenizer for token-id prompts: nothing is ever tokenized."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod, self.bos = vocab_size, -1, None

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, tokens, **_: object) -> str:
        return ""


def megatron_cuda_runner(shape: ModelShape, args, prompts, params: SamplingParams) -> Callable[[], int]:
    """megatron-core's StaticInferenceEngine (dynamic engine underneath) over a stock local-spec GPTModel."""
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.sampling_params import SamplingParams as MSamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import resolve_dtype, transformer_config
    from liteppo_mcore.parallel.mcore import initialize_model_parallel
    from liteppo_mcore.parallel.setup import init_distributed

    cfg = load_config(overrides=_megatron_overrides(shape, args), world_size=1)
    init_distributed(cfg)
    initialize_model_parallel(1, 1, 1, seed=cfg.seed)
    dtype = resolve_dtype(cfg.model.dtype)
    padded = shape.padded_vocab_size(1)
    model = GPTModel(config=transformer_config(shape, cfg, dtype),
                     transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=padded, max_sequence_length=shape.max_position_embeddings,
                     share_embeddings_and_output_weights=True, position_embedding_type="rope",
                     rotary_base=int(shape.rope_theta)).cuda().eval()
    batch = len(prompts)
    wrapper_config = InferenceWrapperConfig(
        hidden_size=shape.hidden_size, params_dtype=dtype, inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=padded, inference_max_requests=batch,
        inference_max_seq_length=args.prompt_tokens + args.new_tokens)
    controller = TextGenerationController(GPTInferenceWrapper(model, wrapper_config), _IdTokenizer(shape.vocab_size))
    engine = StaticInferenceEngine(controller, max_batch_size=batch, random_seed=params.seed)
    mparams = MSamplingParams(temperature=params.temperature, top_k=max(params.top_k, 0),
                              top_p=params.top_p if params.top_p < 1 else 0.0, return_log_probs=True,
                              num_tokens_to_generate=params.max_new_tokens, termination_id=-1)

    def run() -> int:
        out = engine.generate(prompts=[list(p) for p in prompts], sampling_params=mparams)
        counts = [len(r.generated_tokens) for r in out]
        return check_count(counts, params.max_new_tokens, MEGATRON["cuda"])

    return run


# ---------------------------------------------------------------- measurement
def run_row(name: str, batch: int, build: Callable[[], Callable[[], int]], args, device) -> dict:
    """Build one engine for one batch size, time it, free it; an engine that fails leaves its error."""
    row: dict[str, object] = {"engine": name, "batch": batch}
    try:
        run = build()
        times = timed(run, device, args.warmup, args.repeats)
    except Exception as err:  # a baseline that cannot run here must not hide the other rows
        row["error"] = f"{type(err).__name__}: {err}"
        print(f"  {name} @ {batch}: FAILED ({row['error'][:300]})", flush=True)
        return row
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    new = batch * args.new_tokens
    row.update(median_s=statistics.median(times), min_s=min(times), times_s=times, new_tokens=new,
               tokens_per_s=new / statistics.median(times))
    print(f"  {name} @ {batch}: {row['median_s']:.3f} s, {row['tokens_per_s']:,.0f} new tokens/s", flush=True)
    return row


def measure(args) -> dict:
    from liteppo_mcore.parallel.mcore import ParallelGroups
    from liteppo_mcore.rollout.fast_engine import FastEngine
    from liteppo_mcore.rollout.hf_engine import HFEngine

    device = bench_device(args)
    graphs = bool(args.graphs and device.type == "cuda" and torch.cuda.is_available())  # never on a virtual GPU
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = make_shape(args.size, args.prompt_tokens + args.new_tokens)
    stop = shape.vocab_size  # outside the vocabulary: no row ever stops early
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.new_tokens, seed=1, stop_token_ids=(stop,))
    single = ParallelGroups(None, None, None, None, None, 0, 1, 0, 1, 0, 1, 0, 1)
    _, stream = random_weights(shape, dtype, device)
    gen = torch.Generator().manual_seed(2)
    rows = []
    for batch in args.batches:
        prompts = torch.randint(0, shape.vocab_size, (batch, args.prompt_tokens), generator=gen).tolist()

        def hf_build(prompts=prompts):
            engine = HFEngine(shape, single, eos_token_ids=[stop], dtype=dtype, device=device, pad_token_id=0)
            engine.update_weights([stream])
            return hf_runner(engine, prompts, params, stop)

        def fast_build(prompts=prompts):
            engine = FastEngine(shape, single, eos_token_ids=[stop], dtype=dtype, device=device,
                                use_cuda_graphs=graphs)
            engine.update_weights([stream])
            return engine_runner(engine, prompts, params, OURS)

        real_gpu = device.type == "cuda" and torch.cuda.is_available()  # megatron's engines need a real one
        megatron = megatron_cuda_runner if real_gpu else megatron_cpu_runner
        rows.append(run_row(BASELINE, batch, hf_build, args, device))
        if not args.skip_megatron:
            rows.append(run_row(MEGATRON["cuda" if real_gpu else "cpu"], batch,
                                lambda megatron=megatron, prompts=prompts: megatron(shape, args, prompts, params),
                                args, device))
        rows.append(run_row(OURS, batch, fast_build, args, device))
    base = {r["batch"]: r.get("tokens_per_s") for r in rows if r["engine"] == BASELINE}
    for r in rows:
        if r.get("tokens_per_s") and base.get(r["batch"]):
            r["ratio_vs_transformers"] = r["tokens_per_s"] / base[r["batch"]]
    return {"device": str(device), "gpu": device_name(device), "strict_device": strict_virtual(),
            "dtype": args.dtype, "size": args.size, "shape": SIZES[args.size]["shape"],
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "warmup": args.warmup, "repeats": args.repeats,
            "cuda_graphs": graphs, "torch": torch.__version__, "rows": rows}


def print_table(result: dict) -> None:
    print(f"\nrollout decode | {result['prompt_tokens']}-token prompts, {result['new_tokens']} sampled new tokens | "
          f"{result['dtype']} on {result.get('gpu') or result['device']} | cuda graphs: {result['cuda_graphs']}")
    print(f"{'engine':<44} {'batch':>6} {'median s':>10} {'new tokens/s':>14} {'vs transformers':>16}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['engine']:<44} {r['batch']:>6} {'failed: ' + r['error'][:60]}")
            continue
        ratio = r.get("ratio_vs_transformers")
        print(f"{r['engine']:<44} {r['batch']:>6} {r['median_s']:>10.3f} {r['tokens_per_s']:>14,.0f} "
              f"{(f'{ratio:.2f}x' if ratio else '-'):>16}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, SIZES)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="ours without CUDA graphs")
    parser.add_argument("--skip-megatron", action="store_true")
    args = parser.parse_args(argv)
    resolve_common_args(args, warmup=(1, 1), repeats=(3, 5))
    size = SIZES[args.size]
    args.batches = args.batches or size["batches"]
    args.prompt_tokens = args.prompt_tokens or size["prompt_tokens"]
    args.new_tokens = args.new_tokens or size["new_tokens"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if print_args(args):
        return
    emit(measure(args), args.out, print_table)


if __name__ == "__main__":
    main()
