"""Failed collectives explained (parallel/hang.py) and the stage record they report (parallel/stage.py).

The synthetic cases raise real exceptions through functions compiled under the file names of the
frames a failure passes through (our modules, torch.distributed, megatron), so the traceback walk is
the one a real failure gets; one case produces a real gloo time-out in two processes.
"""

import os
import time
from datetime import timedelta

import pytest

import liteppo_mcore
from liteppo_mcore.parallel import stage as S
from liteppo_mcore.parallel.hang import analyse, describe_collective_failure
from liteppo_mcore.utils.timers import PhaseTimer
from tests.distributed.spawn import run_gloo

PKG = os.path.dirname(os.path.abspath(liteppo_mcore.__file__))
TORCH = "/venv/lib/python3.11/site-packages/torch"
MEGATRON = os.path.join(os.path.dirname(PKG), ".venv/lib/python3.11/site-packages/megatron/core")  # a venv inside
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                "waiting 15000ms for recv operation to complete")
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[127.0.0.1]:904: Connection reset by peer")


@pytest.fixture(autouse=True)
def fresh_stage():
    S.reset()
    yield
    S.reset()


def _ours(relative):
    return os.path.join(PKG, relative)


def chain(frames, exc, locals_at=None):
    """A function that calls a chain of functions, outermost first, each compiled as `name` in file
    `path`; frame i makes its call (or the innermost its raise of `exc`) at line 12 + i. `locals_at=
    {index: {name: value}}` gives a frame local variables (assigned on line 12 + i, the call follows)."""
    locals_at = locals_at or {}
    callee = None
    for index in reversed(range(len(frames))):
        path, name = frames[index]
        given = locals_at.get(index, {})
        assigns = "; ".join(f"{k} = _locals[{k!r}]" for k in given)
        body = "_next()" if callee is not None else "raise _exc"
        source = "\n" * (10 + index) + f"def {name}():\n    {assigns + '; ' if assigns else ''}{body}\n"
        namespace = {"_next": callee, "_exc": exc, "_locals": given}
        exec(compile(source, path, "exec"), namespace)
        callee = namespace[name]
    return callee


def raised(fn, *stages):
    """The exception `fn()` raises inside the nested stages `stages` (outermost first)."""
    from contextlib import ExitStack

    try:
        with ExitStack() as stack:
            for name in stages:
                stack.enter_context(S.stage(name))
            fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing raised")


REDUCER_PATH = [(_ours("trainer/loop.py"), "train_step"), (_ours("algo/stats.py"), "global_moments"),
                (_ours("parallel/reducer.py"), "allreduce"), (f"{TORCH}/distributed/c10d_logger.py", "wrapper"),
                (f"{TORCH}/distributed/distributed_c10d.py", "all_reduce")]


def test_a_gloo_timeout_names_collective_caller_stage_step_and_setting():
    S.set_step(3)
    exc = raised(chain(REDUCER_PATH, RuntimeError(GLOO_TIMEOUT)), "eval", "normalization")
    msg = describe_collective_failure(exc, timeout_minutes=0.25, rank=0)
    first = msg.splitlines()[0]
    assert first.startswith("liteppo: rank 0: all_reduce timed out after 15 s in stage normalization of step 3")
    assert "called at liteppo_mcore/parallel/reducer.py:14 (allreduce)" in first
    assert "liteppo_mcore/algo/stats.py:13 (global_moments) <- liteppo_mcore/trainer/loop.py:12 (train_step)" in msg
    assert "parallel.timeout_minutes=0.25" in msg and "stopped, hung or died" in msg
    assert "Timed out waiting 15000ms" in msg  # the cause, in one line
    assert "created without the run's timeout" not in msg


