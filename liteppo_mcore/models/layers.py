"""Layers the local spec needs beyond megatron-core's own: an RMSNorm that works with sequence
parallelism, and a torch scaled-dot-product core attention that supports GQA and context parallelism
without Transformer Engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from liteppo_mcore.parallel.device import to_device

_varlen_attn: Callable[..., Any] | None
try:  # variable-length flash attention (CUDA only, newer torch), see varlen_applies
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # an older torch (pyproject admits 2.6): the re-padded path everywhere
    _varlen_attn = None


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
        # torch's rms_norm without a weight, in fp32: x * rsqrt(mean(x^2) + eps), bit for bit the formula
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


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
    causally within their own segment of the row: the row is re-padded to one row per segment around one
    SDPA call (`_packed`). Grouped-query keys and values go to SDPA as they are (`enable_gqa`).
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
        gqa = k.shape[1] != nq  # grouped-query keys and values: SDPA repeats them to the query heads
        if cp > 1:
            assert self.cp_group is not None  # cp > 1 only with a group (see above)
            q_pos = cp_local_positions(sq, self.cp_group.rank(), cp, device=q.device)
            k_pos = torch.arange(k.shape[2], device=q.device)
            mask = q_pos[:, None] >= k_pos[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, params) -> Tensor:
        """Packed sequences (THD: q `[t, np, hn]`, k/v `[t, ng, hn]`, this CP rank's tokens): causal within
        each segment of the row, nothing across segments. On a GPU without CP, in fp16/bf16, torch's
        variable-length flash attention takes the row as it is (`cu_seqlens`). Elsewhere the row is
        re-padded around the attention (`_slot_attention`)."""
        plan = getattr(params, "liteppo_plan", None)
        if plan is None:
            raise ValueError("SDPACoreAttention takes packed sequences built by models/packing.packed_seq_params")
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if cp == 1 and varlen_applies(query):
            return varlen_attention(query, key, value, params, self.softmax_scale)
        return self._slot_attention(query, key, value, params, plan, cp)

    def _slot_attention(self, query: Tensor, key: Tensor, value: Tensor, params, plan, cp: int) -> Tensor:
        """Each segment becomes a row of a `[segments, longest, ...]` batch (index tables built once per
        micro-batch), so the cost is that of the segments, never of the whole row squared. Without CP one
        causal SDPA call covers the batch; under CP the keys and values of every rank are gathered and a
        mask compares global positions."""
        t, nq, hn = query.shape
        if cp > 1:
            key = _GatherOverCP.apply(key, self.cp_group)
            value = _GatherOverCP.apply(value, self.cp_group)
        tables = _packed_tables(params, plan, self.cp_group, cp, query.device)
        segments, q_slots = tables.q_shape
        # [t, h, d] -> [segments, h, slots, d]: one gather each, the segments' tokens at their slots
        if cp == 1:  # the keys' tables are the queries'
            q, k, v = _ToSlots.apply(tables.q_index, tables.q_back, query, key, value)
        else:
            (q,) = _ToSlots.apply(tables.q_index, tables.q_back, query)
            k, v = _ToSlots.apply(tables.k_index, tables.k_back, key, value)
        q, k, v = (x.view(segments, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        gqa = k.shape[1] != nq
        if tables.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=tables.mask, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        # back to the row's order: token i is slot q_back[i] of the [segments * slots] outputs
        out = out.transpose(1, 2).reshape(segments * q_slots, nq * hn)
        return _FromSlots.apply(out, tables.q_back, tables.q_index, tables.q_valid).reshape(t, 1, nq * hn)


def varlen_applies(query: Tensor) -> bool:
    """Whether torch's variable-length (flash) attention can take these queries: a real CUDA device (not
    the strict mode's virtual one, whose data is on the host), fp16 or bf16, and a torch that has it."""
    return _varlen_attn is not None and torch.cuda.is_available() and query.is_cuda and \
        query.dtype in (torch.float16, torch.bfloat16)


def varlen_attention(query: Tensor, key: Tensor, value: Tensor, params, scale: float | None) -> Tensor:
    """Causal attention within each segment of a packed row (`params.cu_seqlens_q`, the trailing padding a
    segment of its own) by `torch.nn.attention.varlen.varlen_attn`: q `[t, np, hn]`, k/v `[t, ng, hn]`
    -> `[t, 1, np * hn]`. No CP (the keys are the queries' own row)."""
    assert _varlen_attn is not None  # varlen_applies
    t, nq, hn = query.shape
    cu = params.cu_seqlens_q
    out = _varlen_attn(query, key.contiguous(), value.contiguous(), cu, cu, int(params.max_seqlen_q),
                       int(params.max_seqlen_kv), scale=scale, window_size=(-1, 0), enable_gqa=key.shape[1] != nq)
    return out.reshape(t, 1, nq * hn)


class _ToSlots(torch.autograd.Function):
    """`x.index_select(0, index)` of each `x` (one autograd node for all): each token `[t, ...]` to its
    slot, the empty slots repeating token 0.
    The backward is a gather too (`back`: each token's slot) instead of a scatter-add into zeros: the
    gradient of an empty slot is exactly zero, since no real query attends to an empty key slot (it
    comes after the segment's tokens, or the CP mask hides it) and `_FromSlots` gives the empty query
    slots a zero output gradient."""

    @staticmethod
    def forward(ctx, index: Tensor, back: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(back)
        return tuple(x.index_select(0, index) for x in xs)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        (back,) = ctx.saved_tensors
        return None, None, *(None if g is None else g.index_select(0, back) for g in grads)


class _FromSlots(torch.autograd.Function):
    """`y.index_select(0, back)`: the slots' outputs back to the tokens; the backward gathers each slot's
    token gradient, zero for empty slots (`valid`)."""

    @staticmethod
    def forward(ctx, y: Tensor, back: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        ctx.save_for_backward(index, valid)
        return y.index_select(0, back)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, valid = ctx.saved_tensors
        return torch.where(valid[:, None], grad.index_select(0, index), 0.0), None, None, None


@dataclass(frozen=True)
class _PackedTables:
    """Where each segment's queries and keys sit in the packed (local / gathered) row, padded per segment."""

    q_shape: tuple[int, int]  # (segments, q_slots)
    q_index: Tensor           # [segments * q_slots] local token in each slot (0 in empty slots)
    q_back: Tensor            # [t_local] the slot of each local token
    q_valid: Tensor           # [segments * q_slots] bool: the slot holds a token
    k_index: Tensor           # [segments * k_slots] index into the (gathered) keys
    k_back: Tensor            # [t_local * cp] the slot of each (gathered) key
    mask: Tensor | None       # [segments, 1, q_slots, k_slots] bool under CP; None: plain causal per segment


def _slots(seg: np.ndarray, pos: np.ndarray, segments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokens (segment id, position) -> per-segment slots [segments, width] ordered by position: the
    token index in each slot (flat, 0 in empty slots), each token's flat slot, whether a slot holds a
    token and each slot's position (-1: empty). Host index arithmetic, in numpy."""
    order = np.lexsort((pos, seg))  # by segment, then position
    counts = np.bincount(seg, minlength=segments)
    width = int(counts.max())
    starts = np.cumsum(counts) - counts
    slot = np.empty_like(order)
    slot[order] = np.arange(order.size) - starts[seg[order]]  # each token's rank within its segment
    flat_slot = seg * width + slot
    index = np.zeros(segments * width, dtype=np.int64)
    index[flat_slot] = np.arange(seg.size)
    valid = np.zeros(segments * width, dtype=bool)
    valid[flat_slot] = True
    slot_pos = np.full(segments * width, -1, dtype=np.int64)
    slot_pos[flat_slot] = pos
    return index, flat_slot, valid.reshape(segments, width), slot_pos.reshape(segments, width)


def _contiguous_slots(segments: tuple[int, ...], seg: np.ndarray, pos: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_slots` (index, flat slot, valid) of a row whose segments lie end to end, each in position order:
    slot i of segment j holds token `offset_j + i`."""
    lengths = np.asarray(segments, dtype=np.int64)
    width = int(lengths.max())
    slot = np.arange(width)
    valid = slot[None, :] < lengths[:, None]
    index = np.where(valid, (np.cumsum(lengths) - lengths)[:, None] + slot[None, :], 0).reshape(-1)
    return index, seg * width + pos, valid


def _packed_tables(params, plan, cp_group, cp: int, device: torch.device) -> _PackedTables:
    """The re-padding tables of one micro-batch for this CP rank, cached on `params` (shared by the layers)."""
    cached = getattr(params, "liteppo_tables", None)
    if cached is not None:
        return cached
    from liteppo_mcore.models.packing import packed_positions

    segments = len(plan.segments)
    q_seg, q_pos = params.liteppo_positions  # this rank's tokens (packed_seq_params)
    if cp == 1:  # the tokens are in (segment, position) order: the tables in closed form
        q_index, q_back, q_valid = _contiguous_slots(plan.segments, q_seg, q_pos)
    else:
        q_index, q_back, q_valid, q_slot_pos = _slots(q_seg, q_pos, segments)
    mask = None  # without CP the keys are the queries, each segment's tokens a prefix of its slots: causal
    k_index, k_back = q_index, q_back
    if cp > 1:
        keys = [packed_positions(plan, r, cp) for r in range(cp)]
        k_index, k_back, k_valid, k_slot_pos = _slots(np.concatenate([sg for sg, _ in keys]),
                                                 np.concatenate([ps for _, ps in keys]), segments)
        allowed = k_valid[:, None, :] & (q_slot_pos[:, :, None] >= k_slot_pos[:, None, :])
        allowed[:, :, 0] |= ~q_valid  # an empty query slot sees one key (its output is dropped): no all-masked row
        mask = to_device(torch.from_numpy(allowed).unsqueeze(1), device)
    # the index tables in one copy to the device (views of it); without CP the keys' tables are the queries'
    parts = [q_index, q_back] + ([k_index, k_back] if cp > 1 else [])
    flat = to_device(torch.from_numpy(np.concatenate(parts)), device).split([p.size for p in parts])
    q_index_d, q_back_d = flat[0], flat[1]
    k_index_d, k_back_d = (flat[2], flat[3]) if cp > 1 else (q_index_d, q_back_d)
    q_valid_d = to_device(torch.from_numpy(q_valid.reshape(-1)), device)
    tables = _PackedTables((segments, q_valid.shape[1]), q_index_d, q_back_d, q_valid_d, k_index_d, k_back_d, mask)
    params.liteppo_tables = tables
    return tables


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
