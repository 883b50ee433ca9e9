"""Run a model over (prompt, response) sequences and return per-token scalars on response positions.

One function serves every layout: micro-batches go through megatron's pipeline schedule (forward
only), TP shards the vocabulary (log-probs are vocab-parallel and never gather it; they are computed
from the last hidden states chunk by chunk, so the `[tokens, vocab]` logits never exist whole), CP splits each
sequence into 2*cp chunks (labels shifted on the whole sequence BEFORE the split) and only per-token
scalars are gathered back, never logits. Every rank returns the same `[B, T]` results.

Batch format: `tokens [B, S]` = prompt then response, right-padded; `prompt_lens [B]`;
`response_lens [B]`. Response token t of sequence i sits at position p_i + t and is predicted by the
logits (and valued by the critic) at position p_i + t - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from liteppo_mcore.models.logprob import logprob_entropy_at, vocab_parallel_full_kl_from_hidden
from liteppo_mcore.models.microbatch import MicroPlan, plan_micro_batches
from liteppo_mcore.models.output_head import hidden_states_out, used_weight
from liteppo_mcore.models.packing import (
    PackPlan,
    cp_gather_packed,
    pack_micro_batches,
    pack_multiples,
    packed_seq_params,
    response_index,
)
from liteppo_mcore.parallel.device import collective_device, compute_device, to_device
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


def _head_outputs(output: Tensor, labels: Tensor, mask: Tensor, weight: Tensor | None, *, kind: str,
                  groups: ParallelGroups, temperature: float, vocab_size: int,
                  compute_entropy: bool) -> dict[str, Tensor]:
    """The critic's values from its `[b, s, 1]` output; the actor's log-probs (and entropy) from its last
    hidden states `[b, s, H]` and output weight `[V/TP, H]` (models/output_head.py)."""
    if kind == "critic":
        return {"values": torch.where(mask, output.squeeze(-1).float(), 0.0)}
    assert weight is not None  # the actor's pass runs under hidden_states_out
    logp, ent = logprob_entropy_at(output, labels, mask, weight=weight, tp_group=groups.tp_group,
                                   temperature=temperature, vocab_start=groups.tp_rank * weight.shape[0],
                                   vocab_size=vocab_size, compute_entropy=compute_entropy)
    out = {"logp": logp}
    if ent is not None:
        out["entropy"] = ent
    return out


def micro_batch_plans(batch: SequenceBatch, groups: ParallelGroups, micro_batch_size: int, max_tokens: int | None,
           sequence_parallel: bool, pack: bool = False) -> Sequence[MicroPlan | PackPlan]:
    """The same micro-batches as training: length-sorted and token-bounded padded ones
    (models/microbatch.py), or packed rows of at most `max_tokens` tokens (models/packing.py)."""
    seq_lens = batch.prompt_lens + batch.response_lens
    if pack:
        seg, row = pack_multiples(groups.cp_size, groups.tp_size, sequence_parallel)
        bound = max_tokens if max_tokens is not None else micro_batch_size * int(seq_lens.max())
        return pack_micro_batches(seq_lens, max_tokens=bound, seg_multiple=seg, row_multiple=row,
                                  pipeline=groups.pp_size > 1)
    return plan_micro_batches(seq_lens, micro_batch_size=micro_batch_size, max_tokens=max_tokens,
                              pipeline=groups.pp_size > 1, multiple=seq_multiple(groups, sequence_parallel))


def schedule_shape(plans: Sequence[MicroPlan | PackPlan]) -> tuple[int, int]:
    """(seq_length, micro_batch_size) for megatron's schedule: the activations' shape between pipeline
    stages (every plan has the same under PP; without PP the schedule does not use it)."""
    first = plans[0]
    if isinstance(first, PackPlan):
        return max(p.row_len for p in plans), 1  # type: ignore[union-attr]
    return max(p.seq_len for p in plans), max(p.num_rows for p in plans)  # type: ignore[union-attr]


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


def _model_inputs(batch: SequenceBatch, plan: MicroPlan | PackPlan, groups: ParallelGroups,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor, object]:
    """Tokens, labels and mask of one micro-batch, built on the host, this CP rank's part, on `device`,
    and its PackedSeqParams (None when padded)."""
    if isinstance(plan, PackPlan):
        item = packed_micro_batch(batch, plan, groups, device)
        return item["tokens"], item["labels"], item["mask"], item["packed_seq_params"]
    built = [cp_split(x, groups.cp_rank, groups.cp_size)
             for x in shifted_labels_and_mask(_sub_batch(batch, plan), plan.seq_len)]
    tok, lab, msk = (x.to(device, non_blocking=True) for x in built)
    return tok, lab, msk, None


def packed_micro_batch(batch: SequenceBatch, plan: PackPlan, groups: ParallelGroups, device: torch.device,
                       per_token: dict[str, Tensor] | None = None) -> dict:
    """One packed row (models/packing.py) of the batch's sequences `plan.rows`, this CP rank's tokens, on
    `device`: `tokens`, `labels` (the next token of the same sequence), `mask` (positions predicting a
    response token), each response-coordinate tensor of `per_token` (`[B, T]`) at the positions
    predicting its tokens (0 elsewhere), `seq_token_counts` (each position's sequence's response
    length; 0 in the trailing padding), all `[1, row_len / cp]`, and `packed_seq_params`.

    Built on the host in a fixed number of numpy gathers whatever the number of segments (each token
    is addressed by (segment, position within it) from `packing.packed_positions`), then moved in one
    copy per dtype: the integer rows, the mask, the per-token floats; views of those copies."""
    params = packed_seq_params(plan, device, groups.cp_rank, groups.cp_size)
    seg, pos = params.liteppo_positions  # numpy: the index arithmetic stays on the host, in a few array ops
    k = len(plan.seg_lens)
    real = seg < k  # the trailing padding segment is number k
    row = plan.rows.numpy()[np.minimum(seg, k - 1)]  # each token's sequence in the batch
    n, s = batch.tokens.shape
    width = min(s, max(plan.seg_lens))
    prompt, response = batch.prompt_lens.numpy()[row], batch.response_lens.numpy()[row]
    t = pos - (prompt - 1)  # the response token each position predicts
    mask = real & (t >= 0) & (t < response)
    # gathers from the flattened [B, S] / [B, T] arrays; index `numel` is an appended 0 (outside the sequences)
    tokens = np.append(batch.tokens.numpy().reshape(-1), 0)
    ints = np.stack([tokens[np.where(real & (col < width), row * s + col, n * s)] for col in (pos, pos + 1)]
                    + [np.where(real, response, 0)]).astype(np.int64, copy=False)
    moved = [to_device(torch.from_numpy(x), device) for x in (ints, mask)]
    item: dict = {"tokens": moved[0][0:1], "labels": moved[0][1:2], "mask": moved[1][None],
                  "seq_token_counts": moved[0][2:3]}
    if per_token:
        floats = np.stack([np.where(mask, v.float().numpy()[row, np.clip(t, 0, v.shape[1] - 1)], 0.0)
                           for v in per_token.values()]).astype(np.float32, copy=False)
        item.update(zip(per_token, to_device(torch.from_numpy(floats), device).split(1)))
    item["packed_seq_params"] = params
    return item


def _scatter_rows(out: Tensor, local: Tensor, batch: SequenceBatch, plan: MicroPlan | PackPlan,
                  groups: ParallelGroups) -> None:
    """Write a micro-batch's per-position scalars (this CP rank's, on the device) into the host result
    `out [B, T]` at the plan's rows, in response coordinates."""
    if isinstance(plan, PackPlan):
        row = cp_gather_packed(local.contiguous(), plan, groups.cp_group, groups.cp_size).float().cpu()[0]
        rows = plan.rows.long()
        idx, valid = response_index(plan, batch.prompt_lens[rows], batch.response_lens[rows], out.shape[1])
        out[rows] = torch.where(valid, row[idx], torch.zeros(()))
        return
    full = cp_gather(local.contiguous(), groups).float().cpu()
    n = plan.rows.numel()
    sub = _sub_batch(batch, MicroPlan(plan.rows, plan.seq_len, n))
    out[plan.rows.long()] = to_response_coords(full[:n], sub, out.shape[1])


