"""Run a model over (prompt, response) sequences and return per-token scalars on response positions.

One function serves every layout: micro-batches go through megatron's pipeline schedule (forward
only), TP shards the vocabulary (log-probs are vocab-parallel and never gather it), CP splits each
sequence into 2*cp chunks (labels shifted on the whole sequence BEFORE the split) and only per-token
scalars are gathered back, never logits. Every rank returns the same `[B, T]` results.

Batch format: `tokens [B, S]` = prompt then response, right-padded; `prompt_lens [B]`;
`response_lens [B]`. Response token t of sequence i sits at position p_i + t and is predicted by the
logits (and valued by the critic) at position p_i + t - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from liteppo_mcore.models.logprob import logprob_entropy_at, vocab_parallel_full_kl
from liteppo_mcore.models.microbatch import MicroPlan, plan_micro_batches
from liteppo_mcore.parallel.device import collective_device, compute_device
from liteppo_mcore.parallel.mcore import ParallelGroups


@dataclass
class SequenceBatch:
    tokens: Tensor         # [B, S] long
    prompt_lens: Tensor    # [B] long
    response_lens: Tensor  # [B] long

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def response_width(self) -> int:
        return int(self.response_lens.max().item()) if self.size else 0


def shifted_labels_and_mask(batch: SequenceBatch, seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens padded to `seq_len`, labels (next token) and the mask of positions that predict a
    response token, all `[B, seq_len]`, computed on the WHOLE sequence (before any CP split)."""
    b, s = batch.tokens.shape
    tokens = torch.zeros(b, seq_len, dtype=torch.long)
    tokens[:, :s] = batch.tokens
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    pos = torch.arange(seq_len)[None, :]
    start = (batch.prompt_lens - 1)[:, None]
    mask = (pos >= start) & (pos < start + batch.response_lens[:, None])
    return tokens, labels, mask


def cp_split(x: Tensor, cp_rank: int, cp_size: int) -> Tensor:
    """This CP rank's part of `[B, S, ...]`: chunks r and 2*cp-1-r of 2*cp (load-balanced causal)."""
    if cp_size == 1:
        return x
    chunks = x.chunk(2 * cp_size, dim=1)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=1)


def cp_gather(x: Tensor, groups: ParallelGroups) -> Tensor:
    """Inverse of cp_split for per-token scalars `[B, S_local]` -> `[B, S]` on every CP rank."""
    cp = groups.cp_size
    if cp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous(), group=groups.cp_group)
    chunks: list[Tensor | None] = [None] * (2 * cp)
    for r, part in enumerate(parts):
        chunks[r], chunks[2 * cp - 1 - r] = part.chunk(2, dim=1)
    return torch.cat(chunks, dim=1)  # type: ignore[arg-type]


def to_response_coords(full: Tensor, batch: SequenceBatch, width: int) -> Tensor:
    """`[B, S]` values at predicting positions -> `[B, width]` per response token (0 past L_i)."""
    t = torch.arange(width)[None, :]
    idx = (batch.prompt_lens - 1)[:, None] + t
    valid = t < batch.response_lens[:, None]
    out = full.gather(1, idx.clamp(max=full.shape[1] - 1))
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype))


def to_sequence_coords(resp: Tensor, batch: SequenceBatch, seq_len: int) -> Tensor:
    """Inverse of to_response_coords: `[B, T]` per response token -> `[B, seq_len]` at the positions
    that predict them (0 elsewhere), so per-token training targets line up with the logits."""
    b, width = resp.shape
    out = resp.new_zeros(b, seq_len)
    t = torch.arange(width)[None, :].expand(b, width)
    valid = t < batch.response_lens[:, None]
    idx = (batch.prompt_lens - 1)[:, None] + t
    rows = torch.arange(b)[:, None].expand(b, width)
    out[rows[valid], idx[valid]] = resp[valid]
    return out


