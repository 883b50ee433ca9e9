"""Advantages and returns (semantics section 3).

All tensors are ``[B, T]`` over response positions; ``mask`` is 1 for ``t < L_i``. The response is
terminal after its last valid token (truncated ones too), so ``V[i, L_i] := 0``::

    gae                  delta_t = R_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lambd * A_{t+1},
                         G_t = A_t + V_t
    reinforce            A_t = G_t = sum_{k=t}^{L_i-1} gamma^(k-t) R_k
    grpo                 A_t = G_t = r~_i on every valid token
    rloo                 s_i = sum_t R_t,  A_t = G_t = s_i - mean_{j != i in i's group} s_j
                             = n / (n - 1) * (s_i - mean of the group)      on every valid token
    reinforce_plus_plus  G_t = sum_{k=t}^{L_i-1} gamma^(k-t) R_k,  A = whiten(G) (always)

then optionally whitening ``A <- (A - mu_A) / sqrt(var_A + 1e-8)`` over the valid tokens of the global
batch (reinforce_plus_plus is whitened already and is not whitened twice), and ``A <- clamp(A, -c, c)``.
``R_t`` are the token rewards: the normalized score on the last valid token, minus the token-level KL
penalty when it is on (``kl.token_level_rewards``); groups are ``group_size`` consecutive rows and never
straddle ranks, so the leave-one-out mean is local while whitening is over every rank. Padding is 0 in
every output, and values or rewards at padding positions never reach a valid position. Recursions run in
float64; outputs keep the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from liteppo_mcore.config.choices import ADV_ESTIMATORS

from .stats import STAT_DTYPE, AllReduceSum, as_bool_mask, global_moments

# The inputs each estimator needs; its keys are exactly ADV_ESTIMATORS (a unit test checks).
NEEDED_INPUTS = {"gae": ("token_rewards", "values"), "reinforce": ("token_rewards",), "grpo": ("normalized_scores",),
                 "rloo": ("token_rewards",), "reinforce_plus_plus": ("token_rewards",)}


def _check_2d(mask: Tensor, **tensors: Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected the mask's {tuple(mask.shape)}")


def _reverse_discounted_sum(x: Tensor, valid: Tensor, discount: float) -> Tensor:
    """``y_t = (x_t + discount * y_{t+1}) * m_t`` from the right, ``y_T = 0``; [B, T] float64.

    The product with ``m_t`` restarts the sum at padding, so a right-padded row accumulates only its own
    valid positions.
    """
    out = torch.zeros_like(x)
    carry = x.new_zeros(x.shape[0])
    m = valid.to(x.dtype)
    for t in range(x.shape[1] - 1, -1, -1):
        carry = (x[:, t] + discount * carry) * m[:, t]
        out[:, t] = carry
    return out


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lambd: float
) -> tuple[Tensor, Tensor]:
    """Masked GAE: ``(advantages, returns)``, both [B, T], 0 at padding (module docstring).

    ``rewards`` and ``values`` are [B, T]; values at padding (including ``V[i, L_i]``) are treated as 0,
    so the last response token bootstraps from 0.
    """
    _check_2d(mask, rewards=rewards, values=values)
    valid = as_bool_mask(mask)
    r = torch.where(valid, rewards.detach().to(STAT_DTYPE), 0.0)
    v = torch.where(valid, values.detach().to(STAT_DTYPE), 0.0)
    next_v = torch.nn.functional.pad(v[:, 1:], (0, 1))
    deltas = torch.where(valid, r + gamma * next_v - v, 0.0)
    advantages = _reverse_discounted_sum(deltas, valid, gamma * lambd)
    returns = torch.where(valid, advantages + v, 0.0)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    return advantages.to(dtype), returns.to(dtype)


def compute_returns(rewards: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """Discounted reward-to-go ``G_t = sum_{k=t}^{L_i-1} gamma^(k-t) R_k`` [B, T], 0 at padding."""
    _check_2d(mask, rewards=rewards)
    valid = as_bool_mask(mask)
    r = torch.where(valid, rewards.detach().to(STAT_DTYPE), 0.0)
    return _reverse_discounted_sum(r, valid, gamma).to(rewards.dtype)


def compute_rloo(rewards: Tensor, mask: Tensor, *, group_size: int) -> Tensor:
    """Leave-one-out advantages [B, T]: each response's summed token rewards minus the mean of the other
    responses of its group (``group_size`` consecutive rows), on every valid token; 0 at padding."""
    _check_2d(mask, rewards=rewards)
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"rloo needs a group of at least 2 responses, got group_size={group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {rewards.shape[0]} responses on this rank: "
                         "each rank must hold whole groups")
    valid = as_bool_mask(mask)
    totals = torch.where(valid, rewards.detach().to(STAT_DTYPE), 0.0).sum(dim=1).reshape(-1, group_size)
    others = (totals.sum(dim=1, keepdim=True) - totals) / (group_size - 1)
    return torch.where(valid, (totals - others).reshape(-1, 1), 0.0).to(rewards.dtype)


def masked_whiten(
    x: Tensor, mask: Tensor, *, allreduce_sum: AllReduceSum | None = None, eps: float = 1e-8
) -> Tensor:
    """``(x - mu) / sqrt(var + eps) * m`` with the token-weighted mean and unbiased variance of the
    valid entries over all ranks (float64). Returns ``x * m`` unchanged when fewer than 2 entries are
    valid globally. The collectives run on every rank, also one without valid entries.
    """
    valid = as_bool_mask(mask)
    if valid.shape != x.shape:
        raise ValueError(f"mask shape {tuple(valid.shape)} differs from x shape {tuple(x.shape)}")
    moments = global_moments(x, valid, allreduce_sum=allreduce_sum)
    values = x.detach().to(STAT_DTYPE)
    if moments.count >= 2:
        values = (values - moments.mean) / torch.sqrt(moments.var() + eps)
    return torch.where(valid, values, 0.0).to(x.dtype)


def compute_advantages(
    estimator: str,
    mask: Tensor,
    *,
    token_rewards: Tensor | None = None,
    values: Tensor | None = None,
    normalized_scores: Tensor | None = None,
    gamma: float = 1.0,
    lambd: float = 1.0,
    whiten: bool = False,
    advantage_clip: float | None = None,
    allreduce_sum: AllReduceSum | None = None,
    group_size: int | None = None,
    in_loss: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(advantages, returns)`` [B, T] for ``estimator`` in ADV_ESTIMATORS (module docstring).

    Needs ``token_rewards`` [B, T] (gae, reinforce, rloo, reinforce_plus_plus), ``values`` [B, T] (gae),
    ``normalized_scores`` [B] (grpo) and ``group_size`` (rloo). Whitening (global over ``allreduce_sum``'s
    ranks: DP, since advantages are computed on whole sequences) and the clip apply to the advantages
    only; returns are the critic's targets.
    A token was clipped iff ``|A| == advantage_clip`` afterwards (for the ``adv/clip_frac`` metric).
    ``in_loss`` [B] bool (overlong_filter): responses outside it get ``A = G = 0`` and stay out of the
    whitening statistics, but still count in the leave-one-out baseline (a reward statistic).
    """
    if estimator not in ADV_ESTIMATORS:
        raise ValueError(f"unknown adv_estimator={estimator!r}; valid: {', '.join(ADV_ESTIMATORS)}")
    if advantage_clip is not None and not advantage_clip > 0:
        raise ValueError(f"advantage_clip must be positive or None, got {advantage_clip!r}")
    given = {"token_rewards": token_rewards, "values": values, "normalized_scores": normalized_scores}
    missing = [name for name in NEEDED_INPUTS[estimator] if given[name] is None]
    if missing:
        raise ValueError(f"adv_estimator={estimator!r} needs {', '.join(missing)}")
    trained = as_bool_mask(mask)
    if in_loss is not None:
        if in_loss.shape != trained.shape[:1]:
            raise ValueError(f"in_loss must be [B] = {tuple(trained.shape[:1])}, got {tuple(in_loss.shape)}")
        trained = trained & in_loss.bool()[:, None]
    if estimator == "gae":
        assert token_rewards is not None and values is not None  # checked above (NEEDED_INPUTS)
        advantages, returns = compute_gae(token_rewards, values, mask, gamma=gamma, lambd=lambd)
    elif estimator in ("reinforce", "reinforce_plus_plus"):
        assert token_rewards is not None
        returns = compute_returns(token_rewards, mask, gamma=gamma)
        advantages = returns
        if estimator == "reinforce_plus_plus":
            advantages = masked_whiten(returns, trained, allreduce_sum=allreduce_sum)
            whiten = False  # whitened once; twice would only move it by the epsilon
    elif estimator == "rloo":
        assert token_rewards is not None
        if group_size is None:
            raise ValueError("adv_estimator='rloo' needs group_size (num_return_sequences_in_group)")
        advantages = returns = compute_rloo(token_rewards, mask, group_size=group_size)
    else:
        assert normalized_scores is not None
        valid = as_bool_mask(mask)
        if normalized_scores.shape != valid.shape[:1]:
            raise ValueError(
                f"normalized_scores must be [B] = {tuple(valid.shape[:1])}, got {tuple(normalized_scores.shape)}"
            )
        returns = torch.where(valid, normalized_scores.unsqueeze(1), 0.0)
        advantages = returns
    if in_loss is not None:
        advantages, returns = torch.where(trained, advantages, 0.0), torch.where(trained, returns, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, trained, allreduce_sum=allreduce_sum)
    if advantage_clip is not None:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
    return advantages, returns
