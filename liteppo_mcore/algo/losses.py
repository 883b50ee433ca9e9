"""Per-token PPO policy and value losses (semantics section 4).

Policy, with ``rho = exp(clamp(logp - old_logp, -20, 20))`` and ``eps = clip``::

    l = max(-rho * A, -clip(rho, 1 - eps_low, 1 + eps_high) * A)     (eps_low = eps_high = eps by default)
    dual clip (c = dual_clip_ratio > 1):  l <- min(l, -c * A)  where A < 0
    rollout importance weight (rollout_is):  l <- w * l,  w = min(exp(old_logp - rollout_logp), threshold)
                                             (per token, or of the response's sum), detached

Value (critic), with ``G`` the returns::

    e = (V - G)^2
    clip c:  Vc = V_old + clamp(V - V_old, -c, c),  e = max((V - G)^2, (Vc - G)^2)
    l = 0.5 * e

The log-ratio is clamped to ``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]`` (20, as verl) before ``exp``: in
float32 ``exp`` overflows past 88.7, and the backward pass through the inactive branch of the max (or
the dual clip's where) would then compute ``0 * inf`` and turn the whole step's gradient into NaN.
Within the bound (``rho`` up to 4.9e8) nothing changes; beyond it the token's gradient is 0, as it is
for a clipped token.

Both return the per-token loss ``[B, T]`` (0 at padding, in the promoted dtype of the inputs, with
gradients to ``logp`` / ``values`` only) and a metrics dict of detached 0-d float64 tensors that are
SUMS over this micro-batch's valid tokens (plus ``num_tokens``, and maxima where named so), so the
caller can all-reduce them over ranks and micro-batches and divide by the global token count.
Aggregating the per-token loss into a scalar is ``aggregation.aggregate``'s job.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stats import STAT_DTYPE, as_bool_mask

LOG_RATIO_BOUND = 20.0  # |log rho| at most this before exp (module docstring)
_POLICY_SUMS = ("clipfrac_sum", "clipfrac_low_sum", "clipfrac_high_sum", "dual_clipfrac_sum", "num_tokens",
                "approx_kl_k3_sum", "approx_kl_k1_sum")  # policy_loss's metric sums, in the order it reduces them


def _check_same_shape(mask: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected the mask's {tuple(mask.shape)}")


def _masked_sum(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x.detach().to(STAT_DTYPE), 0.0).sum()


def _masked_max_of_positive(x: Tensor, valid: Tensor) -> Tensor:
    """Max of a positive quantity over valid entries; 0 (neutral for a max) when there are none."""
    masked = torch.where(valid, x.detach().to(STAT_DTYPE), 0.0)
    return masked.amax() if masked.numel() else masked.new_zeros(())


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip: float,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip_ratio: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped (optionally dual-clipped) PPO surrogate per token; shapes ``[B, T]``. The ratio is clipped
    to ``[1 - clip_low, 1 + clip_high]``, each ``clip`` when None (clip-higher: a larger ``clip_high``).

    Metrics (sums over valid tokens unless noted):
      ``clipfrac_sum``       tokens where the clipped term is the active (strictly larger) one;
      ``clipfrac_low_sum``   of those, the ones below the lower bound (``A < 0``, ``rho < 1 - clip_low``);
      ``clipfrac_high_sum``  the ones above the upper bound (``A > 0``, ``rho > 1 + clip_high``);
      ``dual_clipfrac_sum``  tokens where the dual-clip bound ``-c*A`` is active (0 without dual clip);
      ``approx_kl_k3_sum``   k3 estimate of KL(old || new): ``(rho - 1) - log rho`` (>= 0);
      ``approx_kl_k1_sum``   k1 estimate of KL(old || new): ``-log rho`` (verl's ``ppo_kl``);
      ``ratio_max``          max of ``rho`` over valid tokens (0 when there are none: ``rho > 0``,
                             so 0 is neutral for a max-reduction);
      ``num_tokens``         number of valid tokens.
    """
    low = clip if clip_low is None else clip_low
    high = clip if clip_high is None else clip_high
    if not clip > 0:
        raise ValueError(f"pg_clip must be > 0, got {clip!r}")
    if not 0 < low < 1 or not high > 0:
        raise ValueError(f"the clip range needs 0 < pg_clip_low < 1 and pg_clip_high > 0, got {low!r} and {high!r}")
    if dual_clip_ratio is not None and not dual_clip_ratio > 1:
        raise ValueError(f"dual_clip_ratio must be > 1 (or None to disable dual clip), got {dual_clip_ratio!r}")
    _check_same_shape(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    valid = as_bool_mask(mask)
    # Mask the log-ratio before exp: garbage log-probs at padding would give inf * 0 = NaN otherwise;
    # clamp it: a finite but large one would too (module docstring).
    log_ratio = torch.where(valid, (logp - old_logp.detach()).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND), 0.0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages.detach(), 0.0)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - low, 1.0 + high) * adv
    loss = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(valid)
    if dual_clip_ratio is not None:
        bound = -dual_clip_ratio * adv
        dual_active = (adv < 0) & (bound < loss)
        loss = torch.where(dual_active, bound, loss)
    loss = torch.where(valid, loss, 0.0)
    with torch.no_grad():
        clip_active = valid & (clipped > unclipped)
        # the counts in one reduction, and the KL sums in another: log_ratio is exactly 0 at padding, where
        # both estimates are 0 too (expm1(0) - 0), so summing every entry sums the valid ones
        counts = torch.stack([clip_active, clip_active & (ratio < 1.0 - low), clip_active & (ratio > 1.0 + high),
                              valid & dual_active, valid]).flatten(1).sum(dim=1).to(STAT_DTYPE)
        kl_sums = torch.stack([torch.expm1(log_ratio) - log_ratio, -log_ratio]).to(STAT_DTYPE).flatten(1).sum(dim=1)
        metrics = dict(zip(_POLICY_SUMS, (*counts.unbind(), *kl_sums.unbind())))
        metrics["ratio_max"] = _masked_max_of_positive(ratio, valid)
    return loss, metrics


