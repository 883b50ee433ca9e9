"""Response-level reward normalization (semantics section 1).

For response ``i`` with raw score ``r_i``, mean ``mu_i`` and std ``sigma_i`` chosen by ``reward_norm``::

    default        r~_i = (r_i - mu_i) / (sigma_i + eps)
    reward_shift   r~_i =  r_i - mu_i
    reward_scale   r~_i =  r_i / (sigma_i + eps)
    reward_clip c  r~_i = clamp(r~_i, -c, c)      (after the above; also with reward_norm=None)

| reward_norm | mu_i                          | sigma_i                                           |
|-------------|-------------------------------|---------------------------------------------------|
| "group"     | mean of r over i's group      | div_std_global: std of raw r over the global batch |
|             |                               | otherwise: std over i's group                      |
| "batch"     | mean over the global batch    | std over the global batch                          |
| "running"   | running mean incl. this batch | running std incl. this batch                       |
| None        | r~_i = r_i                    |                                                    |

Stds are unbiased (n - 1) and 0 for fewer than 2 values; statistics are float64 over every
data-parallel rank (see ``stats``). Groups are ``group_size`` consecutive responses and never straddle
ranks, so group means are local; only batch-wide statistics need the collective.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from liteppo_mcore.config.choices import REWARD_NORMS

from .stats import STAT_DTYPE, AllReduceSum, Moments, global_moments


class RunningMoments:
    """Exact count, mean and ``M2`` of every reward seen so far, merged batch by batch (Chan et al.).

    Merging batch ``b`` (global over ranks) into the state ``a``::

        n = n_a + n_b,  delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n
        M2   = M2_a + M2_b + delta^2 * n_a * n_b / n

    The state is plain Python floats built only from all-reduced numbers, so it is identical on every
    rank; it belongs in the checkpoint (``state_dict``/``load_state_dict``).
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Unbiased variance of everything seen; 0 for fewer than 2 values."""
        return self.m2 / (self.count - 1) if self.count >= 2 else 0.0

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen; 0 for fewer than 2 values."""
        return math.sqrt(self.var)

    def update(self, x: Tensor, *, allreduce_sum: AllReduceSum | None = None) -> None:
        """Fold this step's rewards (this rank's share of ``x``; the batch is global) into the state."""
        self.merge(global_moments(x.reshape(-1), allreduce_sum=allreduce_sum))

    def merge(self, batch: Moments) -> None:
        """Fold already-reduced global moments of one batch into the state."""
        n_b = float(batch.count)
        if n_b == 0:
            return
        n_a = self.count
        n = n_a + n_b
        delta = float(batch.mean) - self.mean
        self.mean += delta * n_b / n
        self.m2 += float(batch.m2) + delta * delta * n_a * n_b / n
        self.count = n

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"RunningMoments state is missing {sorted(missing)}")
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def _validate(
    scores: Tensor, group_size: int, reward_norm: str | None, reward_shift: bool,
    reward_scale: bool, reward_clip: float | None, running: RunningMoments | None,
) -> None:
    if scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor [N] of response scores, got shape {tuple(scores.shape)}")
    if reward_norm not in REWARD_NORMS:
        raise ValueError(f"unknown reward_norm={reward_norm!r}; valid: {', '.join(map(repr, REWARD_NORMS))}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if scores.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the number of responses on this rank "
            f"({scores.numel()}): each rank must hold whole groups of consecutive responses"
        )
    if reward_norm == "group" and group_size < 2:
        raise ValueError(
            "reward_norm='group' needs group_size >= 2 (got 1): with one response per prompt every "
            "centred reward is 0. Use a larger group, or reward_norm='batch'."
        )
    if reward_shift and reward_scale:
        raise ValueError("reward_shift and reward_scale cannot both be true: set at most one of them")
    if reward_clip is not None and not reward_clip > 0:
        raise ValueError(f"reward_clip must be positive or None, got {reward_clip!r}")
    if reward_norm == "running" and running is None:
        raise ValueError("reward_norm='running' needs a RunningMoments passed as running=")


def _mean_and_std(
    r: Tensor, group_size: int, reward_norm: str, div_std_global: bool,
    running: RunningMoments | None, allreduce_sum: AllReduceSum | None,
) -> tuple[Tensor, Tensor]:
    """Per-response ``mu_i`` and ``sigma_i`` (float64, shape [N]) for the chosen normalization."""
    if reward_norm == "running":
        if running is None:
            raise ValueError("reward_norm='running' needs a RunningMoments passed as running=")
        running.update(r, allreduce_sum=allreduce_sum)
        return torch.full_like(r, running.mean), torch.full_like(r, running.std)
    if reward_norm == "batch":
        batch = global_moments(r, allreduce_sum=allreduce_sum)
        return batch.mean.expand_as(r), batch.std().expand_as(r)
    groups = r.reshape(-1, group_size)
    mu = groups.mean(dim=-1, keepdim=True).expand_as(groups).reshape(-1)
    if div_std_global:
        # The std of the RAW rewards over the whole batch (LitePPO), not of the group-centred ones.
        return mu, global_moments(r, allreduce_sum=allreduce_sum).std().expand_as(r)
    sigma = groups.std(dim=-1, correction=1, keepdim=True).expand_as(groups).reshape(-1)
    return mu, sigma


def normalize_rewards(
    scores: Tensor,
    *,
    group_size: int,
    reward_norm: str | None,
    div_std_global: bool = True,
    reward_shift: bool = False,
    reward_scale: bool = False,
    reward_clip: float | None = None,
    running: RunningMoments | None = None,
    allreduce_sum: AllReduceSum | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Normalized response rewards ``r~`` [N] from this rank's raw scores [N] (see the module table).

    ``scores`` holds whole groups: responses ``k*group_size .. (k+1)*group_size - 1`` share a prompt.
    ``allreduce_sum`` sums over the data-parallel group (``None``: this process holds the whole batch).
    With ``reward_norm="running"``, ``running`` is updated with this step's global batch first and the
    updated statistics normalize it. The collectives are issued on every rank, also one with N = 0.
    The result has the dtype of ``scores``; the arithmetic is float64.
    """
    _validate(scores, group_size, reward_norm, reward_shift, reward_scale, reward_clip, running)
    r = scores.detach().to(STAT_DTYPE)
    if reward_norm is None:
        out = r
    else:
        mu, sigma = _mean_and_std(r, group_size, reward_norm, div_std_global, running, allreduce_sum)
        if reward_shift:
            out = r - mu
        elif reward_scale:
            out = r / (sigma + eps)
        else:
            out = (r - mu) / (sigma + eps)
    if reward_clip is not None:
        out = out.clamp(-reward_clip, reward_clip)
    return out.to(scores.dtype)
