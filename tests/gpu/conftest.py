"""Fixtures of the GPU tests (tests/gpu/helpers.py says when they run and skip).

Every test runs in this one pytest process: one process group (world size 1: NCCL on a GPU, gloo in
the CPU rehearsal) for the tests of this package (destroyed after them: the rest of the suite runs
in the same process and expects none), megatron's model-parallel groups built and destroyed per
test (the trainer does its own), so imports and CUDA start-up are paid once.
"""

import pytest

from tests.gpu import helpers as H


@pytest.fixture(autouse=True)
def _gpu_requirements(request):
    """Under LITEPPO_REQUIRE_GPU=1 a missing GPU or package fails the test instead of skipping it.
    `gpu(cuda_only=True)`: the test needs a real GPU even in the CPU rehearsal."""
    mark = request.node.get_closest_marker("gpu")
    message = H.check_required(cuda_only=bool(mark is not None and mark.kwargs.get("cuda_only")))
    if message:
        pytest.fail(message)
    yield
    if H.cuda_available():
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@pytest.fixture(scope="package")
def process_group(tmp_path_factory):
    """The default process group of a lone process, as the trainer's launch starts it."""
    import torch.distributed as dist

    from liteppo_mcore.parallel.setup import init_distributed

    cfg = H.load_trainer_config(H.trainer_overrides(str(tmp_path_factory.mktemp("pg")), dtype=H.dtypes()[-1]))
    layout = init_distributed(cfg)
    yield layout
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def groups(process_group):
    """megatron's model-parallel groups (TP = PP = CP = 1) for one test."""
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    out = initialize_model_parallel(1, 1, 1, seed=1)
    try:
        yield out
    finally:
        destroy_model_parallel()
