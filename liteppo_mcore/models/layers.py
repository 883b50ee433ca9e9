"""Layers the local spec needs beyond megatron-core's own: an RMSNorm that works with sequence
parallelism, and a torch scaled-dot-product core attention that supports GQA and context parallelism
without Transformer Engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class RMSNorm(torch.nn.Module):
    """RMSNorm of the hidden states, computed in fp32 like the Hugging Face models we load.

    megatron's torch-norm wrapper refuses sequence parallelism; this one tags its weight
    `sequence_parallel` so that megatron all-reduces its gradient over the TP group (each TP rank
    sees only its slice of the sequence).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object):
        super().__init__()
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        # megatron reads this tag off the parameter; torch's Parameter type does not declare it
        self.weight.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class QKRMSNorm(RMSNorm):
    """Per-head RMSNorm of queries and keys (Qwen3). Heads are never split by sequence, so its
    gradient is complete on every TP rank and it is not tagged for sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object):
        super().__init__(config, hidden_size, eps)
        self.weight.sequence_parallel = False  # type: ignore[attr-defined]  # megatron's tag, as above


class _GatherSeqOverCP(torch.autograd.Function):
    """All-gather a [s_local, ...] tensor over the CP group into global sequence order.

    Rank r holds chunks r and 2*cp-1-r of the 2*cp chunks of the sequence (megatron's load-balanced
    split). The backward sums the gradient over the CP group (every rank's queries attend to every
    rank's keys) and keeps this rank's two chunks.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        cp, rank = group.size(), group.rank()
        parts = [torch.empty_like(x) for _ in range(cp)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        # rank r's halves are chunks r and 2*cp-1-r: the first halves in rank order, then the second in reverse
        halves = [part.chunk(2, dim=0) for part in parts]
        chunks = [first for first, _ in halves] + [second for _, second in reversed(halves)]
        ctx.group, ctx.cp, ctx.rank = group, cp, rank
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        chunks = grad.chunk(2 * ctx.cp, dim=0)
        return torch.cat([chunks[ctx.rank], chunks[2 * ctx.cp - 1 - ctx.rank]], dim=0), None


def cp_local_positions(seq_len_local: int, cp_rank: int, cp_size: int, device=None) -> Tensor:
    """Global positions of this CP rank's tokens: chunks r and 2*cp-1-r of 2*cp equal chunks."""
    chunk = seq_len_local // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk, device=device)])


class SDPACoreAttention(MegatronModule):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention`, causal only.

    Same constructor and forward contract as megatron's DotProductAttention: q [sq, b, np, hn],
    k/v [sk, b, ng, hn] (this rank's heads), returns [sq, b, np*hn]. With context parallelism, keys and
    values are all-gathered over the CP group and the causal mask uses global positions. Packed
    sequences (megatron's THD layout, `packed_seq_params` from models/packing.py: q [t, np, hn]) attend
    causally within their own segment of the row, through one SDPA call with a block-diagonal causal
    mask (built once per micro-batch), which is exact and keeps the kernel's speed on a CPU.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPACoreAttention supports causal attention only, got {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("attention dropout must be 0 (PPO ratios must be exactly 1 before an update)")
        self.softmax_scale = softmax_scale
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if config.context_parallel_size > 1 and self.cp_group is None:
            # megatron's Attention always passes its collection; a caller that does not must give one
            raise ValueError("SDPACoreAttention with context_parallel_size > 1 needs pg_collection with a cp group")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention takes no attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        sq, b, nq, hn = query.shape
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if cp > 1:
            key = _GatherSeqOverCP.apply(key, self.cp_group)
            value = _GatherSeqOverCP.apply(value, self.cp_group)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        k, v = _expand_kv(k, v, nq)
        if cp > 1:
            assert self.cp_group is not None  # cp > 1 only with a group (see above)
            q_pos = cp_local_positions(sq, self.cp_group.rank(), cp, device=q.device)
            k_pos = torch.arange(k.shape[2], device=q.device)
            mask = q_pos[:, None] >= k_pos[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, params) -> Tensor:
        """Packed sequences (THD: q `[t, np, hn]`, k/v `[t, ng, hn]`, this CP rank's tokens): causal within
        each segment of the row, nothing across segments. The row is re-padded around the attention: each
        segment becomes a row of a `[segments, longest, ...]` batch (index tables built once per
        micro-batch), so the cost is that of the segments, never of the whole row squared. Without CP one
        causal SDPA call covers the batch; under CP the keys and values of every rank are gathered and a
        mask compares global positions."""
        plan = getattr(params, "liteppo_plan", None)
        if plan is None:
            raise ValueError("SDPACoreAttention takes packed sequences built by models/packing.packed_seq_params")
        t, nq, hn = query.shape
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if cp > 1:
            key = _GatherOverCP.apply(key, self.cp_group)
            value = _GatherOverCP.apply(value, self.cp_group)
        tables = _packed_tables(params, plan, self.cp_group, cp, query.device)
        # [t, h, d] -> [segments, h, slots, d]
        q = query[tables.q_index].permute(0, 2, 1, 3)
        k, v = (x[tables.k_index].permute(0, 2, 1, 3) for x in (key, value))
        k, v = _expand_kv(k, v, nq)
        if tables.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=tables.mask, scale=self.softmax_scale)
        out = out.permute(0, 2, 1, 3)[tables.q_valid]  # [t, h, d], the tokens in segment order
        return out.new_zeros(t, nq, hn).index_copy(0, tables.q_order, out).reshape(t, 1, nq * hn)


@dataclass(frozen=True)
class _PackedTables:
    """Where each segment's queries and keys sit in the packed (local / gathered) row, padded per segment."""

    q_index: Tensor         # [segments, q_slots] local token index (0 in empty slots)
    q_valid: Tensor         # [segments, q_slots] bool
    q_order: Tensor         # [t_local] local token index of q_index[q_valid], in that order
    k_index: Tensor         # [segments, k_slots] index into the (gathered) keys
    mask: Tensor | None     # [segments, 1, q_slots, k_slots] bool under CP; None: plain causal per segment


def _slots(seg: Tensor, pos: Tensor, segments: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens (segment id, position) -> per-segment slot tables [segments, longest] ordered by position:
    the token index in each slot, whether the slot holds a token, and each slot's position."""
    order = torch.argsort(seg * (int(pos.max()) + 1) + pos)  # by segment, then position
    counts = torch.bincount(seg, minlength=segments)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel()) - starts[seg[order]]
    index = torch.zeros(segments, width, dtype=torch.long)
    valid = torch.zeros(segments, width, dtype=torch.bool)
    slot_pos = torch.full((segments, width), -1, dtype=torch.long)
    index[seg[order], slot] = order
    valid[seg[order], slot] = True
    slot_pos[seg[order], slot] = pos[order]
    return index, valid, slot_pos


def _packed_tables(params, plan, cp_group, cp: int, device: torch.device) -> _PackedTables:
    """The re-padding tables of one micro-batch for this CP rank, cached on `params` (shared by the layers)."""
    cached = getattr(params, "liteppo_tables", None)
    if cached is not None:
        return cached
    from liteppo_mcore.models.packing import packed_positions

    segments = len(plan.segments)
    rank = cp_group.rank() if cp > 1 else 0
    q_seg, q_pos = packed_positions(plan, rank, cp)
    q_index, q_valid, q_slot_pos = _slots(q_seg, q_pos, segments)
    if cp == 1:  # keys are the queries; each segment's tokens fill a prefix of its slots: causal suffices
        k_index, mask = q_index, None
    else:
        keys = [packed_positions(plan, r, cp) for r in range(cp)]
        k_seg, k_pos = torch.cat([sg for sg, _ in keys]), torch.cat([ps for _, ps in keys])
        k_index, k_valid, k_slot_pos = _slots(k_seg, k_pos, segments)
        mask = k_valid[:, None, :] & (q_slot_pos[:, :, None] >= k_slot_pos[:, None, :])
        mask[:, :, 0] |= ~q_valid  # an empty query slot sees one key (its output is dropped): no all-masked row
        mask = mask.unsqueeze(1).to(device)
    tables = _PackedTables(q_index.to(device), q_valid.to(device), q_index[q_valid].to(device), k_index.to(device),
                           mask)
    params.liteppo_tables = tables
    return tables


def _expand_kv(k: Tensor, v: Tensor, nq: int) -> tuple[Tensor, Tensor]:
    """Repeat grouped-query keys and values `[b, ng, s, d]` to the `nq` query heads."""
    if k.shape[1] != nq:
        k = k.repeat_interleave(nq // k.shape[1], dim=1)
        v = v.repeat_interleave(nq // v.shape[1], dim=1)
    return k, v


class _GatherOverCP(torch.autograd.Function):
    """All-gather `[t_local, ...]` over the CP group in rank order (no reordering: the packed mask names
    every key's segment and position); the backward sums the gradient over the group and keeps this
    rank's part."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, group.rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None