def seq_multiple(groups: ParallelGroups, sequence_parallel: bool) -> int:
    """What every micro-batch's sequence length must be a multiple of: 2*cp chunks, times tp under SP."""
    multiple = 2 * groups.cp_size if groups.cp_size > 1 else 1
    return multiple * (groups.tp_size if sequence_parallel else 1)


def _head_outputs(output: Tensor, labels: Tensor, mask: Tensor, *, kind: str, groups: ParallelGroups,
                  temperature: float, vocab_size: int, compute_entropy: bool) -> dict[str, Tensor]:
    if kind == "critic":
        return {"values": torch.where(mask, output.squeeze(-1).float(), 0.0)}
    v_local = output.shape[-1]
    logp, ent = logprob_entropy_at(output, labels, mask, tp_group=groups.tp_group, temperature=temperature,
                                   vocab_start=groups.tp_rank * v_local, vocab_size=vocab_size,
                                   compute_entropy=compute_entropy)
    out = {"logp": logp}
    if ent is not None:
        out["entropy"] = ent
    return out


def _plans(batch: SequenceBatch, groups: ParallelGroups, micro_batch_size: int, max_tokens: int | None,
           sequence_parallel: bool) -> list[MicroPlan]:
    """The same length-sorted, token-bounded micro-batches as training (models/microbatch.py)."""
    return plan_micro_batches(batch.prompt_lens + batch.response_lens, micro_batch_size=micro_batch_size,
                              max_tokens=max_tokens, pipeline=groups.pp_size > 1,
                              multiple=seq_multiple(groups, sequence_parallel))


def _sub_batch(batch: SequenceBatch, plan: MicroPlan) -> SequenceBatch:
    """The plan's rows, then empty rows (one prompt token, no response) up to `plan.num_rows`."""
    rows = plan.rows.long()
    extra = plan.num_rows - rows.numel()
    width = min(batch.tokens.shape[1], plan.seq_len)
    tokens = batch.tokens[rows, :width]
    prompt_lens, response_lens = batch.prompt_lens[rows], batch.response_lens[rows]
    if extra > 0:
        tokens = torch.cat([tokens, tokens.new_zeros(extra, width)])
        prompt_lens = torch.cat([prompt_lens, prompt_lens.new_ones(extra)])
        response_lens = torch.cat([response_lens, response_lens.new_zeros(extra)])
    return SequenceBatch(tokens, prompt_lens, response_lens)


