"""Every process group megatron creates for us has the run's `parallel.timeout_minutes`, not megatron's
own 30 minutes: otherwise a hung rank stalls the job for half an hour whatever the configuration says."""

from tests.distributed.spawn import run_gloo


def timeouts_worker(rank, world_size):
    import torch

    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    def minutes(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60

    out = {}
    for configured in (3, None):
        groups = initialize_model_parallel(2, 1, 1, seed=1, timeout_minutes=configured)
        out[configured] = sorted({minutes(g) for g in (groups.tp_group, groups.pp_group, groups.dp_group,
                                                         groups.dp_cp_group, groups.cp_group)})
        destroy_model_parallel()
    return out


def test_megatron_groups_take_the_configured_timeout():
    for result in run_gloo(timeouts_worker, 2):
        assert result[3] == [3.0]
        assert result[None] == [30.0]  # megatron's default, which the trainer never leaves in place