@torch.no_grad()
def forward_per_token(model: torch.nn.Module, batch: SequenceBatch, groups: ParallelGroups, *, kind: str = "actor",
                      temperature: float = 1.0, vocab_size: int, micro_batch_size: int,
                      max_tokens_per_micro_batch: int | None = None, compute_entropy: bool = True,
                      sequence_parallel: bool = False, pack: bool = False) -> dict[str, Tensor]:
    """Per-token `logp` (and `entropy`) for the actor/reference, or `values` for the critic, as `[B, T]`
    float32 host tensors on every rank (T = longest response of the batch).

    The batch is built on the host; each micro-batch (as in training: longest first, at most
    `micro_batch_size` rows and `max_tokens_per_micro_batch` padded tokens, or with `pack` packed rows
    of at most `max_tokens_per_micro_batch` tokens) goes to the model's device, and only per-token
    scalars come back."""
    if kind not in ("actor", "critic"):
        raise ValueError(f"kind must be 'actor' or 'critic', got {kind!r}")
    keys = ("values",) if kind == "critic" else (("logp", "entropy") if compute_entropy else ("logp",))
    width = batch.response_width()
    results = {key: torch.zeros(batch.size, width, dtype=torch.float32) for key in keys}
    if batch.size == 0:
        return results
    device = compute_device()
    plans = micro_batch_plans(batch, groups, micro_batch_size, max_tokens_per_micro_batch, sequence_parallel, pack)
    micro = [_model_inputs(batch, plan, groups, device) for plan in plans]
    head = partial(_head_outputs, kind=kind, groups=groups, temperature=temperature, vocab_size=vocab_size,
                   compute_entropy=compute_entropy)

    def forward_step(data_iterator, model_chunk):
        tok, lab, msk, params = next(data_iterator)
        with hidden_states_out(model_chunk, enabled=kind == "actor") as layer:
            output = model_chunk(tok, None, attention_mask=None, packed_seq_params=params)

        def collect(output_tensor, non_loss_data=False):
            return head(output_tensor, lab, msk, used_weight(layer) if kind == "actor" else None)

        return output, collect

    was_training = model.training
    model.eval()
    try:
        seq_length, rows = schedule_shape(plans)
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=rows,
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
                    max_tokens_per_micro_batch: int | None = None, sequence_parallel: bool = False,
                    pack: bool = False) -> Tensor:
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
        plans = micro_batch_plans(batch, groups, micro_batch_size, max_tokens_per_micro_batch, sequence_parallel, pack)
        for plan in plans:
            tok, _, msk, params = _model_inputs(batch, plan, groups, device)
            with hidden_states_out(policy) as p_layer, hidden_states_out(reference) as q_layer:
                hp = policy(tok, None, attention_mask=None, packed_seq_params=params)
                hq = reference(tok, None, attention_mask=None, packed_seq_params=params)
            wp, wq = used_weight(p_layer), used_weight(q_layer)
            kl = torch.zeros(msk.shape, dtype=torch.float32, device=device)
            kl[msk] = vocab_parallel_full_kl_from_hidden(hp[msk], wp, hq[msk], wq, tp_group=groups.tp_group,
                                                         temperature=temperature,
                                                         vocab_start=groups.tp_rank * wp.shape[0],
                                                         vocab_size=vocab_size).float()
            _scatter_rows(out, kl, batch, plan, groups)
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    return out
