"""Process groups and the reductions over them; the only user of ``megatron.core.parallel_state``."""

from .reducer import AllReduce, Reducer, group_world_size, make_allreduce_max, make_allreduce_sum

__all__ = ["AllReduce", "Reducer", "group_world_size", "make_allreduce_max", "make_allreduce_sum"]
