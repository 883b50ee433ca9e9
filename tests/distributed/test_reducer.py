"""The DP and DP x CP reducers on megatron-core's process groups, and the spawn helper itself."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import run_gloo


def _reducer_worker(rank, world_size):
    from megatron.core import parallel_state

    from liteppo_mcore.parallel import Reducer, make_allreduce_max, make_allreduce_sum

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=2
    )
    try:
        reducer = Reducer.from_parallel_state()
        one_hot = torch.zeros(world_size, dtype=torch.float64)
        one_hot[rank] = 1.0
        # Beyond float32's 24-bit mantissa: the reduction must stay float64 on gloo.
        fine = torch.tensor([1.0 + rank * 2.0 ** -40], dtype=torch.float64)
        source = torch.tensor([float(rank)])
        dp_members = reducer.dp_sum(one_hot)
        world = make_allreduce_sum(dist.group.WORLD)
        return {
            "dp_size": reducer.dp_size,
            "dp_cp_size": reducer.dp_cp_size,
            "cp_rank": parallel_state.get_context_parallel_rank(),
            "dp_members": dp_members.tolist(),
            "dp_cp_members": reducer.dp_cp_sum(one_hot).tolist(),
            "dp_cp_fine": reducer.dp_cp_sum(fine).item(),
            "dp_fine_dtype": str(reducer.dp_sum(fine).dtype),
            "dp_max": reducer.dp_max(source).item(),
            "dp_cp_max": reducer.dp_cp_max(source).item(),
            "world_sum": world(torch.ones(3)).tolist(),
            "world_max": make_allreduce_max(dist.group.WORLD)(source).item(),
            "input_untouched": one_hot.tolist() == [1.0 if r == rank else 0.0 for r in range(world_size)],
            "new_tensor": dp_members.data_ptr() != one_hot.data_ptr(),
            "single": Reducer.single_process().dp_sum(one_hot).tolist() == one_hot.tolist(),
        }
    finally:
        parallel_state.destroy_model_parallel()


def test_reducer_groups_at_cp2_dp2():
    results = run_gloo(_reducer_worker, 4, timeout=90)
    cp_rank = [r["cp_rank"] for r in results]
    assert sorted(cp_rank) == [0, 0, 1, 1]
    for rank, r in enumerate(results):
        assert (r["dp_size"], r["dp_cp_size"]) == (2, 4)
        # the DP group of a rank: itself and the rank with the same CP rank (sequence replicas differ)
        expected_dp = [1.0 if cp_rank[other] == cp_rank[rank] else 0.0 for other in range(4)]
        assert r["dp_members"] == expected_dp
        assert r["dp_cp_members"] == [1.0] * 4
        assert r["dp_cp_fine"] == 4.0 + 6 * 2.0 ** -40
        assert r["dp_fine_dtype"] == "torch.float64"
        assert r["dp_max"] == max(o for o in range(4) if cp_rank[o] == cp_rank[rank])
        assert r["dp_cp_max"] == 3.0 and r["world_max"] == 3.0
        assert r["world_sum"] == [4.0] * 3
        assert r["input_untouched"] and r["new_tensor"] and r["single"]


# ---------------------------------------------------------------- the spawn helper
def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ArithmeticError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 blocks here: the parent must not wait for it
    return rank


def _sleep_forever(rank, world_size):
    time.sleep(600)


def test_spawn_reports_child_traceback_and_kills_blocked_ranks():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 raised.*ArithmeticError: deliberate failure"):
        run_gloo(_fail_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30


def test_spawn_times_out():
    with pytest.raises(TimeoutError, match="did not finish"):
        run_gloo(_sleep_forever, 1, timeout=3)


def test_spawn_rejects_local_functions():
    def local(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="module-level"):
        run_gloo(local, 2)