def test_the_cpu_compat_mode_between_torch_frames_is_not_the_caller():
    c10d, logger = f"{TORCH}/distributed/distributed_c10d.py", f"{TORCH}/distributed/c10d_logger.py"
    frames = [(_ours("trainer/loop.py"), "update"), (_ours("update/batch.py"), "gather_over_dp"),
              (_ours("parallel/reducer.py"), "all_gather_padded"), (logger, "wrapper"), (c10d, "all_gather"),
              (f"{TORCH}/overrides.py", "handle_torch_function"),
              (_ours("parallel/cpu_compat.py"), "__torch_function__"), (logger, "wrapper"), (c10d, "all_gather")]
    with PhaseTimer()("train"):
        pass
    exc = raised(chain(frames, RuntimeError(GLOO_TIMEOUT.replace("recv", "send"))))
    found = analyse(exc)
    assert found.collective == "all_gather" and found.kind == "timeout"
    assert found.ours[0].where() == "liteppo_mcore/parallel/reducer.py:14 (all_gather_padded)"
    msg = describe_collective_failure(exc, timeout_minutes=0.25, rank=1)
    assert msg.startswith("liteppo: rank 1: all_gather timed out after 15 s after stage train,")  # between stages


def test_megatron_coalesced_grad_sync_names_the_operation_and_megatron_line():
    import contextlib

    def all_reduce():
        pass

    frames = [(_ours("trainer/loop.py"), "update"), (_ours("update/optim.py"), "_finalize_summed_grads"),
              (f"{MEGATRON}/distributed/param_and_grad_buffer.py", "start_grad_sync"),
              (contextlib.__file__, "__exit__"), (f"{TORCH}/distributed/distributed_c10d.py", "_coalescing_manager")]
    S.set_step(7)
    timer = PhaseTimer()

    def train():
        with timer("train"):
            chain(frames, RuntimeError(GLOO_TIMEOUT), locals_at={4: {"op0": all_reduce}})()

    exc = raised(train)
    found = analyse(exc)
    assert found.collective == "all_reduce (coalesced)"
    assert found.caller.where() == "megatron/core/distributed/param_and_grad_buffer.py:14 (start_grad_sync)"
    msg = describe_collective_failure(exc, timeout_minutes=0.25, rank=0)
    assert "all_reduce (coalesced) timed out after 15 s in stage train of step 7, called at " \
           "liteppo_mcore/update/optim.py:13 (_finalize_summed_grads)" in msg
    assert "the call into torch.distributed is at megatron/core/distributed/param_and_grad_buffer.py:14" in msg


def test_a_peer_that_died_is_told_apart_from_a_timeout():
    S.set_step(2)
    exc = raised(chain(REDUCER_PATH, RuntimeError(GLOO_RESET)), "sync")
    msg = describe_collective_failure(exc, timeout_minutes=2, rank=1)
    assert msg.startswith("liteppo: rank 1: all_reduce failed: a peer rank closed its connection "
                          "in stage sync of step 2")
    assert "exited or crashed" in msg and "parallel.timeout_minutes=2" in msg


def test_nccl_watchdog_timeout_is_recognised_from_its_message():
    import torch.distributed as dist

    text = ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=BROADCAST, NumelIn=4, "
            "NumelOut=4, Timeout(ms)=1800000) ran for 1800081 milliseconds before timing out.")
    exc = raised(chain([(_ours("trainer/loop.py"), "fit"), (_ours("trainer/loop.py"), "evaluate")],
                       dist.DistBackendError(text)))
    msg = describe_collective_failure(exc, timeout_minutes=0.25, rank=3)
    assert msg.startswith("liteppo: rank 3: broadcast timed out after 30 min")
    assert "raised at liteppo_mcore/trainer/loop.py:13 (evaluate)" in msg  # no torch.distributed frame
    assert "created without the run's timeout" in msg  # 30 min is megatron's default, not 0.25


def test_chained_exceptions_are_searched():
    timeout = raised(chain(REDUCER_PATH, RuntimeError(GLOO_TIMEOUT)))

    def clean_up():
        raise ValueError("a clean-up step failed too")

    try:
        try:
            raise timeout
        except RuntimeError:
            clean_up()  # fails while the timeout is handled: chained implicitly (__context__), not `from`
    except ValueError as later:
        assert "all_reduce timed out" in describe_collective_failure(later, rank=0)


