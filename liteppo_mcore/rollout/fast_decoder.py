"""A compact decoder for the `fast` rollout engine: Qwen2/2.5 (qkv bias), Qwen3 (q/k norm) and Llama
(Llama 3 rope scaling), tied or untied, in plain torch, with a preallocated static KV cache.

Why not transformers: its decode step costs about 60 ms on an H200 whatever the batch (Python and
kernel launches, measured on the Qwen2.5-1.5B shape), while reading the weights once takes 0.72 ms.
A decode step here is a fixed-shape function of (token ids `[B]`, positions `[B]`, first valid cache
slot per row `[B]`, the cache): no Python branching on values, no host synchronisation, no
allocation that depends on the data, so the engine can capture it in one CUDA graph per batch size.

Weights: each fused tensor (q|k|v, gate|up) is ONE storage, and every Hugging Face tensor of the
weight stream is a view into it (`params`), so `update_weights` copies in place, the decode step runs
one matmul for q, k and v and one for gate and up, and captured graphs keep seeing the new values.
Which HF tensors are fused into which, and their shapes, comes from the converter's map
(`convert.names.megatron_sources`); only the row order inside our fused tensors is ours (plain
[q; k; v] and [gate; up], not megatron's per-group interleave).

Cache: `[layers, 2 (k, v), batch, kv_heads, max_len, head_dim]`. Prompts are left-padded to a common
width W and written to slots [0, W); decode step t writes slot W + t of every row. Row b's valid keys
are the slots from `starts[b]` (its number of left pads) to its current slot. Pad queries attend to
themselves only, so every cached value is finite (a NaN there would survive the mask: 0 * NaN).
The numerics follow transformers (float32 RMSNorm and rope tables, cast back to the model dtype), so
greedy decoding agrees with the `hf` engine token for token in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from liteppo_mcore.config.choices import MODEL_FAMILIES
from liteppo_mcore.convert.layout import TensorLayout
from liteppo_mcore.convert.names import EMBEDDING, OUTPUT_LAYER, megatron_sources
from liteppo_mcore.rollout.sampling import filtered_logits

# Every model family of the configuration (model.family); a family added there that this decoder cannot run
# needs its own tuple here instead.
SUPPORTED_FAMILIES = MODEL_FAMILIES

# One layer's weights, in this order: input norm, fused q|k|v, its bias (Qwen2), q norm and k norm (Qwen3),
# output projection, pre-MLP norm, fused gate|up, down projection; the optional ones are None elsewhere.
LayerWeights = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(shape) -> Tensor:
    """Inverse rotary frequencies (float32), with Llama 3's wavelength-dependent scaling when set."""
    dim = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = shape.rope_scaling
    if not s:
        return inv
    factor, low, high = float(s.get("factor", 8.0)), float(s.get("low_freq_factor", 1.0)), \
        float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the half-split convention (transformers' `rotate_half`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class CompactDecoder:
    """The model function and its weights; see the module docstring. Not an nn.Module: nothing here
    trains, and plain tensors keep the per-step Python work to a minimum."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device):
        if shape.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"fast engine: model family {shape.family!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_FAMILIES)}")
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.layout = TensorLayout.from_shape(shape)
        self.sources = megatron_sources(self.layout)
        self.eps = float(shape.norm_epsilon)
        self.store: dict[str, Tensor] = {
            name: torch.zeros(src.megatron_shape, dtype=dtype, device=self.device)
            for name, src in self.sources.items()}
        self.params: dict[str, Tensor] = {}
        self._bind()

    # ------------------------------------------------------------------ weights
    def _bind(self) -> None:
        """HF-named views into the fused storages, the per-layer weight tuples and the rope tables."""
        self.params = {}
        for name, src in self.sources.items():
            offset = 0
            for hf_name, hf_shape in zip(src.hf_names, src.hf_shapes):
                self.params[hf_name] = self.store[name][offset: offset + hf_shape[0]]
                offset += hf_shape[0]
        self.layers = [self._layer_weights(i) for i in range(self.shape.num_layers)]
        self.embedding = self.store[EMBEDDING]
        self.output = self.store.get(OUTPUT_LAYER, self.embedding)
        self.final_norm = self.store["decoder.final_layernorm.weight"]
        inv = rope_inv_freq(self.shape).to(self.device)
        freqs = torch.arange(self.shape.max_position_embeddings, device=self.device).float()[:, None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _layer_weights(self, i: int) -> LayerWeights:
        p, s = f"decoder.layers.{i}.", self.store
        a = p + "self_attention."
        return (s[p + "input_layernorm.weight"], s[a + "linear_qkv.weight"], s.get(a + "linear_qkv.bias"),
                s.get(a + "q_layernorm.weight"), s.get(a + "k_layernorm.weight"), s[a + "linear_proj.weight"],
                s[p + "pre_mlp_layernorm.weight"], s[p + "mlp.linear_fc1.weight"], s[p + "mlp.linear_fc2.weight"])

    def to(self, device: torch.device) -> None:
        """Move the weights (sleep / wake); views and tables are rebuilt, so captured graphs go stale.
        A move to the device they are on does nothing (and so keeps graphs valid)."""
        if torch.device(device) == self.device:
            return
        self.device = torch.device(device)
        self.store = {k: v.to(self.device) for k, v in self.store.items()}
        self._bind()

    def new_cache(self, batch: int, max_len: int) -> Tensor:
        lay = self.layout
        return torch.zeros(lay.num_layers, 2, batch, lay.num_kv_heads, max_len, lay.head_dim,
                           dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ blocks
    def _qkv(self, w: LayerWeights, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q `[..., H, D]`, k and v `[..., KV, D]` of normalised hidden states `[..., h]`, rotated."""
        lay = self.layout
        qkv = F.linear(x, w[1], w[2])
        q, k, v = qkv.split([lay.q_size, lay.kv_size, lay.kv_size], dim=-1)
        q = q.unflatten(-1, (lay.num_heads, lay.head_dim))
        k = k.unflatten(-1, (lay.num_kv_heads, lay.head_dim))
        v = v.unflatten(-1, (lay.num_kv_heads, lay.head_dim))
        q_norm, k_norm = w[3], w[4]
        if q_norm is not None:  # Qwen3: per-head RMSNorm before rope
            assert k_norm is not None  # the family has both (convert.names)
            q, k = rms_norm(q, q_norm, self.eps), rms_norm(k, k_norm, self.eps)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _mlp(self, w: LayerWeights, x: Tensor) -> Tensor:
        gate, up = F.linear(rms_norm(x, w[6], self.eps), w[7]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w[8])

    def _logits(self, x: Tensor) -> Tensor:
        return F.linear(rms_norm(x, self.final_norm, self.eps), self.output)

    # ------------------------------------------------------------------ prefill
    def prefill(self, ids: Tensor, starts: Tensor, cache: Tensor) -> Tensor:
        """Left-padded prompts `[B, W]` (row b's first real token at column `starts[b]`) into cache
        slots [0, W); returns the logits `[B, V]` after each row's last prompt token."""
        b, width = ids.shape
        col = torch.arange(width, device=ids.device)
        positions = (col[None, :] - starts[:, None]).clamp(min=0)
        real = col[None, :] >= starts[:, None]                                  # [B, W] keys
        causal = col[None, :] <= col[:, None]                                    # [W(q), W(k)]
        mask = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=ids.device)[None]
        mask = mask[:, None]                                                     # [B, 1, W, W]
        cos, sin = self.cos[positions], self.sin[positions]
        group = self.layout.heads_per_group
        x = self.embedding[ids]
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(w, rms_norm(x, w[0], self.eps), cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, W, D]
            cache[i, 0, :b, :, :width] = k
            cache[i, 1, :b, :, :width] = v
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                                 v.repeat_interleave(group, dim=1), attn_mask=mask)
            x = x + F.linear(out.transpose(1, 2).flatten(2), w[5])
            x = self._mlp(w, x)
        return self._logits(x[:, -1])

    # ------------------------------------------------------------------ decode
    def decode_step(self, tokens: Tensor, positions: Tensor, starts: Tensor, cache: Tensor) -> Tensor:
        """One token per row: `tokens`, `positions`, `starts` `[B]` -> logits `[B, V]`; writes the new
        keys/values at slot `starts + positions`. Fixed shapes throughout (graph-capturable)."""
        lay = self.layout
        b, max_len = tokens.shape[0], cache.shape[4]
        slots = starts + positions
        keys = torch.arange(max_len, device=tokens.device)
        valid = (keys[None, :] >= starts[:, None]) & (keys[None, :] <= slots[:, None])
        bias = torch.zeros(b, 1, 1, max_len, device=tokens.device).masked_fill(~valid[:, None, None], float("-inf"))
        rows = torch.arange(b, device=tokens.device)
        cos, sin = self.cos[positions], self.sin[positions]
        scale = 1.0 / math.sqrt(lay.head_dim)
        x = self.embedding[tokens]
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(w, rms_norm(x, w[0], self.eps), cos, sin)       # q [B, H, D], k/v [B, KV, D]
            k_cache, v_cache = cache[i, 0, :b], cache[i, 1, :b]                  # [B, KV, L, D]
            k_cache[rows, :, slots] = k
            v_cache[rows, :, slots] = v
            q = q.view(b, lay.num_kv_heads, lay.heads_per_group, lay.head_dim)  # HF: head h -> group h // G
            scores = torch.matmul(q, k_cache.transpose(-1, -2)).float() * scale + bias
            probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)
            out = torch.matmul(probs, v_cache).reshape(b, lay.q_size)
            x = x + F.linear(out, w[5])
            x = self._mlp(w, x)
        return self._logits(x)

    def full_logits(self, ids: Tensor) -> Tensor:
        """Logits `[B, S, V]` of unpadded rows without a cache (checks and the weight-sync metric)."""
        b, s = ids.shape
        cos, sin = self.cos[:s].expand(b, s, -1), self.sin[:s].expand(b, s, -1)
        group = self.layout.heads_per_group
        x = self.embedding[ids]
        for w in self.layers:
            q, k, v = self._qkv(w, rms_norm(x, w[0], self.eps), cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                                 v.repeat_interleave(group, dim=1), is_causal=True)
            x = self._mlp(w, x + F.linear(out.transpose(1, 2).flatten(2), w[5]))
        return self._logits(x)


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, greedy: bool,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Next tokens `[B]` and their log-probs under softmax(logits / temperature) over the FULL vocabulary.

    Sampling draws from the top-k / top-p filtered distribution by an exponential race
    (argmax of p / E, E ~ Exp(1), which picks i with probability p_i) on the device, without a host
    synchronisation; the log-prob is always of the unfiltered, tempered distribution."""
    z = logits.float() / temperature
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(_filtered(z, top_k, top_p), dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        tokens = (probs / noise).argmax(dim=-1)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return tokens, logp


def _filtered(z: Tensor, top_k: int, top_p: float) -> Tensor:
    """Tempered logits `z` with the tokens outside top-k and the top-p nucleus set to -inf."""
    return filtered_logits(z, 1.0, top_k, top_p)


def pack_rows(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ids `[B, W]` and each row's first real column `[B]`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
    starts = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    return ids.to(device), starts.to(device)