def rollout_importance_weight(log_weight: Tensor, mask: Tensor, *, threshold: float
                              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance weight ``w = min(exp(log_weight), threshold)`` per token, detached, 0 at padding.

    ``log_weight`` is ``old_logp - rollout_logp`` per token (``rollout_is: token``) or the response's sum
    of it on each of its tokens (``sequence``). ``exp(min(log_weight, log threshold))`` never overflows.
    Metrics (sums over valid tokens): ``is_weight_sum``, ``is_truncated_sum`` (tokens whose weight hit the
    threshold), ``is_weight_max`` (0 without valid tokens; weights are positive).
    """
    if not threshold >= 1:
        raise ValueError(f"rollout_is_threshold must be >= 1, got {threshold!r}")
    _check_same_shape(mask, log_weight=log_weight)
    valid = as_bool_mask(mask)
    with torch.no_grad():
        bound = math.log(threshold)
        logw = torch.where(valid, log_weight.detach(), 0.0)
        weight = torch.where(valid, torch.exp(logw.clamp(max=bound)), 0.0)
        metrics = {"is_weight_sum": _masked_sum(weight, valid),
                   "is_truncated_sum": (valid & (logw >= bound)).sum().to(STAT_DTYPE),
                   "is_weight_max": _masked_max_of_positive(weight, valid)}
    return weight, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic loss per token ``0.5 * e`` (module docstring), shapes ``[B, T]``; ``clip=None``: no clip.

    Metrics (sums over valid tokens): ``vf_clipfrac_sum`` (tokens where the clipped error is the larger
    one), ``values_sum`` (of ``V``), ``num_tokens``.
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"value_clip must be > 0 or None, got {clip!r}")
    _check_same_shape(mask, values=values, old_values=old_values, returns=returns)
    valid = as_bool_mask(mask)
    target = returns.detach()
    error = torch.where(valid, values - target, 0.0).square()
    clip_active = torch.zeros_like(valid)
    if clip is not None:
        old = old_values.detach()
        clipped_values = old + (values - old).clamp(-clip, clip)
        clipped_error = torch.where(valid, clipped_values - target, 0.0).square()
        clip_active = valid & (clipped_error > error)
        error = torch.maximum(error, clipped_error)
    loss = 0.5 * error
    with torch.no_grad():
        metrics = {
            "vf_clipfrac_sum": clip_active.sum().to(STAT_DTYPE),
            "values_sum": _masked_sum(values, valid),
            "num_tokens": valid.sum().to(STAT_DTYPE),
        }
    return loss, metrics
