"""Which GPU a process takes (parallel/setup.py local_rank): torchrun's LOCAL_RANK, srun's SLURM_LOCALID,
and a refusal when several processes would all land on GPU 0."""

import pytest

from liteppo_mcore.parallel.setup import local_rank


@pytest.fixture
def env(monkeypatch):
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun_then_srun_then_a_lone_process(env):
    assert local_rank() == 0
    env.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3
    env.setenv("LOCAL_RANK", "1")  # torchrun under srun: torchrun's own index wins
    assert local_rank() == 1


def test_several_processes_without_a_local_index_are_refused(env):
    env.setenv("WORLD_SIZE", "8")
    with pytest.raises(RuntimeError,
                       match="neither LOCAL_RANK nor SLURM_LOCALID is set, so every process would use GPU 0"):
        local_rank()
    env.setenv("SLURM_LOCALID", "7")
    assert local_rank() == 7
    env.setenv("LOCAL_RANK", "x")
    with pytest.raises(RuntimeError, match="LOCAL_RANK='x' is not a GPU index"):
        local_rank()
