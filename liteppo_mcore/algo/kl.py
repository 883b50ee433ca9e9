"""Per-token KL estimates and token-level rewards (semantics section 2).

With ``d = logp - ref_logp`` (for the reward penalty ``logp`` is ``old_logp``; for the KL loss it is
the current ``logp``), the per-token estimators of ``KL(pi || pi_ref)`` are::

    "kl"   d
    "abs"  |d|
    "mse"  d^2 / 2
    "k3"   min(exp(-d') + d' - 1, 10),  d' = clamp(d, -20, 20)
                                  (non-negative, unbiased under samples of pi within the bounds)

k3's bounds are verl's (`K3_LOG_RATIO_BOUND`, `K3_MAX`): unclamped, ``exp(-d)`` overflows in float32
once ``d < -88.7`` and the KL loss is infinite; with them the estimate is finite for any input, exact
where ``|d| <= 20`` and the value at most 10, and its gradient is 0 outside.

The exact full-vocabulary KL (``kl_penalty: full``) needs both distributions at every position and is
computed where the logits live (vocab-parallel, in ``models/``), not here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from liteppo_mcore.config.choices import KL_ESTIMATORS as KL_KINDS
from liteppo_mcore.config.choices import KL_PENALTIES

from .stats import STAT_DTYPE, AllReduceSum, as_bool_mask, reduce_sum

K3_LOG_RATIO_BOUND = 20.0  # |d| at most this inside k3
K3_MAX = 10.0  # k3 at most this


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate ``f(d)``, ``d = logp - ref_logp``, same shape as the inputs, unmasked."""
    if kind not in KL_KINDS:
        # A kl_penalty value that is no per-token estimate (full) needs the logits, not the log-probs.
        hint = f" ({kind!r} is computed from the logits in models/)" if kind in KL_PENALTIES else ""
        raise ValueError(f"unknown KL estimator kind={kind!r}; valid: {', '.join(KL_KINDS)}{hint}")
    d = logp - ref_logp
    if kind == "kl":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    # exp(-d) - 1 via expm1 keeps k3 accurate (and >= 0) for tiny d, where it is ~d^2/2.
    d = d.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
    return (torch.expm1(-d) + d).clamp(max=K3_MAX)


def token_level_rewards(
    normalized_scores: Tensor, mask: Tensor, *, kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """Token rewards ``R[i,t] = r~_i [t = L_i - 1] - kl_coef * kl[i,t]`` on valid tokens, 0 on padding.

    Shapes: ``normalized_scores`` [B], ``mask`` [B, T] (1 on response tokens), ``kl`` [B, T] or None.
    ``L_i - 1`` is the last valid position of row ``i``; a row without valid tokens gets no score.
    """
    valid = as_bool_mask(mask)
    if normalized_scores.dim() != 1 or valid.dim() != 2 or valid.shape[0] != normalized_scores.shape[0]:
        raise ValueError(
            f"expected normalized_scores [B] and mask [B, T], got {tuple(normalized_scores.shape)} "
            f"and {tuple(valid.shape)}"
        )
    dtype = normalized_scores.dtype if kl is None else torch.promote_types(normalized_scores.dtype, kl.dtype)
    positions = torch.arange(valid.shape[1], device=valid.device)
    last = torch.where(valid, positions, -1).amax(dim=-1)
    at_last = positions.unsqueeze(0) == last.unsqueeze(1)  # last = -1 matches nothing
    rewards = torch.where(at_last, normalized_scores.to(dtype).unsqueeze(1), 0.0)
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * torch.where(valid, kl.to(dtype), 0.0)
    return torch.where(valid, rewards, 0.0)


def mean_of_sequence_means(
    x: Tensor, mask: Tensor, *, allreduce_sum: AllReduceSum | None = None
) -> Tensor:
    """``mean_i (sum_t m x / sum_t m)`` over responses with a valid token, all ranks; float64 0-d.

    This is ``KL_step`` of the adaptive KL controller (``x`` = per-token KL). ``allreduce_sum`` sums over
    the ranks holding distinct whole responses (DP). 0 when no response has a valid token.
    """
    valid = as_bool_mask(mask)
    values = torch.where(valid, x.detach().to(STAT_DTYPE), 0.0)
    counts = valid.sum(dim=-1).to(STAT_DTYPE)
    per_seq = values.sum(dim=-1) / counts.clamp(min=1.0)
    local = torch.stack([per_seq.sum(), (counts > 0).sum().to(STAT_DTYPE)])
    total, num_seqs = reduce_sum(local, allreduce_sum).unbind()
    return total / num_seqs.clamp(min=1.0)
