"""Model FLOPs and MFU of a GPT shape, in Megatron's convention (written once, used everywhere).

Why a fixed convention: throughput comparisons across sequence lengths, padding schemes and attention
kernels only mean something when every number counts the same work. The convention:

- only the model's own work on NON-PADDING tokens counts (padding a micro-batch costs time, not FLOPs);
- a matmul of an ``m x k`` input with a ``k x n`` weight is ``2 m k n``;
- per token, the forward pass is ``2 x`` the dense matmul parameters: per layer the fused QKV
  projection (``hidden x (q_heads + 2 kv_groups) x head_dim``: grouped-query attention counts its
  smaller K/V), the attention output projection, the two MLP matmuls (the first one twice as wide for
  SwiGLU), plus the output layer ``hidden x padded vocabulary`` (counted also when tied to the
  embedding: the logits GEMM runs either way; the embedding lookup is free);
- plus attention scores and values, ``2 x 2 x s x q_heads x head_dim`` per token per layer for a
  sequence of ``s`` tokens: the full ``s x s`` score matrix, NOT halved for causality;
- norms, rotary embeddings, biases, softmax and the loss are not counted;
- forward + backward = 3 x forward.

With the Qwen2.5-1.5B shape at ``s = 4096`` this is 3.79 GFLOP per token forward, so 46.6 TFLOP per
sequence for forward + backward: the 0.159 s/step measured for one sequence is 293 TFLOP/s.

Pure Python: no torch, megatron or models-package import (``ModelShape`` is only an annotation), so
the trainer's metrics and the tests can use it anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotations: importing the models package is not needed to count
    from liteppo_mcore.models.shapes import ModelShape

FWD_BWD_FACTOR = 3  # backward = 2 x forward (gradients of the inputs and of the weights)


def layer_matmul_params(shape: ModelShape) -> int:
    """Weights of one transformer layer's dense matmuls (QKV, output projection, SwiGLU MLP)."""
    h, d = shape.hidden_size, shape.head_dim
    q_dim = shape.num_attention_heads * d
    kv_dim = shape.num_query_groups * d
    qkv = h * (q_dim + 2 * kv_dim)
    proj = q_dim * h
    fc1 = h * 2 * shape.ffn_hidden_size  # gate and up projections
    fc2 = shape.ffn_hidden_size * h
    return qkv + proj + fc1 + fc2


def model_flops_per_token(shape: ModelShape, seq_len: int, *, vocab: int | None = None) -> float:
    """Forward FLOPs of one token in a sequence of `seq_len` tokens (see the module doc).

    `vocab` is the output layer's width; default: the vocabulary padded for TP=1
    (`ModelShape.padded_vocab_size`), which is what the logits GEMM computes.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    width = shape.padded_vocab_size(1) if vocab is None else vocab
    dense = shape.num_layers * layer_matmul_params(shape) + shape.hidden_size * width
    attention = shape.num_layers * 2 * 2 * seq_len * shape.num_attention_heads * shape.head_dim
    return float(2 * dense + attention)


def train_flops(shape: ModelShape, seq_lens: Iterable[int], *, vocab: int | None = None) -> float:
    """Forward + backward FLOPs of a batch of sequences, each of its own non-padding length
    (attention is quadratic in each sequence's own length, so a batch is not its token count
    times one per-token figure)."""
    total = 0.0
    for s in seq_lens:
        s = int(s)
        total += s * model_flops_per_token(shape, s, vocab=vocab)
    return FWD_BWD_FACTOR * total


def tflops_per_second(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return flops / seconds / 1e12


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the peak (a measured matmul rate or the
    datasheet's), as a fraction."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    return tflops_per_second(flops, seconds) / peak_tflops
