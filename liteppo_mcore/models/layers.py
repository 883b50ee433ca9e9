"""Layers the local spec needs beyond megatron-core's own: an RMSNorm that works with sequence
parallelism, and a torch scaled-dot-product core attention that supports GQA and context parallelism
without Transformer Engine.
"""

from __future__ import annotations

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
    k/v [sk, b, ng, hn] (this rank's heads), returns [sq, b, np*hn]. GQA goes to SDPA without
    materializing repeated keys where torch supports it. With context parallelism, keys and values
    are all-gathered over the CP group and the causal mask uses global positions.
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
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention takes no packed sequences or attention bias")
        sq, b, nq, hn = query.shape
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if cp > 1:
            key = _GatherSeqOverCP.apply(key, self.cp_group)
            value = _GatherSeqOverCP.apply(value, self.cp_group)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != nq:
            k = k.repeat_interleave(nq // k.shape[1], dim=1)
            v = v.repeat_interleave(nq // v.shape[1], dim=1)
        if cp > 1:
            assert self.cp_group is not None  # cp > 1 only with a group (see above)
            q_pos = cp_local_positions(sq, self.cp_group.rank(), cp, device=q.device)
            k_pos = torch.arange(k.shape[2], device=q.device)
            mask = q_pos[:, None] >= k_pos[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)