@pytest.mark.parametrize("exc", [ValueError("timed out"), KeyboardInterrupt(), RuntimeError("CUDA out of memory"),
                                 RuntimeError("the request timed out"), TimeoutError("Connection reset by peer"),
                                 RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage")])
def test_unrelated_exceptions_give_none(exc):
    assert describe_collective_failure(exc) is None
    inside_torch = raised(chain(REDUCER_PATH, RuntimeError("expected a device tensor, got a host tensor")))
    assert describe_collective_failure(inside_torch) is None
    import contextlib

    outside_torch = raised(chain([(_ours("rewards/runner.py"), "score"), (contextlib.__file__, "__exit__")],
                                 RuntimeError("the reward worker timed out")))
    assert describe_collective_failure(outside_torch) is None


def test_stage_record_nests_restores_and_keeps_the_step():
    assert S.current_stage().describe() == "outside any named stage"
    S.set_step(4)
    timer = PhaseTimer()
    with timer("rollout"):
        assert S.current_stage().name == "rollout"
        with S.stage("reward"):
            assert S.current_stage().describe() == "in stage reward of step 4"
        assert S.current_stage().name == "rollout"
    assert S.current_stage().describe() == "after stage rollout of step 4"
    assert set(timer.metrics()) == {"time/rollout"}
    S.set_stage("checkpoint", step=5)
    assert S.current_stage().describe() == "in stage checkpoint of step 5"
    S.set_stage(None)
    assert S.current_stage().describe() == "after stage checkpoint of step 5"


def test_an_exception_keeps_the_innermost_stage_it_left():
    S.set_step(9)
    with pytest.raises(RuntimeError) as info:
        with S.stage("checkpoint"):
            with PhaseTimer()("train"):
                raise RuntimeError("x")
    assert S.current_stage().name is None
    assert S.stage_of_exception(info.value).describe() == "in stage train of step 9"


def gloo_timeout_worker(rank, world_size):
    import torch
    import torch.distributed as dist

    from liteppo_mcore.parallel.reducer import make_allreduce_sum

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=1))
    if rank == 1:
        time.sleep(4)  # never joins: rank 0's all-reduce times out after 1 s
        return None
    S.set_step(2)
    out = []
    for _ in range(2):  # the second call fails at once: gloo closed the pairs after the time-out
        started = time.monotonic()
        try:
            with S.stage("normalization"):
                make_allreduce_sum(group)(torch.ones(3))
        except Exception as exc:  # noqa: BLE001
            out.append((describe_collective_failure(exc, timeout_minutes=1 / 60), time.monotonic() - started))
    return out


def test_a_real_gloo_timeout_in_two_processes():
    (first, waited), (second, _) = run_gloo(gloo_timeout_worker, 2, timeout=60)[0]
    assert 0.9 < waited < 5
    assert first.startswith("liteppo: rank 0: all_reduce timed out after 1 s in stage normalization of step 2, "
                            "called at liteppo_mcore/parallel/reducer.py:")
    assert "parallel.timeout_minutes=0.0166667" in first
    assert second is not None and second.startswith("liteppo: rank 0: all_reduce timed out in stage normalization")


def _exit_now_in_a_child(hook, cleanup_s):
    import subprocess
    import sys

    code = ("import atexit, sys, time\n"
            "from liteppo_mcore.parallel.hang import exit_now\n"
            f"atexit.register(lambda: ({hook}))\n"
            "sys.stdout.write('unflushed ')\n"
            f"exit_now(4, cleanup_s={cleanup_s})\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(PKG))
    return proc, time.monotonic() - started


def test_exit_now_flushes_runs_the_exit_hooks_and_returns_its_status():
    proc, _ = _exit_now_in_a_child("print('hook ran', flush=True)", 5)
    assert proc.returncode == 4 and proc.stdout == "unflushed hook ran\n", (proc.stdout, proc.stderr)


def test_exit_now_does_not_wait_for_a_hook_that_blocks():
    import signal

    proc, took = _exit_now_in_a_child("time.sleep(60)", 1)
    assert proc.returncode == -signal.SIGALRM and proc.stdout == "unflushed "
    assert took < 30
