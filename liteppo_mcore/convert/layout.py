"""The tensor layout of one model and the fused tensors megatron uses where Hugging Face keeps several.

Megatron fuses the q, k and v projections into one `linear_qkv`, ordered by query group: for each
key/value head g, the query heads of group g, then k head g, then v head g (head_dim rows each). This
is what lets TP split the fused tensor into whole groups. The SwiGLU gate and up projections become
one `linear_fc1` = [gate; up]; under TP each rank holds [its gate rows; its up rows], which megatron
expresses as `partition_stride=2` (models/state.py honors it when sharding).

Pure tensor code: no megatron, no torch.distributed, so the rollout weight sync can use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, with what is wrong and what to do about it."""


@dataclass(frozen=True)
class TensorLayout:
    """What fixes every tensor's name and shape on both sides."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_shape(cls, shape: Any) -> TensorLayout:
        """From a `models.shapes.ModelShape` (read by attribute: this package does not import models)."""
        return cls(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                   ffn_hidden_size=shape.ffn_hidden_size, num_heads=shape.num_attention_heads,
                   num_kv_heads=shape.num_query_groups, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
                   qkv_bias=bool(shape.qkv_bias), qk_norm=bool(shape.qk_norm),
                   tie_word_embeddings=bool(shape.tie_word_embeddings))

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, layout: TensorLayout) -> Tensor:
    """Megatron's `linear_qkv` weight ([out, in]) or bias ([out]) from the three HF projections."""
    g, hpg, d = layout.num_kv_heads, layout.heads_per_group, layout.head_dim
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(g, hpg * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return fused.reshape(layout.qkv_size, *rest)


def split_qkv(qkv: Tensor, layout: TensorLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv: (q, k, v) as separate contiguous tensors."""
    g, hpg, d = layout.num_kv_heads, layout.heads_per_group, layout.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (hpg + 2) * d, *rest)
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return (q.reshape(layout.q_size, *rest).contiguous(), k.reshape(layout.kv_size, *rest).contiguous(),
            v.reshape(layout.kv_size, *rest).contiguous())


def fuse_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """Megatron's whole `linear_fc1` weight: [gate; up] (TP splits each half with partition_stride=2)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()
