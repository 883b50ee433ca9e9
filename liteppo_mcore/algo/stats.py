"""Global float64 statistics over data-parallel ranks, and mask helpers.

Every statistic in ``algo/`` is global: it covers the whole batch of the step, spread over the
data-parallel ranks. The reduction comes in as an ``allreduce_sum`` callable (a tensor in, its
element-wise sum over the group out; ``None`` means this process holds the whole batch), so this
package never imports ``torch.distributed``.

Moments use two reductions ("two-pass"): first ``(count, sum)`` gives the global mean ``mu``, then
``sum (x - mu)^2`` gives the global second central moment ``M2``. A single reduction of
``(count, sum, sum of squares)`` computes ``M2 = sumsq - sum^2 / count``, which loses most of its
significant digits when ``|mu| >> sigma`` (rewards such as 1000 +- 0.01); the second reduction costs
one tiny collective and keeps the result equal to a single-process computation to ~1e-15 relative.
Both reductions are issued by every rank, including a rank with no elements, so that no rank waits
on a collective another rank skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

AllReduceSum = Callable[[Tensor], Tensor]
"""Element-wise sum of a tensor over the reduction group; returns a new tensor."""

STAT_DTYPE = torch.float64


def as_bool_mask(mask: Tensor) -> Tensor:
    """A bool view of a mask given as bool or 0/1 numbers (any non-zero entry is valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


def reduce_sum(x: Tensor, allreduce_sum: AllReduceSum | None) -> Tensor:
    """``allreduce_sum(x)``, or ``x`` itself when this process holds the whole batch."""
    return x if allreduce_sum is None else allreduce_sum(x)


class Moments(NamedTuple):
    """Count, mean and second central moment ``M2 = sum (x - mean)^2`` of a set of numbers (float64)."""

    count: Tensor  # type: ignore[assignment]  # the number of values (shadows tuple.count)
    mean: Tensor
    m2: Tensor

    def var(self) -> Tensor:
        """Unbiased variance ``M2 / (count - 1)``; 0 for fewer than 2 values."""
        if self.count < 2:
            return torch.zeros_like(self.m2)
        return self.m2 / (self.count - 1)

    def std(self) -> Tensor:
        """Unbiased standard deviation; 0 for fewer than 2 values."""
        return self.var().sqrt()


def global_moments(
    x: Tensor, mask: Tensor | None = None, *, allreduce_sum: AllReduceSum | None = None
) -> Moments:
    """Count, mean and ``M2`` of the valid entries of ``x`` over all ranks, in float64.

    ``count = sum m``, ``mean = sum m x / count``, ``M2 = sum m (x - mean)^2`` where ``m`` is ``mask``
    (all ones when ``None``). With ``count = 0`` the mean and ``M2`` are 0. Two collectives, always.
    """
    values = x.detach().to(STAT_DTYPE)
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else as_bool_mask(mask)
    if valid.shape != values.shape:
        raise ValueError(f"mask shape {tuple(valid.shape)} differs from values shape {tuple(values.shape)}")
    values = torch.where(valid, values, 0.0)
    local = torch.stack([valid.sum().to(STAT_DTYPE), values.sum()])
    count, total = reduce_sum(local, allreduce_sum).unbind()
    mean = total / count.clamp(min=1.0)
    centred = torch.where(valid, values - mean, 0.0)
    m2 = reduce_sum(centred.square().sum().reshape(1), allreduce_sum).reshape(())
    return Moments(count=count, mean=mean, m2=m2)
