"""Vocab-parallel log-probabilities, entropy and full-vocabulary KL of temperature-scaled logits.

Every quantity is of ``p = softmax(logits / temperature)`` over the FULL vocabulary, while each
tensor-parallel rank holds only its slice of the vocabulary: ``logits`` is ``[N, V/TP]``, one row per
selected (response) position. The vocabulary is never gathered and the whole shard is never upcast at
once: the work runs over chunks of rows, each upcast to float32 on its own.

Forward, per rank and chunk, with ``z = logits / T`` and ``y = z - m`` (``m`` the shard's row max):
``s = sum exp(y)``, ``a = sum exp(y) * y`` and the target's ``z`` (0 when another shard owns the
target). These four ``[N]`` rows are all-gathered once per call (not once per chunk) and merged:
``M = max_r m_r``, ``Z = sum_r exp(m_r - M) s_r``, ``log Z_full = M + log Z``,
``log p(target) = z_target - log Z_full`` and ``H = log Z - sum_v p_v (z_v - M)``, where
``sum_v p_v (z_v - M) = sum_r exp(m_r - M) (a_r + (m_r - M) s_r) / Z``. Every term of that sum is
``<= 0`` and ``log Z >= 0``, so the entropy is a sum of two non-negative numbers (no cancellation).

Backward needs no communication: ``p_v = exp(z_v - log Z_full)`` is recomputed per chunk from the
saved original-dtype logits and the per-token ``log Z_full`` (no fp32 softmax is kept alive).
``d log p(t) / d z_v = [v = t] - p_v`` and ``dH / d z_v = -p_v (log p_v + H)``; both are divided by
``T`` for the gradient with respect to the logits, which is written chunk by chunk, in the logits'
dtype, into one preallocated tensor (or into the logits themselves, ``inplace_backward``). Besides that
gradient, a call allocates one or two fp32 chunk buffers and a few ``[N]`` vectors.

Logits must be finite: vocabulary padding is excluded with ``vocab_size``, not with ``-inf``.

Outputs are float32 (float64 when the logits are float64), whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

Tensor = torch.Tensor

# Rows per chunk when the caller gives none: 64 Mi elements, i.e. 256 MiB for each fp32 temporary.
_AUTO_CHUNK_ELEMENTS = 1 << 26
# The same for the fused path, whose chunk temporaries are all there is besides its inputs and gradients:
# 4 Mi elements (16 MiB per fp32 temporary; a chunk holds one, two with the entropy, one more for logits
# not in fp32), at least _FUSED_MIN_ROWS rows. Fewer rows would hold less but read the weight more: every
# chunk's GEMMs read the whole weight shard (on 2 CPU cores 32-row chunks took 1.7x the time of 128-row
# ones). On a GPU a chunk needs rows enough to be compute-bound rather than bandwidth-bound (about 2 x
# rows flops per weight byte in bf16; an H200 has about 200 flops per byte of bandwidth): at least
# _FUSED_MIN_ROWS_GPU there.
_FUSED_CHUNK_ELEMENTS = 1 << 22
_FUSED_MIN_ROWS = 16
_FUSED_MIN_ROWS_GPU = 256


def _fused_min_rows(hidden: Tensor) -> int:
    return _FUSED_MIN_ROWS_GPU if hidden.is_cuda and torch.cuda.is_available() else _FUSED_MIN_ROWS
# Row max reported by a shard of vocabulary padding only (s = a = 0): it must never become the merged max,
# or rows whose real logits sit far below 0 would underflow to Z = 0; and (m - M) * 0 stays finite.
_EMPTY_MAX = -1.0e30


@dataclass(frozen=True)
class _Shard:
    """Where this rank's slice sits in the vocabulary and how to walk it."""

    group: dist.ProcessGroup | None
    vocab_start: int  # global id of column 0
    num_valid: int  # leading columns that are real vocabulary entries (the rest is padding)
    inv_temperature: float
    rows_per_chunk: int
    compute_dtype: torch.dtype


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _make_shard(logits: Tensor, tp_group, temperature: float, vocab_start: int | None,
                vocab_size: int | None, chunk_size: int | None, *, auto_elements: int = _AUTO_CHUNK_ELEMENTS,
                min_rows: int = 1) -> _Shard:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [N, V/TP] tensor, got {tuple(logits.shape)} {logits.dtype}")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (automatic), got {chunk_size}")
    v_local = logits.shape[1]
    if v_local == 0:
        raise ValueError("logits hold no vocabulary column")
    if vocab_start is None:
        vocab_start = (0 if tp_group is None else dist.get_rank(tp_group)) * v_local
    num_valid = v_local if vocab_size is None else max(0, min(v_local, vocab_size - vocab_start))
    rows = chunk_size if chunk_size is not None else max(min_rows, auto_elements // v_local)
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    group = tp_group if _group_size(tp_group) > 1 else None
    return _Shard(group, vocab_start, num_valid, 1.0 / temperature, rows, compute_dtype)


def _gather_stats(stats: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``[K, N]`` local statistics -> ``[R, K, N]`` of every rank of the group (one collective)."""
    if group is None:
        return stats.unsqueeze(0)
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats.contiguous(), group=group)
    return torch.stack(parts)


def _workspace(n: int, shard: _Shard, count: int, device: torch.device) -> Tensor:
    """``count`` fp32 chunk buffers reused by every chunk of a call over ``n`` rows (no allocation per chunk)."""
    return torch.empty(count, min(shard.rows_per_chunk, n), shard.num_valid, dtype=shard.compute_dtype,
                       device=device)


def _scaled_minus(x: Tensor, shift: Tensor, inv_t: float, out: Tensor) -> Tensor:
    """``out = x / T - shift[:, None]`` in the compute dtype, ``x`` in its stored dtype."""
    if x.dtype == out.dtype or (x.is_cuda and torch.cuda.is_available()):  # (a kernel choice: the real device)
        # one pass: upcast, 1/T and shift fuse in a single kernel
        return torch.add(-shift.unsqueeze(1), x, alpha=inv_t, out=out)
    # the CPU kernel for mixed dtypes is several times slower than an upcast copy and two in-place ops
    return out.copy_(x).mul_(inv_t).sub_(shift.unsqueeze(1))


def _target_z(x: Tensor, local_t: Tensor, shard: _Shard) -> Tensor:
    """``z`` at each row's target column of this shard, 0 where another shard owns the target."""
    hit = (local_t >= 0) & (local_t < shard.num_valid)
    col = local_t.clamp(0, shard.num_valid - 1).unsqueeze(1)
    value = x.gather(1, col).squeeze(1).to(shard.compute_dtype) * shard.inv_temperature
    return torch.where(hit, value, torch.zeros_like(value))


def _chunk_stats(x: Tensor, local_t: Tensor, shard: _Shard, entropy: bool, work: Tensor) -> Tensor:
    """Rows (m, s, a, z_target) of one chunk ``x = [c, num_valid]``; see the module docstring.

    ``work`` holds one chunk buffer, two with ``entropy`` (``a`` is 0 without it).
    """
    c = x.shape[0]
    # max(x) / T is the max of z for T > 0, and reading it from the stored dtype is half the traffic.
    m = x.amax(dim=1).to(shard.compute_dtype) * shard.inv_temperature
    z_t = _target_z(x, local_t, shard)  # before y: x may be work[0] itself (the fused path's logits)
    y = _scaled_minus(x, m, shard.inv_temperature, work[0, :c])
    if entropy:
        e = torch.exp(y, out=work[1, :c])
        s = e.sum(dim=1)
        a = e.mul_(y).sum(dim=1)  # sum's pairwise reduction: more accurate than a dot product here
    else:
        s = y.exp_().sum(dim=1)
        a = torch.zeros_like(s)
    return torch.stack([m, s, a, z_t])


# The logits of rows lo:hi of this shard's real vocabulary columns, `[hi - lo, num_valid]`: a slice of
# stored logits, or (the fused path) a chunk computed from the hidden states, possibly into the third
# argument (the chunk's first fp32 buffer, which the caller then overwrites in place, element by element).
ChunkLogits = Callable[[int, int, Tensor], Tensor]


def _local_stats(chunk_logits: ChunkLogits, n: int, targets: Tensor, shard: _Shard, entropy: bool,
                 device: torch.device) -> Tensor:
    """``[4, N]`` rows (m, s, a, z_target) of this shard, chunk by chunk."""
    stats = torch.empty(4, n, dtype=shard.compute_dtype, device=device)
    if shard.num_valid == 0:  # a shard of vocabulary padding only
        stats.zero_()
        stats[0].fill_(_EMPTY_MAX)
        return stats
    local_t = targets - shard.vocab_start
    work = _workspace(n, shard, 2 if entropy else 1, device)
    for lo in range(0, n, shard.rows_per_chunk):
        hi = min(n, lo + shard.rows_per_chunk)
        stats[:, lo:hi] = _chunk_stats(chunk_logits(lo, hi, work[0, :hi - lo]), local_t[lo:hi], shard, entropy,
                                       work)
    return stats


def _chunk_grads(chunk_logits: ChunkLogits, n: int, targets: Tensor, log_z: Tensor, ent: Tensor | None,
                 g_logp: Tensor | None, g_ent: Tensor | None, shard: _Shard,
                 device: torch.device) -> Iterator[tuple[slice, Tensor]]:
    """(rows, d loss / d logits of those rows) chunk by chunk (nothing when the shard is padding only);
    each gradient lives in a reused buffer, valid until the next one is produced."""
    if not shard.num_valid:
        return
    local_t = targets - shard.vocab_start
    work = _workspace(n, shard, 1 if g_ent is None else 2, device)
    for lo in range(0, n, shard.rows_per_chunk):
        sl = slice(lo, min(n, lo + shard.rows_per_chunk))
        yield sl, _chunk_grad(chunk_logits(sl.start, sl.stop, work[0, :sl.stop - sl.start]), local_t[sl], log_z[sl],
                              None if ent is None else ent[sl], None if g_logp is None else g_logp[sl],
                              None if g_ent is None else g_ent[sl], shard, work)


def _merge_stats(gathered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[R, 4, N]`` per-rank statistics -> (log Z_full, log p(target), entropy), each ``[N]``."""
    if gathered.shape[0] == 1:  # one shard (no TP): the formulas below with M = m, weight 1, in fewer ops
        m, s, a, z_t = gathered[0].unbind(0)
        log_s = torch.log(s)
        log_z_full = m + log_s
        return log_z_full, z_t - log_z_full, log_s - a / s
    m, s, a, z_t = gathered.unbind(1)
    big_m = m.amax(dim=0)
    weight = torch.exp(m - big_m)
    z_sum = (weight * s).sum(dim=0)
    log_z = torch.log(z_sum)
    log_z_full = big_m + log_z
    mean_shifted = (weight * (a + (m - big_m) * s)).sum(dim=0) / z_sum  # sum_v p_v (z_v - M) <= 0
    return log_z_full, z_t.sum(dim=0) - log_z_full, log_z - mean_shifted


def _chunk_grad(x: Tensor, local_t: Tensor, log_z: Tensor, ent: Tensor | None, g_logp: Tensor | None,
                g_ent: Tensor | None, shard: _Shard, work: Tensor) -> Tensor:
    """d(sum g_logp*logp + g_ent*H) / d logits for one chunk ``x = [c, num_valid]``, in ``work[0]``."""
    c, inv_t = x.shape[0], shard.inv_temperature
    logp = _scaled_minus(x, log_z, inv_t, work[0, :c])  # log p_v = z_v - log Z_full
    if g_ent is None:
        assert g_logp is not None  # backward returns early when both gradients are None
        # d logp(t)/dz = onehot - p: the -p part here, the onehot below.
        grad = logp.exp_().mul_((-inv_t * g_logp).unsqueeze(1))
    else:
        assert ent is not None  # saved whenever g_ent is kept (ctx.entropy_grad)
        p = torch.exp(logp, out=work[1, :c])
        # dH/dz_v = -p_v (log p_v + H); together with the log-prob term: -p_v (g_logp + g_ent (log p_v + H)).
        coef = logp.add_(ent.unsqueeze(1)).mul_(g_ent.unsqueeze(1))
        if g_logp is not None:
            coef.add_(g_logp.unsqueeze(1))
        grad = coef.mul_(p).mul_(-inv_t)
    if g_logp is not None:
        rows = ((local_t >= 0) & (local_t < shard.num_valid)).nonzero().squeeze(1)
        grad.index_put_((rows, local_t[rows]), g_logp[rows] * inv_t, accumulate=True)
    return grad


class _LogProbEntropy(torch.autograd.Function):
    """(logits [N, V/TP], targets [N]) -> (log p(target) [N], entropy [N]); see the module docstring."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, shard: _Shard, compute_entropy: bool,
                entropy_grad: bool, inplace_backward: bool) -> tuple[Tensor, Tensor]:
        columns = logits[:, : shard.num_valid]
        stats = _gather_stats(_local_stats(lambda lo, hi, _: columns[lo:hi], logits.shape[0], targets, shard,
                                           compute_entropy, logits.device), shard.group)
        log_z, logp, ent = _merge_stats(stats)
        if not compute_entropy:
            ent = ent.new_empty(0)
        if not (compute_entropy and entropy_grad):
            ctx.mark_non_differentiable(ent)
        ctx.shard, ctx.inplace_backward = shard, inplace_backward
        ctx.entropy_grad = compute_entropy and entropy_grad
        ctx.save_for_backward(logits, targets, log_z, ent if ctx.entropy_grad else None)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        logits, targets, log_z, ent = ctx.saved_tensors
        shard: _Shard = ctx.shard
        g_ent = g_ent if ctx.entropy_grad else None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None
        # In place: the caller promised the logits are not used after backward; saves a logits-sized buffer.
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        grad[:, shard.num_valid:].zero_()  # vocabulary padding is outside the distribution
        columns = logits[:, : shard.num_valid]
        for sl, chunk in _chunk_grads(lambda lo, hi, _: columns[lo:hi], logits.shape[0], targets, log_z, ent, g_logp,
                                      g_ent, shard, logits.device):
            grad[sl, : shard.num_valid].copy_(chunk)
        return grad, None, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    compute_entropy: bool = True,
    entropy_grad: bool = False,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of ``targets`` and entropy of ``softmax(logits / temperature)`` over the full vocabulary.

    Args:
        logits: ``[N, V/TP]``, this rank's vocabulary shard for N selected positions, any float dtype.
        targets: ``[N]`` global token ids (every rank of ``tp_group`` passes the same ones).
        tp_group: the tensor-parallel group the vocabulary is split over; None or size 1: no collectives.
        vocab_start: global id of this shard's first column (default: rank in ``tp_group`` * ``V/TP``).
        vocab_size: real vocabulary size; columns with global id ``>= vocab_size`` (padding added so the
            vocabulary divides by TP) are left out of the distribution and get zero gradient.
        compute_entropy: False returns None for the entropy and skips its arithmetic.
        entropy_grad: True lets gradients flow through the entropy (entropy_coef != 0); False returns
            it detached, and its backward is never built.
        chunk_size: rows upcast at a time (None: as many as make 256 MiB of fp32 per temporary).
        inplace_backward: write the gradient into ``logits``' own storage. Only when the caller does
            not read the logits after backward (e.g. a private copy of the selected rows).

    Returns:
        ``(logp [N], entropy [N] or None)``, float32 (float64 for float64 logits). The collectives
        (one all-gather per call) are issued by every rank of ``tp_group``, also with N = 0.
    """
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] for logits {tuple(logits.shape)}")
    shard = _make_shard(logits, tp_group, temperature, vocab_start, vocab_size, chunk_size)
    logp, ent = _LogProbEntropy.apply(logits, targets.long(), shard, compute_entropy, entropy_grad, inplace_backward)
    return logp, (ent if compute_entropy else None)


def _fused_chunk_logits(hidden: Tensor, w: Tensor, kept: Tensor | None) -> ChunkLogits:
    """A chunk's logits `hidden[lo:hi] @ w.T`, in hidden's dtype: sliced from `kept` (the logits of all
    rows, when they fit one chunk) or computed, straight into the chunk's fp32 buffer when hidden is in
    the compute dtype (then the chunk holds one fp32 temporary less)."""
    if kept is not None:
        return lambda lo, hi, _: kept[lo:hi]

    def compute(lo: int, hi: int, out: Tensor) -> Tensor:
        if out.dtype == hidden.dtype:
            return torch.mm(hidden[lo:hi], w.t(), out=out)
        return hidden[lo:hi] @ w.t()

    return compute


def _one_pass_applies(hidden: Tensor, shard: _Shard, n: int, entropy_grad: bool) -> bool:
    """Whether the fused call takes the one-pass path: one vocabulary shard (no TP), all rows in one
    chunk, no entropy gradient, and logits whose temperature scaling can fold into the matmul without
    another rounding (the compute dtype, or temperature 1)."""
    return _group_size(shard.group) == 1 and 0 < n <= shard.rows_per_chunk and \
        shard.num_valid > 0 and not entropy_grad and \
        (hidden.dtype == shard.compute_dtype or shard.inv_temperature == 1.0)


def _one_pass_forward(hidden: Tensor, w: Tensor, targets: Tensor, shard: _Shard, compute_entropy: bool, *,
                      keep_probs: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """One shard, one chunk: ``z = (hidden @ w.T) / T`` (the scaling in the GEMM), then log-softmax in
    one fused pass over the rows, where the general path takes the max, the shift, the exponential and
    its sum as passes of their own over ``[N, V]``. Returns (log p(target), entropy or an empty tensor,
    the probabilities for the backward pass (None unless ``keep_probs``), the target columns)."""
    inv_t = shard.inv_temperature
    z = hidden @ w.t() if inv_t == 1.0 else torch.addmm(hidden.new_zeros(()), hidden, w.t(), beta=0, alpha=inv_t)
    log_p = torch.log_softmax(z, dim=1, dtype=shard.compute_dtype)
    del z
    col = (targets - shard.vocab_start).clamp(0, shard.num_valid - 1).unsqueeze(1)
    logp = log_p.gather(1, col).squeeze(1)
    p = log_p.exp() if keep_probs or compute_entropy else None
    ent = logp.new_empty(0)
    if compute_entropy:
        assert p is not None
        ent = torch.mul(p, log_p, out=log_p).sum(dim=1).neg_()  # H = -sum_v p_v log p_v
    return logp, ent, (p if keep_probs else None), col


def _one_pass_backward(hidden: Tensor, weight: Tensor, col: Tensor, p: Tensor, g_logp: Tensor,
                       shard: _Shard) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum g_logp * logp`` for `_one_pass_forward`: d logp(t) / d logits = (onehot - p) / T,
    from the probabilities kept by the forward pass (consumed here: the backward runs once)."""
    inv_t = shard.inv_temperature
    grad = p.mul_((-inv_t * g_logp).unsqueeze(1))
    grad.scatter_add_(1, col, (inv_t * g_logp).unsqueeze(1).to(grad.dtype))
    g = grad.to(hidden.dtype)
    grad_weight = torch.zeros_like(weight)  # padding rows keep a zero gradient
    torch.mm(g.t(), hidden, out=grad_weight[: shard.num_valid])
    return torch.mm(g, weight[: shard.num_valid]), grad_weight


class _FusedLogProbEntropy(torch.autograd.Function):
    """(hidden [N, H], weight [V/TP, H], targets [N]) -> (log p(target) [N], entropy [N]) with the output
    layer's matmul inside the chunk loop: the logits of one chunk of rows exist at a time, forward and
    backward (which recomputes them, or, for rows that fit one chunk, reuses the forward's); see
    `vocab_parallel_logprob_entropy_from_hidden`."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, shard: _Shard, compute_entropy: bool,
                entropy_grad: bool, grad_wanted: bool) -> tuple[Tensor, Tensor]:
        w = weight[: shard.num_valid]
        n = hidden.shape[0]
        ctx.set_materialize_grads(False)
        ctx.shard = shard
        ctx.entropy_grad = compute_entropy and entropy_grad
        ctx.one_pass = _one_pass_applies(hidden, shard, n, ctx.entropy_grad)
        if ctx.one_pass:
            logp, ent, p, col = _one_pass_forward(hidden, w, targets, shard, compute_entropy,
                                                  keep_probs=grad_wanted)
            ctx.mark_non_differentiable(ent)
            ctx.save_for_backward(hidden, weight, col, p)
            return logp, ent
        # Rows that fit one chunk: its logits (the one chunk this call holds anyway) are kept for the
        # backward pass instead of being computed again; more rows: each chunk is recomputed there.
        kept = hidden @ w.t() if 0 < n <= shard.rows_per_chunk else None
        stats = _local_stats(_fused_chunk_logits(hidden, w, kept), n, targets, shard, compute_entropy, hidden.device)
        log_z, logp, ent = _merge_stats(_gather_stats(stats, shard.group))
        if not compute_entropy:
            ent = ent.new_empty(0)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(hidden, weight, targets, log_z, ent if ctx.entropy_grad else None, kept)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        if ctx.one_pass:
            if g_logp is None:
                return None, None, None, None, None, None, None
            hidden, weight, col, p = ctx.saved_tensors
            return (*_one_pass_backward(hidden, weight, col, p, g_logp, ctx.shard), None, None, None, None, None)
        hidden, weight, targets, log_z, ent, kept = ctx.saved_tensors
        shard: _Shard = ctx.shard
        g_ent = g_ent if ctx.entropy_grad else None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)  # padding rows keep a zero gradient
        w, gw = weight[: shard.num_valid], grad_weight[: shard.num_valid]
        # each chunk's logits are recomputed, unless the forward pass kept its single chunk
        for sl, chunk in _chunk_grads(_fused_chunk_logits(hidden, w, kept), hidden.shape[0], targets, log_z, ent,
                                      g_logp, g_ent, shard, hidden.device):
            g = chunk.to(hidden.dtype)
            torch.mm(g, w, out=grad_hidden[sl])
            gw.addmm_(g.t(), hidden[sl])  # accumulated by the GEMM itself: no pass over the weight per chunk
        return grad_hidden, grad_weight, None, None, None, None, None


def vocab_parallel_logprob_entropy_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    compute_entropy: bool = True,
    entropy_grad: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`vocab_parallel_logprob_entropy` of the logits ``hidden @ weight.T``, without ever holding them
    whole: the output layer's matmul runs per chunk of rows, in the forward pass and again in the
    backward pass, so besides the inputs a call holds one chunk of logits and its fp32 buffers. When all
    rows fit one chunk, that chunk's logits are kept from the forward pass for the backward pass (at
    most the chunk budget, until the backward) instead of being computed twice; without TP and without
    an entropy gradient such a call takes one fused log-softmax pass over them and keeps the
    probabilities instead (`_one_pass_forward`: the same values, fewer passes over ``[N, V]``).

    Args:
        hidden: ``[N, H]`` the last hidden states (after the final norm) of N selected positions, the
            same on every rank of ``tp_group``.
        weight: ``[V/TP, H]`` this rank's shard of the output layer (tied or untied), padded rows included.
        targets, tp_group, temperature, vocab_start, vocab_size, compute_entropy, entropy_grad,
        chunk_size: as for `vocab_parallel_logprob_entropy` (``chunk_size``: rows per chunk; None: as many
            as make 16 MiB of fp32 per temporary, at least 16 rows; at least 256 on a GPU).

    Gradients: ``weight`` gets this rank's full gradient; ``hidden`` gets this rank's share (its vocabulary
    slice's part), to be summed over ``tp_group``, as megatron's column-parallel output layer does in the
    backward of its input (pass ``hidden`` through ``copy_to_tensor_model_parallel_region``).
    Returns ``(logp [N], entropy [N] or None)``, float32 (float64 for float64 inputs).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V/TP, H] must share H, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    # the shard's geometry is the logits' [N, V/TP]: a view of that shape describes it without computing it
    shape_only = weight.new_empty(()).expand(hidden.shape[0], weight.shape[0])
    shard = _make_shard(shape_only, tp_group, temperature, vocab_start, vocab_size, chunk_size,
                        auto_elements=_FUSED_CHUNK_ELEMENTS, min_rows=_fused_min_rows(hidden))
    # under no_grad (the forward-only passes) nothing is kept for a backward pass
    grad_wanted = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logp, ent = _FusedLogProbEntropy.apply(hidden, weight, targets.long(), shard, compute_entropy, entropy_grad,
                                           grad_wanted)
    return logp, (ent if compute_entropy else None)


def logprob_entropy_at(output: Tensor, targets: Tensor, mask: Tensor, *, weight: Tensor | None = None,
                       **kwargs) -> tuple[Tensor, Tensor | None]:
    """Log-prob and entropy at the positions where ``mask`` is True, zeros elsewhere.

    ``output`` is ``[*S, V/TP]`` logits (e.g. ``[B, T, V/TP]``: ``vocab_parallel_logprob_entropy``), or,
    with ``weight`` (the output layer's ``[V/TP, H]`` shard), ``[*S, H]`` last hidden states
    (``vocab_parallel_logprob_entropy_from_hidden``: the logits are never whole). ``targets`` and ``mask``
    are ``[*S]``; the caller aligns targets with the outputs (the next token). Only the selected rows are
    computed, so prompt and padding positions cost nothing. Keyword arguments go to the function used.
    Returns ``[*S]`` tensors.
    """
    if mask.dtype != torch.bool or mask.shape != output.shape[:-1] or targets.shape != mask.shape:
        raise ValueError(f"mask (bool) and targets must have shape {tuple(output.shape[:-1])}, got "
                         f"{tuple(mask.shape)} {mask.dtype} and {tuple(targets.shape)}")
    # the selected positions once (one nonzero: a host synchronisation on a GPU) for the gathers and the
    # scatters; indexing the (possibly transposed) output by them copies the selected rows only
    at = mask.nonzero(as_tuple=True)
    if weight is None:
        kwargs.setdefault("inplace_backward", True)  # the selection is a private copy
        logp, ent = vocab_parallel_logprob_entropy(output[at], targets[at], **kwargs)
    else:
        logp, ent = vocab_parallel_logprob_entropy_from_hidden(output[at], weight, targets[at], **kwargs)

    def scatter(values: Tensor) -> Tensor:
        return values.new_zeros(mask.shape).index_put(at, values)

    return scatter(logp), (None if ent is None else scatter(ent))


def _chunk_log_z(x: Tensor, shard: _Shard, work: Tensor) -> Tensor:
    """Rows (m, s) of one chunk: its max of z and sum exp(z - m)."""
    m = x.amax(dim=1).to(shard.compute_dtype) * shard.inv_temperature
    s = _scaled_minus(x, m, shard.inv_temperature, work[0, : x.shape[0]]).exp_().sum(dim=1)
    return torch.stack([m, s])


def _log_partitions(logits_list: tuple[Tensor, ...], shard: _Shard, work: Tensor | None) -> Tensor:
    """``log sum_v exp(z_v)`` over the full vocabulary, ``[len(logits_list), N]``, with one all-gather."""
    k, n = len(logits_list), logits_list[0].shape[0]
    stats = torch.zeros(2 * k, n, dtype=shard.compute_dtype, device=logits_list[0].device)
    stats[0::2].fill_(_EMPTY_MAX)
    for lo in range(0, n if shard.num_valid else 0, shard.rows_per_chunk):
        assert work is not None  # the caller allocates it when num_valid > 0, the only case the loop runs
        hi = min(n, lo + shard.rows_per_chunk)
        for i, logits in enumerate(logits_list):
            stats[2 * i: 2 * i + 2, lo:hi] = _chunk_log_z(logits[lo:hi, : shard.num_valid], shard, work)
    gathered = _gather_stats(stats, shard.group)  # [R, 2k, N]
    m, s = gathered[:, 0::2], gathered[:, 1::2]
    big_m = m.amax(dim=0)
    return big_m + torch.log((torch.exp(m - big_m) * s).sum(dim=0))


@torch.no_grad()
def vocab_parallel_full_kl(
    logits_p: Tensor,
    logits_q: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per row, over the full vocabulary.

    ``p = softmax(logits_p / T)``, ``q = softmax(logits_q / T)``, both ``[N, V/TP]`` shards of the same
    vocabulary slice (e.g. old policy and reference for ``kl_penalty: full``). Arguments as in
    ``vocab_parallel_logprob_entropy``. For rewards only: runs without autograd, the result has no graph.
    Two passes: both log-partition functions first (one all-gather), then the sum of
    ``p * (log p - log q)`` term by term (one all-reduce), so every term is the exact definition; the
    absolute error is that of fp32 log-probs (about 1e-6), and a KL below that is not resolved.
    Returns ``[N]``, float32 (float64 for float64 logits).
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} differ")
    shard = _make_shard(logits_p, tp_group, temperature, vocab_start, vocab_size, chunk_size)
    work = _workspace(logits_p.shape[0], shard, 2, logits_p.device) if shard.num_valid else None
    log_zp, log_zq = _log_partitions((logits_p, logits_q), shard, work).unbind(0)
    kl = torch.zeros(logits_p.shape[0], dtype=shard.compute_dtype, device=logits_p.device)
    inv_t, n = shard.inv_temperature, logits_p.shape[0]
    for lo in range(0, n if shard.num_valid else 0, shard.rows_per_chunk):
        assert work is not None  # allocated when num_valid > 0, the only case the loop runs
        sl = slice(lo, min(n, lo + shard.rows_per_chunk))
        c = sl.stop - lo
        logp = _scaled_minus(logits_p[sl, : shard.num_valid], log_zp[sl], inv_t, work[0, :c])
        logq = _scaled_minus(logits_q[sl, : shard.num_valid], log_zq[sl], inv_t, work[1, :c])
        diff = logq.neg_().add_(logp)
        kl[sl] = diff.mul_(logp.exp_()).sum(dim=1)
    if shard.group is not None:
        dist.all_reduce(kl, group=shard.group)
    return kl


@torch.no_grad()
def vocab_parallel_full_kl_from_hidden(
    hidden_p: Tensor,
    weight_p: Tensor,
    hidden_q: Tensor,
    weight_q: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """`vocab_parallel_full_kl` of the logits ``hidden_p @ weight_p.T`` and ``hidden_q @ weight_q.T``
    (``[N, H]`` hidden states, ``[V/TP, H]`` output-layer shards), computed for one chunk of rows at a
    time, so neither model's logits are ever whole. ``chunk_size``: rows per chunk (None: as the fused
    log-prob). Returns ``[N]``."""
    if hidden_p.shape != hidden_q.shape or weight_p.shape != weight_q.shape:
        raise ValueError(f"the two models' hidden states {tuple(hidden_p.shape)}, {tuple(hidden_q.shape)} and "
                         f"output weights {tuple(weight_p.shape)}, {tuple(weight_q.shape)} must match")
    n, v_local = hidden_p.shape[0], weight_p.shape[0]
    rows = chunk_size if chunk_size is not None else max(_fused_min_rows(hidden_p), _FUSED_CHUNK_ELEMENTS // v_local)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (automatic), got {chunk_size}")
    parts = [vocab_parallel_full_kl(hidden_p[lo:lo + rows] @ weight_p.t(), hidden_q[lo:lo + rows] @ weight_q.t(),
                                    tp_group=tp_group, temperature=temperature, vocab_start=vocab_start,
                                    vocab_size=vocab_size)
             for lo in range(0, n, rows)]
    dtype = torch.float64 if hidden_p.dtype == torch.float64 else torch.float32
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=hidden_p.device)
