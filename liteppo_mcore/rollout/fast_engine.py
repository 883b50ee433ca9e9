"""The `fast` rollout engine: our compact decoder (fast_decoder.py) with a static KV cache and, on a GPU,
one CUDA graph per batch-size bucket for the decode step; fed by the same weight stream as `hf`.

Why: transformers' `generate` is bound by Python and kernel launches (about 60 ms per decode step on
an H200 for the Qwen2.5-1.5B shape, whatever the batch), and its static cache does not survive
`torch.compile(mode="reduce-overhead")`. Here the decode step has fixed shapes and no host
synchronisation, so a graph replays the whole step with one launch; what is left per step is the
sampler (a handful of kernels) and one host check every `CHECK_EVERY` steps for "all rows done".

Semantics are the `hf` engine's: left-padded prompts (a padded prompt generates what it would alone),
log-probs of the sampled tokens under softmax(raw logits / temperature) over the full vocabulary
(top-p/top-k only shape the draw), greedy = argmax with log-probs still at the temperature, stop
tokens kept as the last token, `n` samples per prompt as repeated rows, a seeded generator per DP
replica (`sampling_seed`). Rows that finished keep decoding padding until the batch ends; their
outputs are cut at the stop token. Collective contract as `hf`: the first rank of each replica
generates and shares the results within the replica; every rank drains the weight stream.

Placement: the decoder lives on `parallel.device.compute_device()` (the process's GPU, or its virtual
stand-in under the strict virtual-device mode). CUDA graphs, streams and graph pools need a real GPU:
they are used only when `torch.cuda.is_available()`, never under the strict mode; the CPU runs eager.

Rows and cache: at most `max_batch_size` rows are decoded at once (all of a call's rows when unset).
With graphs, a batch is padded up to a bucket, the next power of two capped at `max_batch_size` (so
the graphs are those of 1, 2, 4, ... rows and of `max_batch_size` itself). The cache holds
`rows x length` slots; rows never exceed `max_batch_size`, and `max_sequence_length` (prompt_length +
response_length), when given, sizes the length up front, so the cache is allocated once at
`B_max x L` and every later step reuses it. A request that needs more reallocates it and drops the
graphs.

Graphs across sleep / wake. A graph replays raw device addresses: the weights' fused storages (updated
in place by `update_weights`, so a kept graph sees new weights), the rope tables, the KV cache, its
static inputs and its memory pool. It stays valid only while all of them stay where they were, so the
engine keeps the cache and the graphs together, or drops both:
- keep: when graphs were captured and `keep_graphs` is True, or None (auto) and the engine's resident
  bytes (weights + cache; a step's activations in the pool are small next to them) are at most
  `KEEP_GRAPHS_FRACTION` of the GPU's memory (`keeps_graphs_across_sleep`). `sleep` then leaves the
  weights, the cache and the graphs on the GPU, `wake` has nothing to do, and each step replays the
  graphs captured at the first one.
- drop: otherwise (and always on the eager path). `sleep` frees the cache, the graphs and their pool
  and parks the weights on the CPU (on a CUDA device); `wake` brings the weights back, and the next
  `generate` allocates the cache and captures anew.
Capture uses `capture_error_mode="thread_local"`: reward worker threads and the NCCL watchdog make
CUDA calls while the main thread captures, which the default (global) mode would turn into capture
errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from liteppo_mcore.convert.names import ignored_hf_name
from liteppo_mcore.parallel.device import compute_device, make_generator
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.rollout.engine import (
    Generation,
    RolloutEngine,
    SamplingParams,
    WeightBucket,
    check_params,
    copy_weight_stream,
    finish,
    sampling_seed,
    share_within_replica,
)
from liteppo_mcore.rollout.fast_decoder import CompactDecoder, pack_rows, sample_next

CHECK_EVERY = 8          # decode steps between host checks of "every row has stopped"
LENGTH_MULTIPLE = 64     # cache lengths are rounded up to this, so that nearby widths share graphs
KEEP_GRAPHS_FRACTION = 0.25  # auto keep_graphs: keep when weights + cache take at most this much of the GPU
CAPTURE_ERROR_MODE = "thread_local"  # other threads (reward workers, NCCL watchdog) may call CUDA meanwhile

StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def bucket_for(rows: int, max_batch_size: int | None = None) -> int:
    """The batch size a graph is captured for: the next power of two, capped at `max_batch_size`."""
    size = 1 << max(0, (rows - 1).bit_length())
    return min(size, max_batch_size) if max_batch_size else size


def keeps_graphs_across_sleep(keep_graphs: bool | None, resident_bytes: int,
                              device_bytes: int | None) -> bool:
    """Whether `sleep` keeps the weights, cache and graphs on the GPU (module doc): `keep_graphs` when
    set; auto (None): when `resident_bytes` fit in `KEEP_GRAPHS_FRACTION` of `device_bytes` (known)."""
    if keep_graphs is not None:
        return bool(keep_graphs)
    return device_bytes is not None and resident_bytes <= KEEP_GRAPHS_FRACTION * device_bytes


class GraphedDecodeStep:
    """The decoder's `decode_step` for one batch size, captured in a CUDA graph over static buffers.

    It holds the cache it was captured on (the graph writes into it), so that cache lives as long as
    the graph; the weights and rope tables are the decoder's, which must not move meanwhile."""

    def __init__(self, decoder: CompactDecoder, cache: Tensor, batch: int, pool) -> None:
        dev = decoder.device
        self.batch, self.cache = batch, cache
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.starts = torch.zeros(batch, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy kernel init)
            for _ in range(2):
                decoder.decode_step(self.tokens, self.positions, self.starts, cache)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=CAPTURE_ERROR_MODE):
            self.logits = decoder.decode_step(self.tokens, self.positions, self.starts, cache)

    def __call__(self, tokens: Tensor, positions: Tensor, starts: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.starts.copy_(starts)
        self.graph.replay()
        return self.logits


class FastEngine(RolloutEngine):
    """See the module docstring. `use_cuda_graphs` defaults to True on a GPU (never on the CPU, nor under
    the strict virtual-device mode); `keep_graphs` (None: auto) decides whether graphs survive `sleep`;
    `max_batch_size` bounds the rows decoded at once; `max_sequence_length` sizes the cache up front."""

    name = "fast"
    needs_weight_sync = True

    def __init__(self, shape, groups: ParallelGroups, *, eos_token_ids: Sequence[int], dtype: torch.dtype,
                 device: torch.device | None = None, pad_token_id: int | None = None,
                 max_batch_size: int | None = None, use_cuda_graphs: bool | None = None,
                 keep_graphs: bool | None = None, max_sequence_length: int | None = None):
        if not eos_token_ids:
            raise ValueError("the fast engine needs at least one EOS token id to stop generation")
        if max_batch_size is not None and int(max_batch_size) < 1:
            raise ValueError(f"fast engine: max_batch_size must be >= 1 (or unset), got {max_batch_size}")
        self.shape, self.groups = shape, groups
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = self.eos_token_ids[0] if pad_token_id is None else int(pad_token_id)
        if not 0 <= self.pad_token_id < shape.vocab_size:
            self.pad_token_id = 0  # an out-of-vocabulary EOS (never stop) cannot be embedded as padding
        self.max_batch_size = int(max_batch_size) if max_batch_size is not None else None
        self.max_sequence_length = int(max_sequence_length) if max_sequence_length else None
        self.device = torch.device(device) if device is not None else compute_device()
        gpu = self.device.type == "cuda" and torch.cuda.is_available()  # a real one: graphs need it
        graphs = gpu if use_cuda_graphs is None else bool(use_cuda_graphs)
        if graphs and not gpu:
            raise ValueError("fast engine: CUDA graphs need a CUDA device (a real GPU; the CPU and the strict "
                             "virtual-device mode run eager)")
        self.use_cuda_graphs = graphs
        self.keep_graphs = keep_graphs
        self.is_generator = groups.tp_rank == 0 and groups.pp_rank == 0 and groups.cp_rank == 0
        self.decoder = CompactDecoder(shape, dtype, self.device) if self.is_generator else None
        self._cache: Tensor | None = None
        self._graphs: dict[int, GraphedDecodeStep] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None  # the memory pool the captured graphs share
        self._asleep = False
        self._parked = False  # the weights sit on the CPU (a dropping sleep on a CUDA device)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, buckets: Iterable[WeightBucket], weight_version: str | None = None) -> None:
        """Copy every tensor of the stream into the decoder's views (generating rank); every rank
        iterates the buckets, since producing them is collective. Every tensor must arrive, each once.
        The copies are in place, so kept graphs replay the new weights."""
        decoder = self.decoder  # None off the generating rank, where the stream is only iterated
        copy_weight_stream(buckets, decoder.params if decoder is not None else None, engine="fast",
                           family=self.shape.family,
                           skip=None if decoder is None else lambda name: ignored_hf_name(name, decoder.layout))

    def get_weight(self, name: str) -> Tensor | None:
        """The engine's tensor `name` (HF naming) on the generating rank; None on the other ranks."""
        if self.decoder is None:
            return None
        if name not in self.decoder.params:
            raise KeyError(f"fast engine: no tensor {name!r}")
        return self.decoder.params[name]

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor | None:
        """Full-vocabulary logits `[B, S, V]` (float32) of unpadded token rows; None off the generating rank."""
        if self.decoder is None:
            return None
        return self.decoder.full_logits(tokens.to(self.device)).float()

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """See `RolloutEngine.generate`; `on_progress` is called on the generating rank after each batch of
        at most `max_batch_size` rows."""
        check_params(params)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("fast engine: every prompt needs at least one token")
        longest = max((len(p) for p in prompts), default=0)
        if longest + params.max_new_tokens > self.shape.max_position_embeddings:
            raise ValueError(f"fast engine: a prompt of {longest} tokens plus max_new_tokens={params.max_new_tokens} "
                             f"exceeds the model's {self.shape.max_position_embeddings} positions. "
                             "Lower prompt_length / response_length.")
        result = self._generate_all(prompts, params, on_progress) if self.is_generator else None
        return share_within_replica(result, self.groups)

    def _generate_all(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                      on_progress: Callable[[int], None] | None) -> list[list[Generation]]:
        if self._asleep:
            raise RuntimeError("fast engine: generate() while asleep; call wake() first")
        rows = [list(p) for p in prompts for _ in range(params.n)]
        step = self.max_batch_size or max(1, len(rows))
        # The draws happen where the data is: the GPU's generator, the CPU's under the strict mode.
        generator = make_generator(self.device, sampling_seed(params.seed, self.groups.dp_rank))
        out: list[Generation] = []
        for lo in range(0, len(rows), step):
            chunk = rows[lo: lo + step]
            out.extend(self._generate_batch(chunk, params, generator))
            if on_progress is not None:
                on_progress(len(chunk))
        return [out[i * params.n: (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate_batch(self, rows: list[list[int]], params: SamplingParams,
                        generator: torch.Generator) -> list[Generation]:
        stop_ids = list(params.stop_token_ids or self.eos_token_ids)
        real = len(rows)
        batch = bucket_for(real, self.max_batch_size) if self.use_cuda_graphs else real
        ids, starts = pack_rows(rows + [[self.pad_token_id]] * (batch - real), self.pad_token_id, self.device)
        width = ids.shape[1]
        cache = self._cache_for(batch, width + params.max_new_tokens - 1)
        step_fn = self._step_fn(batch, cache)  # capture (if new) before the prefill fills the cache
        assert self.decoder is not None  # generation runs on the generating rank, which holds the decoder
        logits = self.decoder.prefill(ids, starts, cache)
        tokens, logps = self._decode(logits, step_fn, width - starts, starts, params, stop_ids, real, generator)
        return [finish(tokens[i], logps[i], stop_ids) for i in range(real)]

    def _decode(self, logits: Tensor, step_fn: StepFn, lengths: Tensor, starts: Tensor, params: SamplingParams,
                stop_ids: list[int], real: int, generator: torch.Generator):
        """The decode loop from the prefill's logits: token t of every row sits at position lengths + t.
        Returns the real rows' tokens and log-probs (lists), up to the last step run."""
        batch, dev = logits.shape[0], logits.device
        stops = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        tokens = torch.empty(batch, params.max_new_tokens, dtype=torch.long, device=dev)
        logps = torch.empty(batch, params.max_new_tokens, dtype=torch.float32, device=dev)
        done = torch.zeros(batch, dtype=torch.bool, device=dev)
        steps = params.max_new_tokens
        for t in range(params.max_new_tokens):
            tok, lp = sample_next(logits, params.temperature, params.top_k, params.top_p, params.greedy, generator)
            tokens[:, t], logps[:, t] = tok, lp
            done |= torch.isin(tok, stops)
            if t + 1 == params.max_new_tokens:
                break
            if (t + 1) % CHECK_EVERY == 0 and bool(done[:real].all()):
                steps = t + 1
                break
            logits = step_fn(tok.masked_fill(done, self.pad_token_id), lengths + t, starts)
        return tokens[:real, :steps].tolist(), logps[:real, :steps].tolist()

    def _cache_for(self, batch: int, length: int) -> Tensor:
        """The preallocated cache, grown (and the graphs dropped) only when this request needs more. Its
        length is at least `max_sequence_length - 1` (the last token is never written) when that is set."""
        if self.max_sequence_length:
            length = max(length, self.max_sequence_length - 1)
        length = -(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
        c = self._cache
        if c is None or c.shape[2] < batch or c.shape[4] < length:
            batch = max(batch, c.shape[2] if c is not None else 0)
            length = max(length, c.shape[4] if c is not None else 0)
            self._release_cache()
            assert self.decoder is not None  # only the generating rank, which holds the decoder, generates
            c = self._cache = self.decoder.new_cache(batch, length)
        return c

    def _step_fn(self, batch: int, cache: Tensor) -> StepFn:
        decoder = self.decoder
        assert decoder is not None  # only the generating rank, which holds the decoder, generates
        if not self.use_cuda_graphs:
            return lambda tokens, positions, starts: decoder.decode_step(tokens, positions, starts, cache)
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(batch, cache)
        return self._graphs[batch]

    def _capture(self, batch: int, cache: Tensor) -> GraphedDecodeStep:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        assert self.decoder is not None  # only the generating rank, which holds the decoder, captures
        return GraphedDecodeStep(self.decoder, cache, batch, self._pool)

    def _release_cache(self) -> None:
        self._graphs, self._pool, self._cache = {}, None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ memory
    def resident_bytes(self) -> int:
        """Bytes the engine holds on its device: weights (unless parked) and cache."""
        if self.decoder is None:
            return 0
        weights = 0 if self._parked else sum(t.numel() * t.element_size() for t in self.decoder.store.values())
        cache = self._cache.numel() * self._cache.element_size() if self._cache is not None else 0
        return weights + cache

    def _device_bytes(self) -> int | None:
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(self.device).total_memory

    def keeps_graphs(self) -> bool:
        """Whether a `sleep` now would keep the weights, the cache and the graphs (module doc)."""
        return (self.decoder is not None and self.use_cuda_graphs and bool(self._graphs)
                and keeps_graphs_across_sleep(self.keep_graphs, self.resident_bytes(), self._device_bytes()))

    def sleep(self) -> None:
        """Keep the weights, cache and graphs where they are (`keeps_graphs`), or free the cache and the
        graphs and, on a CUDA device, park the weights on the CPU while the trainer trains."""
        if self.decoder is not None and not self._asleep and not self.keeps_graphs():
            self._release_cache()
            if self.device.type == "cuda":
                self.decoder.to(torch.device("cpu"))
                self._parked = True
                torch.cuda.empty_cache()
        self._asleep = True

    def wake(self) -> None:
        if self.decoder is not None and self._parked:
            self.decoder.to(self.device)
            self._parked = False
        self._asleep = False

    def shutdown(self) -> None:
        self._graphs, self._pool, self._cache, self.decoder = {}, None, None, None
