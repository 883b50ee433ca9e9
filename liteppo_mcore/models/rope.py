"""The rotary embedding of packed rows, in one elementwise pass per query/key instead of a loop.

megatron-core 0.16's unfused rotary embedding for the THD layout (`rope_utils._apply_rotary_pos_emb_thd`)
reads `cu_seqlens` back to the host (`.tolist()`: a device synchronisation on a GPU) and slices the
frequencies segment by segment, in every layer, for the queries and again for the keys. A packed row's
positions do not change between layers, so `packed_seq_params` (models/packing.py) attaches them to the
row's `cu_seqlens` (`ROPE_POSITIONS`: this CP rank's tokens' positions within their segment, on the
device), and `apply_rotary_pos_emb` here, installed in megatron's attention module in place of
megatron's, takes the frequencies at those positions once per forward pass and keeps their cosine and
sine for every layer: the same values as megatron's, no synchronisation, a handful of operations.

Anything else (padded rows, fused RoPE, multi-latent attention, cu_seqlens built elsewhere) goes to
megatron's own function unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer import attention as _attention
from torch import Tensor

ROPE_POSITIONS = "liteppo_rope_positions"
_CACHE = "liteppo_rope_cos_sin"
_MEGATRON = rope_utils.apply_rotary_pos_emb


def apply_rotary_pos_emb(t: Tensor, freqs: Tensor, config, cu_seqlens: Tensor | None = None, mscale: float = 1.0,
                         cp_group=None) -> Tensor:
    """megatron's `apply_rotary_pos_emb` (same arguments); packed rows of models/packing.py take the
    fast path: t `[tokens, heads, dim]`, freqs `[longest segment, 1, 1, rot_dim]`."""
    positions = getattr(cu_seqlens, ROPE_POSITIONS, None) if cu_seqlens is not None else None
    if positions is None or config.apply_rope_fusion or config.multi_latent_attention:
        return _MEGATRON(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    cached = getattr(cu_seqlens, _CACHE, None)
    # one forward pass computes the frequencies once and hands the same tensor to every layer
    if cached is None or cached[0] is not freqs or cached[1] != (t.dtype, mscale):
        at = freqs[positions][:, 0]  # [tokens, 1, rot_dim]
        cached = (freqs, (t.dtype, mscale), (at.cos() * mscale).to(t.dtype), (at.sin() * mscale).to(t.dtype))
        setattr(cu_seqlens, _CACHE, cached)
    cos, sin = cached[2], cached[3]
    rot_dim = cos.shape[-1]
    x = t[..., :rot_dim]
    out = x * cos + rope_utils._rotate_half(x, config.rotary_interleaved) * sin
    return out if rot_dim == t.shape[-1] else torch.cat((out, t[..., rot_dim:]), dim=-1)


def install() -> None:
    """Route megatron's attention through `apply_rotary_pos_emb` (idempotent)."""
    current = _attention.apply_rotary_pos_emb
    if current is apply_rotary_pos_emb:
        return
    if current is not _MEGATRON:
        raise RuntimeError("megatron.core.transformer.attention.apply_rotary_pos_emb is not megatron-core's own "
                           "(another patch replaced it); the packed rotary embedding cannot be installed")
    _attention.apply_rotary_pos_emb = apply_rotary_pos_emb
