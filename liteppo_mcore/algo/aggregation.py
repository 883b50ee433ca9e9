"""Loss aggregation ``Agg(X)`` over one optimizer mini-batch (semantics section 4).

| mode                      | Agg(X)                                          |
|---------------------------|-------------------------------------------------|
| "token-mean"              | sum_{i,t} m X / N_tok                           |
| "seq-mean-token-sum"      | sum_i (sum_t m X) / N_seq                       |
| "seq-mean-token-mean"     | sum_i (sum_t m X / n_i) / N_seq,  n_i = sum_t m |
| "seq-mean-token-sum-norm" | sum_i (sum_t m X) / (N_seq * response_length)   |

``N_tok`` and ``N_seq`` (responses with at least one valid token) are GLOBAL counts of the whole
optimizer mini-batch, over all its micro-batches and ranks. ``aggregate`` returns one micro-batch's
share of the sum: the numerator is local, the denominators are global, so the sum of the shares over
all micro-batches and ranks is ``Agg(X)`` and so is its gradient, whatever the layout.

Which ranks the caller reduces the counts over: ``N_tok`` over DP x CP when each CP rank holds a slice
of the tokens (each token counted once); ``N_seq`` over DP only (every CP rank holds every sequence);
``n_i`` is the FULL count of sequence ``i`` (pass it as ``seq_token_counts`` when CP splits tokens).
A response without valid tokens contributes 0 in every mode. ``token_level_loss: true`` maps to
"token-mean"; that choice is the caller's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from liteppo_mcore.config.choices import LOSS_AGG_MODES as AGG_MODES

from .stats import as_bool_mask

Count = int | float | Tensor


def _at_least_one(n: Count, dtype: torch.dtype) -> float | Tensor:
    """A denominator that turns an empty mini-batch into 0 instead of NaN (its numerator is 0)."""
    if isinstance(n, Tensor):
        return n.detach().to(dtype).clamp(min=1.0)
    return max(float(n), 1.0)


def aggregate(
    x: Tensor,
    mask: Tensor,
    *,
    mode: str,
    num_tokens: Count,
    num_seqs: Count,
    response_length: int | None = None,
    seq_token_counts: Tensor | None = None,
) -> Tensor:
    """This micro-batch's share of ``Agg(x)`` (module table); ``x``, ``mask`` [B, T]; 0-d, ``x``'s dtype.

    ``seq_token_counts`` [B]: full token count of each sequence for "seq-mean-token-mean" (default
    ``mask.sum(-1)``, right when the micro-batch holds whole sequences), or [B, T]: at each token, the
    count of the token's sequence (a packed row holds several sequences). ``response_length`` is needed
    by "seq-mean-token-sum-norm". Padding values of ``x`` (even NaN) never enter the result.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode={mode!r}; valid: {', '.join(AGG_MODES)}")
    valid = as_bool_mask(mask)
    if valid.shape != x.shape or x.dim() != 2:
        raise ValueError(f"x and mask must both be [B, T], got {tuple(x.shape)} and {tuple(valid.shape)}")
    masked = torch.where(valid, x, 0.0)
    if mode == "token-mean":
        return masked.sum() / _at_least_one(num_tokens, x.dtype)
    if mode == "seq-mean-token-sum":
        return masked.sum() / _at_least_one(num_seqs, x.dtype)
    if mode == "seq-mean-token-sum-norm":
        if response_length is None or not response_length > 0:
            raise ValueError(
                f"loss_agg_mode='seq-mean-token-sum-norm' needs a positive response_length, got {response_length!r}"
            )
        return masked.sum() / (_at_least_one(num_seqs, x.dtype) * response_length)
    counts = valid.sum(dim=-1) if seq_token_counts is None else seq_token_counts.detach()
    if counts.shape == x.shape:  # per token: the count of the token's own sequence (packed rows hold several)
        return (masked / counts.to(x.dtype).clamp(min=1.0)).sum() / _at_least_one(num_seqs, x.dtype)
    if counts.shape != x.shape[:1]:
        raise ValueError(f"seq_token_counts must be [B] = {tuple(x.shape[:1])} or [B, T] = {tuple(x.shape)}, "
                         f"got {tuple(counts.shape)}")
    per_seq = masked.sum(dim=-1) / counts.to(x.dtype).clamp(min=1.0)
    return per_seq.sum() / _at_least_one(num_seqs, x.dtype)
