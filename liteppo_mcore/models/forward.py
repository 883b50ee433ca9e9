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
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core.pipeline_parallel import get_forward_backward_func

from liteppo_mcore.models.logprob import logprob_entropy_at, vocab_parallel_full_kl
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
    chunks: List[Optional[Tensor]] = [None] * (2 * cp)
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


def padded_seq_len(batch: SequenceBatch, groups: ParallelGroups, sequence_parallel: bool) -> int:
    multiple = 2 * groups.cp_size if groups.cp_size > 1 else 1
    if sequence_parallel:
        multiple *= groups.tp_size
    s = batch.tokens.shape[1]
    return -(-s // multiple) * multiple


def _head_outputs(output: Tensor, labels: Tensor, mask: Tensor, *, kind: str, groups: ParallelGroups,
                  temperature: float, vocab_size: int, compute_entropy: bool) -> Dict[str, Tensor]:
    if kind == "critic":
        return {"values": torch.where(mask, output.squeeze(-1).float(), torch.zeros(()))}
    v_local = output.shape[-1]
    logp, ent = logprob_entropy_at(output, labels, mask, tp_group=groups.tp_group, temperature=temperature,
                                   vocab_start=groups.tp_rank * v_local, vocab_size=vocab_size,
                                   compute_entropy=compute_entropy)
    out = {"logp": logp}
    if ent is not None:
        out["entropy"] = ent
    return out


@torch.no_grad()
def forward_per_token(model: torch.nn.Module, batch: SequenceBatch, groups: ParallelGroups, *, kind: str = "actor",
                      temperature: float = 1.0, vocab_size: int, micro_batch_size: int,
                      compute_entropy: bool = True, sequence_parallel: bool = False) -> Dict[str, Tensor]:
    """Per-token `logp` (and `entropy`) for the actor/reference, or `values` for the critic, as `[B, T]`
    float32 tensors on every rank (T = longest response of the batch)."""
    if kind not in ("actor", "critic"):
        raise ValueError(f"kind must be 'actor' or 'critic', got {kind!r}")
    if groups.pp_size > 1 and batch.size % micro_batch_size:
        raise ValueError(f"with pipeline parallelism the batch ({batch.size}) must split into whole "
                         f"micro-batches of {micro_batch_size}")
    seq_len = padded_seq_len(batch, groups, sequence_parallel)
    tokens, labels, mask = shifted_labels_and_mask(batch, seq_len)
    tokens, labels, mask = (cp_split(x, groups.cp_rank, groups.cp_size) for x in (tokens, labels, mask))
    micro = [(tokens[i:i + micro_batch_size], labels[i:i + micro_batch_size], mask[i:i + micro_batch_size])
             for i in range(0, batch.size, micro_batch_size)]
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
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=len(micro), seq_length=seq_len, micro_batch_size=micro_batch_size,
            forward_only=True, collect_non_loss_data=True)
    finally:
        model.train(was_training)
    keys = ("values",) if kind == "critic" else (("logp", "entropy") if compute_entropy else ("logp",))
    width = batch.response_width()
    results = {}
    for key in keys:
        if groups.is_last_stage:
            local = torch.cat([s[key] for s in store], dim=0)
            value = to_response_coords(cp_gather(local, groups), batch, width).float()
        else:
            value = torch.zeros(batch.size, width, dtype=torch.float32)
        results[key] = _from_last_stage(value, groups)
    return results


def _from_last_stage(x: Tensor, groups: ParallelGroups) -> Tensor:
    if groups.pp_size == 1:
        return x
    src = dist.get_global_rank(groups.pp_group, groups.pp_size - 1)
    dist.broadcast(x, src=src, group=groups.pp_group)
    return x


@torch.no_grad()
def forward_full_kl(policy: torch.nn.Module, reference: torch.nn.Module, batch: SequenceBatch,
                    groups: ParallelGroups, *, temperature: float, vocab_size: int, micro_batch_size: int,
                    sequence_parallel: bool = False) -> Tensor:
    """Exact per-token `KL(policy || reference)` over the whole vocabulary (`kl_penalty: full`), `[B, T]`
    on every rank. Both models' logits of a micro-batch are needed at once, so this runs the two
    forward passes directly (no pipeline schedule): pipeline parallelism is refused at validation."""
    if groups.pp_size != 1:
        raise ValueError("kl_penalty=full needs parallel.pp=1 (both models' logits at the same positions)")
    seq_len = padded_seq_len(batch, groups, sequence_parallel)
    tokens, _, mask = (cp_split(x, groups.cp_rank, groups.cp_size) for x in shifted_labels_and_mask(batch, seq_len))
    parts = []
    modes = [m.training for m in (policy, reference)]
    policy.eval()
    reference.eval()
    for i in range(0, batch.size, micro_batch_size):
        tok, msk = tokens[i:i + micro_batch_size], mask[i:i + micro_batch_size]
        lp, lq = policy(tok, None, attention_mask=None), reference(tok, None, attention_mask=None)
        kl = torch.zeros(msk.shape, dtype=torch.float32, device=lp.device)
        kl[msk] = vocab_parallel_full_kl(lp[msk], lq[msk], tp_group=groups.tp_group, temperature=temperature,
                                         vocab_start=groups.tp_rank * lp.shape[-1], vocab_size=vocab_size).float()
        parts.append(kl.cpu())
    policy.train(modes[0])
    reference.train(modes[1])
    full = cp_gather(torch.cat(parts), groups)
    return to_response_coords(full, batch, batch.response_width())
