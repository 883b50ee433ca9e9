"""The `mcore` rollout engine: generation with the live megatron actor itself (no copy, no weight sync).

Why our own decode loop rather than megatron-core's inference engines: the dynamic engine needs
flash-attn (not on CPU), and the legacy static engine's log-probs are of the unscaled logits (not of
`softmax(logits / temperature)`), need an inference wrapper and context around the model, and leave
the vocabulary gather to it. This loop runs the actor exactly as the trainer does
(`models.forward`): megatron's pipeline schedule in forward-only mode over right-padded sequences
(causal attention: padding after a sequence never changes its logits), CP-split sequences, TP-sharded
vocabulary. Each new token is a FULL RECOMPUTE of the active sequences (no KV cache): quadratic in the
response length, which suits the CPU tests and single-GPU debugging this engine is for; use hf or
sglang for long responses.

Per step, the last stage picks each active sequence's last-position logits (`[b, V/TP]`; under CP the
CP rank holding that position contributes them, one all-reduce), gathers the vocabulary over TP only to
choose the token (argmax, or temperature / top-k / top-p sampling from a seeded generator), and computes
the token's log-prob with the trainer's vocab-parallel function (`models.logprob`), so engine and
trainer log-probs come from the same code. Tokens and log-probs are broadcast from TP rank 0 over TP
and from the last stage over PP; every rank of a replica returns the same generations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from liteppo_mcore.models.forward import cp_split, seq_multiple
from liteppo_mcore.models.logprob import vocab_parallel_logprob_entropy
from liteppo_mcore.parallel.device import compute_device, make_generator
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.rollout.engine import (
    Generation,
    RolloutEngine,
    SamplingParams,
    WeightBucket,
    check_params,
    sampling_seed,
)
from liteppo_mcore.rollout.sampling import filtered_logits


def choose_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """Next tokens `[b]` from full-vocabulary logits `[b, V]`: argmax when greedy, else sampled."""
    if params.greedy:
        return logits.argmax(dim=-1)
    z = filtered_logits(logits, params.temperature, params.top_k, params.top_p)
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator).squeeze(-1)


class MCoreEngine(RolloutEngine):
    """See the module docstring."""

    name = "mcore"
    needs_weight_sync = False

    def __init__(self, model: torch.nn.Module, groups: ParallelGroups, *, vocab_size: int,
                 eos_token_ids: Sequence[int], max_sequence_length: int, sequence_parallel: bool = False):
        if not eos_token_ids:
            raise ValueError("the mcore engine needs at least one EOS token id to stop generation")
        self.model, self.groups = model, groups
        self.vocab_size, self.max_sequence_length = int(vocab_size), int(max_sequence_length)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.sequence_parallel = sequence_parallel
        self._device = compute_device()  # (not a parameter's: on later pipeline stages the first may be a norm)

    def update_weights(self, buckets: Iterable[WeightBucket], weight_version: str | None = None) -> None:
        """Nothing to load (the engine IS the actor); the buckets are drained so that ranks that were
        handed a stream still take part in its collectives."""
        for _ in buckets:
            pass

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """See `RolloutEngine.generate`. All responses are decoded in one loop and returned together, with
        no progress reported: `on_progress` is never called."""
        check_params(params)
        longest = max((len(p) for p in prompts), default=0)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("mcore engine: every prompt needs at least one token")
        if longest + params.max_new_tokens > self.max_sequence_length:
            raise ValueError(f"mcore engine: a prompt of {longest} tokens plus max_new_tokens="
                             f"{params.max_new_tokens} exceeds the model's {self.max_sequence_length} positions. "
                             "Lower prompt_length / response_length.")
        stop_ids = set(params.stop_token_ids or self.eos_token_ids)
        seqs = [list(p) for p in prompts for _ in range(params.n)]
        new_tokens: list[list[int]] = [[] for _ in seqs]
        logprobs: list[list[float]] = [[] for _ in seqs]
        done = [False] * len(seqs)
        generator = make_generator(self._device, sampling_seed(params.seed, self.groups.dp_rank))
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(params.max_new_tokens):
                active = [i for i, d in enumerate(done) if not d]
                if not active:
                    break
                tokens, logp = self._step([seqs[i] for i in active], params, generator)
                for i, tok, lp in zip(active, tokens.tolist(), logp.tolist()):
                    seqs[i].append(tok)
                    new_tokens[i].append(tok)
                    logprobs[i].append(lp)
                    done[i] = tok in stop_ids
        finally:
            self.model.train(was_training)
        gens = [Generation(new_tokens[i], logprobs[i], "stop" if done[i] else "length") for i in range(len(seqs))]
        return [gens[i * params.n: (i + 1) * params.n] for i in range(len(prompts))]

    def _step(self, rows: list[list[int]], params: SamplingParams, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Next token and its log-prob for each row, identical on every rank of the replica."""
        g = self.groups
        b = len(rows)
        tokens = torch.zeros(b, dtype=torch.long)
        logp = torch.zeros(b, dtype=torch.float32)
        shard = self._last_logits(rows)  # [b, V/TP] on the last stage, None elsewhere
        if shard is not None:
            full = self._gather_vocab(shard)
            chosen = choose_tokens(full, params, generator)
            lp, _ = vocab_parallel_logprob_entropy(
                shard, chosen, tp_group=g.tp_group if g.tp_size > 1 else None, temperature=params.temperature,
                vocab_start=g.tp_rank * shard.shape[1], vocab_size=self.vocab_size, compute_entropy=False)
            tokens, logp = chosen.cpu(), lp.float().cpu()
        # token ids are exact in float64; one tensor, one broadcast per group
        packed = torch.stack([tokens.double(), logp.double()], dim=1).to(self._device)
        # a group of more than one rank is never None (see ParallelGroups)
        if g.tp_size > 1:  # same inputs and generator on every TP rank; broadcast anyway, it costs nothing
            assert g.tp_group is not None
            dist.broadcast(packed, src=dist.get_global_rank(g.tp_group, 0), group=g.tp_group)
        if g.pp_size > 1:
            assert g.pp_group is not None
            dist.broadcast(packed, src=dist.get_global_rank(g.pp_group, g.pp_size - 1), group=g.pp_group)
        packed = packed.cpu()
        return packed[:, 0].long(), packed[:, 1].float()

    def _gather_vocab(self, shard: Tensor) -> Tensor:
        """Full-vocabulary logits `[b, V]` (padding columns dropped): only to choose the token."""
        g = self.groups
        if g.tp_size > 1:
            parts = [torch.empty_like(shard) for _ in range(g.tp_size)]
            dist.all_gather(parts, shard.contiguous(), group=g.tp_group)
            shard = torch.cat(parts, dim=-1)
        return shard[:, : self.vocab_size]

    def _seq_len(self, longest: int) -> int:
        multiple = seq_multiple(self.groups, self.sequence_parallel)
        return -(-longest // multiple) * multiple

    def _last_logits(self, rows: list[list[int]]) -> Tensor | None:
        """Each row's logits at its last position, `[b, V/TP]` in the model's dtype (last stage only)."""
        g = self.groups
        b, seq_len = len(rows), self._seq_len(max(len(r) for r in rows))
        tokens = torch.zeros(b, seq_len, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        last = torch.tensor([len(r) - 1 for r in rows])
        positions = cp_split(torch.arange(seq_len).expand(b, seq_len), g.cp_rank, g.cp_size)
        local = cp_split(tokens, g.cp_rank, g.cp_size).to(self._device)
        hit = positions == last[:, None]  # [b, S_local]: where this CP rank holds a row's last position

        def forward_step(data_iterator, model_chunk):
            output = model_chunk(next(data_iterator), None, attention_mask=None)

            def collect(output_tensor, non_loss_data=False):
                picked = output_tensor.new_zeros(b, output_tensor.shape[-1])
                rows_idx, cols = hit.nonzero(as_tuple=True)
                picked[rows_idx.to(picked.device)] = output_tensor[rows_idx, cols]
                return picked

            return output, collect

        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([local]), model=[self.model], num_microbatches=1,
            seq_length=seq_len, micro_batch_size=b, forward_only=True, collect_non_loss_data=True)
        if not g.is_last_stage:
            return None
        picked = store[0]
        if g.cp_size > 1:  # exactly one CP rank contributes each row; the others add zeros
            dist.all_reduce(picked, group=g.cp_group)
        return picked
