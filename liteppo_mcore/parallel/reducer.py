"""All-reduce callables over the right process groups, for the global statistics of ``algo``.

``algo`` takes its reductions as ``allreduce_sum(tensor) -> tensor`` callables; this module builds
them. Which group (docs/semantics.md, "Which ranks a statistic is reduced over"):

- ``dp_sum``: the data-parallel group. Sequences (scores, rewards, per-sequence counts) are replicated
  on every TP/PP/CP rank of a model replica, and advantages/whitening work on gathered whole
  sequences, so sums over them go over DP only.
- ``dp_cp_sum``: DP x CP. During forward/backward CP splits each sequence's tokens, so sums of
  CP-local token quantities (a micro-batch's token count, a CP-local loss) go over DP x CP.

Every rank of the group must call the callable the same number of times, in the same order, also a
rank without valid tokens. The callables are not differentiable: they reduce detached copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from liteppo_mcore.parallel.device import collective_device

AllReduce = Callable[[Tensor], Tensor]


def group_world_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks of ``group``; 1 for ``None`` (no group: this process holds everything)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group=group)


def _comm_device(group: dist.ProcessGroup | None, tensor: Tensor) -> torch.device:
    """NCCL reduces only CUDA tensors; statistics are often built on the host, so move them there."""
    device = collective_device(group)
    return device if device.type == "cuda" and tensor.device.type != "cuda" else tensor.device


def _make_allreduce(group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType) -> AllReduce:
    if group_world_size(group) == 1:
        return lambda tensor: tensor.detach().clone()

    def allreduce(tensor: Tensor) -> Tensor:
        buffer = tensor.detach().to(_comm_device(group, tensor), copy=True).contiguous()
        dist.all_reduce(buffer, op=op, group=group)
        return buffer.to(tensor.device)

    return allreduce


def make_allreduce_sum(group: dist.ProcessGroup | None) -> AllReduce:
    """A callable returning a NEW tensor, the element-wise sum of its argument over ``group``.

    The input is left untouched and keeps its dtype (float64 works on gloo and NCCL). ``group=None``
    or a group of one rank gives a plain copy; pass ``torch.distributed.group.WORLD`` for all ranks.
    """
    return _make_allreduce(group, dist.ReduceOp.SUM)


def make_allreduce_max(group: dist.ProcessGroup | None) -> AllReduce:
    """Like ``make_allreduce_sum`` with an element-wise maximum (e.g. ``actor/ratio_max``)."""
    return _make_allreduce(group, dist.ReduceOp.MAX)


class Reducer:
    """Sum/max callables over the DP group and over the DP x CP group.

    Build it with ``Reducer.from_parallel_state()`` after megatron's ``initialize_model_parallel``, or
    ``Reducer.single_process()`` when one process holds the whole batch.
    """

    def __init__(self, dp_group: dist.ProcessGroup | None, dp_cp_group: dist.ProcessGroup | None) -> None:
        self.dp_group = dp_group
        self.dp_cp_group = dp_cp_group
        self.dp_sum: AllReduce = make_allreduce_sum(dp_group)
        self.dp_cp_sum: AllReduce = make_allreduce_sum(dp_cp_group)
        self.dp_max: AllReduce = make_allreduce_max(dp_group)
        self.dp_cp_max: AllReduce = make_allreduce_max(dp_cp_group)

    @property
    def dp_size(self) -> int:
        return group_world_size(self.dp_group)

    @property
    def dp_cp_size(self) -> int:
        return group_world_size(self.dp_cp_group)

    @classmethod
    def from_parallel_state(cls) -> Reducer:
        """The groups of megatron-core's ``parallel_state`` (must be initialized)."""
        from megatron.core import parallel_state

        return cls(
            dp_group=parallel_state.get_data_parallel_group(),
            dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )

    @classmethod
    def single_process(cls) -> Reducer:
        """Identity reductions: this process holds the whole batch."""
        return cls(dp_group=None, dp_cp_group=None)


def all_gather_padded(tensor: Tensor, group: dist.ProcessGroup | None, *, equal_rows: bool = False) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order, on every rank of ``group``.

    Trailing dimensions may differ between ranks: each is zero-padded to the largest over the group.
    ``equal_rows=True`` asserts that every rank holds the same number of rows (dim 0).
    """
    if group_world_size(group) == 1:
        return tensor.clone()
    shape = torch.tensor(list(tensor.shape), dtype=torch.long)
    shapes = torch.empty(group_world_size(group), shape.numel(), dtype=torch.long)
    _gather_shapes(shape, shapes, group)
    if equal_rows and not bool((shapes[:, 0] == shapes[0, 0]).all()):
        raise ValueError(f"every data-parallel rank must hold the same number of rows, got {shapes[:, 0].tolist()}")
    wide = shapes.amax(dim=0)
    wide[0] = int(shapes[:, 0].max())
    as_bytes = tensor.dtype == torch.bool  # gloo cannot move bool tensors
    local = tensor.to(torch.uint8) if as_bytes else tensor
    padded = local.new_zeros(tuple(int(w) for w in wide))
    padded[tuple(slice(0, n) for n in tensor.shape)] = local
    device = _comm_device(group, padded)
    parts = [torch.empty_like(padded, device=device) for _ in range(shapes.shape[0])]
    dist.all_gather(parts, padded.to(device), group=group)
    rows = [part[:int(n)].to(tensor.device) for part, n in zip(parts, shapes[:, 0])]
    out = torch.cat(rows)
    return out.bool() if as_bytes else out


def _gather_shapes(shape: Tensor, out: Tensor, group: dist.ProcessGroup | None) -> None:
    device = _comm_device(group, shape)
    parts = [torch.empty_like(shape, device=device) for _ in range(out.shape[0])]
    dist.all_gather(parts, shape.to(device), group=group)
    out.copy_(torch.stack([p.cpu() for p in parts]))