def _model_inputs(batch: SequenceBatch, plan: MicroPlan, groups: ParallelGroups,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens, labels and mask of one micro-batch: built on the host, this CP rank's part, on `device`."""
    built = shifted_labels_and_mask(_sub_batch(batch, plan), plan.seq_len)
    return tuple(cp_split(x, groups.cp_rank, groups.cp_size).to(device, non_blocking=True)  # type: ignore[return-value]
                 for x in built)


def _scatter_rows(out: Tensor, local: Tensor, batch: SequenceBatch, plan: MicroPlan, groups: ParallelGroups) -> None:
    """Write a micro-batch's per-position scalars `[b, S_plan/cp]` (on the device) into the host
    result `out [B, T]` at the plan's rows, in response coordinates."""
    full = cp_gather(local.contiguous(), groups).float().cpu()
    n = plan.rows.numel()
    sub = _sub_batch(batch, MicroPlan(plan.rows, plan.seq_len, n))
    out[plan.rows.long()] = to_response_coords(full[:n], sub, out.shape[1])


@torch.no_grad()
def forward_per_token(model: torch.nn.Module, batch: SequenceBatch, groups: ParallelGroups, *, kind: str = "actor",
                      temperature: float = 1.0, vocab_size: int, micro_batch_size: int,
                      max_tokens_per_micro_batch: int | None = None, compute_entropy: bool = True,
                      sequence_parallel: bool = False) -> dict[str, Tensor]:
    """Per-token `logp` (and `entropy`) for the actor/reference, or `values` for the critic, as `[B, T]`
    float32 host tensors on every rank (T = longest response of the batch).

    The batch is built on the host; each micro-batch (longest first, at most `micro_batch_size` rows
    and `max_tokens_per_micro_batch` padded tokens, as in training) goes to the model's device, and
    only per-token scalars come back."""
    if kind not in ("actor", "critic"):
        raise ValueError(f"kind must be 'actor' or 'critic', got {kind!r}")
    keys = ("values",) if kind == "critic" else (("logp", "entropy") if compute_entropy else ("logp",))
    width = batch.response_width()
    results = {key: torch.zeros(batch.size, width, dtype=torch.float32) for key in keys}
    if batch.size == 0:
        return results
    device = compute_device()
    plans = _plans(batch, groups, micro_batch_size, max_tokens_per_micro_batch, sequence_parallel)
    micro = [_model_inputs(batch, plan, groups, device) for plan in plans]
    head = partial(_head_outputs, kind=kind, groups=groups, temperature=temperature, vocab_size=vocab_size,
                   compute_entropy=compute_entropy)

    def forward_step(data_iterator, model_chunk):
        tok, lab, msk = next(data_iterator)
        output = model_chunk(tok, None, attention_mask=None)

        def collect(output_tensor, non_loss_data=False):
            return head(output_tensor, lab, msk)

        return output, collect

    was_training = model.training
    model.eval()
    try:
        # With PP every plan has the same shape (plan_micro_batches); without, the shape is not used.
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=len(micro), seq_length=plans[0].seq_len, micro_batch_size=plans[0].num_rows,
            forward_only=True, collect_non_loss_data=True)
    finally:
        model.train(was_training)
    if groups.is_last_stage:
        for plan, outputs in zip(plans, store):
            for key in keys:
                _scatter_rows(results[key], outputs[key], batch, plan, groups)
    return {key: _from_last_stage(value, groups) for key, value in results.items()}


def _from_last_stage(x: Tensor, groups: ParallelGroups) -> Tensor:
    """The last pipeline stage's host tensor `x` on every stage (a host tensor again)."""
    if groups.pp_size == 1:
        return x
    assert groups.pp_group is not None  # a group of more than one rank is never None (see ParallelGroups)
    src = dist.get_global_rank(groups.pp_group, groups.pp_size - 1)
    buffer = x.to(collective_device(groups.pp_group))
    dist.broadcast(buffer, src=src, group=groups.pp_group)
    return buffer.cpu()


@torch.no_grad()
def forward_full_kl(policy: torch.nn.Module, reference: torch.nn.Module, batch: SequenceBatch,
                    groups: ParallelGroups, *, temperature: float, vocab_size: int, micro_batch_size: int,
                    max_tokens_per_micro_batch: int | None = None, sequence_parallel: bool = False) -> Tensor:
    """Exact per-token `KL(policy || reference)` over the whole vocabulary (`kl_penalty: full`), `[B, T]`
    host tensor on every rank. Both models' logits of a micro-batch are needed at once, so this runs the
    two forward passes directly (no pipeline schedule): pipeline parallelism is refused at validation."""
    if groups.pp_size != 1:
        raise ValueError("kl_penalty=full needs parallel.pp=1 (both models' logits at the same positions)")
    out = torch.zeros(batch.size, batch.response_width(), dtype=torch.float32)
    if batch.size == 0:
        return out
    device = compute_device()
    modes = [m.training for m in (policy, reference)]
    policy.eval()
    reference.eval()
    try:
        for plan in _plans(batch, groups, micro_batch_size, max_tokens_per_micro_batch, sequence_parallel):
            tok, _, msk = _model_inputs(batch, plan, groups, device)
            lp, lq = policy(tok, None, attention_mask=None), reference(tok, None, attention_mask=None)
            kl = torch.zeros(msk.shape, dtype=torch.float32, device=device)
            kl[msk] = vocab_parallel_full_kl(lp[msk], lq[msk], tp_group=groups.tp_group, temperature=temperature,
                                             vocab_start=groups.tp_rank * lp.shape[-1],
                                             vocab_size=vocab_size).float()
            _scatter_rows(out, kl, batch, plan, groups)
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    return out
