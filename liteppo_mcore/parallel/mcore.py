"""megatron-core's model-parallel groups: built here (the only caller of `parallel_state`), handed out
as one `ParallelGroups` object that the rest of the package receives instead of reading globals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from liteppo_mcore.parallel import cpu_compat


@dataclass(frozen=True)
class ParallelGroups:
    """The groups and ranks of this process in a TP x CP x PP x DP layout.

    A group is None only in a hand-built single-process layout (its size is then 1); the groups of
    `current_groups` are megatron's, never None."""

    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    cp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None     # data parallel only: sequence-level statistics
    dp_cp_group: dist.ProcessGroup | None  # data x context parallel: sums of CP-local token quantities
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def initialize_model_parallel(tp: int, pp: int, cp: int, seed: int = 42,
                              timeout_minutes: float | None = None) -> ParallelGroups:
    """Build megatron's groups on top of the default process group (which must exist), seed the
    model-parallel RNG streams, and return the groups. On CPU the compatibility layer goes in first.

    `timeout_minutes` (the run's `parallel.timeout_minutes`) is the time limit of every group megatron
    creates; without it megatron gives them its own 30 minutes, whatever the default group has, so a
    hung rank would stall the job that long."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("initialize the default process group first (liteppo_mcore.parallel.setup)")
    cpu_compat.install()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    extra = {} if timeout_minutes is None else {"distributed_timeout_minutes": float(timeout_minutes)}
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp, **extra)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_groups()


def current_groups() -> ParallelGroups:
    from megatron.core import parallel_state as ps

    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(), dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(), cp_size=ps.get_context_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
