"""Run a function in N gloo processes on this machine and collect what each returns.

``run_gloo(fn, world_size, *args)`` starts ``world_size`` fresh interpreters (multiprocessing
"spawn"), initializes a gloo process group in each and calls ``fn(rank, world_size, *args)``.
``fn`` must be a module-level function of an importable module (e.g. ``tests.distributed.test_x``).
Results and arguments travel pickled, so keep them to plain data and CPU tensors.

Start-up dominates (each process imports torch, and megatron-core when used): batch many checks into
one launch.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from liteppo_mcore.parallel.setup import free_port

_POLL_S = 0.1
_GRACE_S = 2.0  # after a child dies without reporting, how long its message may still be in flight


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _child(rank: int, world_size: int, env: dict[str, str], fn_ref: tuple, payload: bytes,
           timeout: float, results: Any) -> None:
    # Environment first: torch reads OMP_NUM_THREADS when it is imported, which happens below.
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    import torch.distributed as dist

    try:
        fn = _resolve(*fn_ref)
        args = pickle.loads(payload)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        report = (rank, True, pickle.dumps(fn(rank, world_size, *args)), time.time())
    except BaseException:  # report everything, KeyboardInterrupt included: the parent waits for it
        report = (rank, False, traceback.format_exc(), time.time())
    # Report before tearing the group down: the teardown makes the peers that wait on this rank fail
    # too; the parent orders failures by these timestamps to show the root cause first.
    results.put(report)
    if dist.is_initialized():
        dist.destroy_process_group()


def _stop(procs: list[mp.process.BaseProcess], grace_s: float) -> None:
    """Let the children exit on their own for ``grace_s`` seconds, then kill what is left."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _collect(procs: list[mp.process.BaseProcess], results: Any, timeout: float) -> dict[int, bytes]:
    """Wait for one message per rank; raise on the first failure, a silent death, or the deadline."""
    world_size = len(procs)
    done: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    dead_since: dict[int, float] = {}
    while len(done) < world_size:
        try:
            rank, ok, body, stamp = results.get(timeout=_POLL_S)
        except queue.Empty:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"run_gloo: ranks {sorted(set(range(world_size)) - set(done))} did not "
                                   f"finish within {timeout:.0f} s") from None
            for rank, proc in enumerate(procs):
                if rank not in done and not proc.is_alive():
                    if now - dead_since.setdefault(rank, now) > _GRACE_S:
                        raise RuntimeError(f"run_gloo: rank {rank} exited with code {proc.exitcode} "
                                           "without reporting a result") from None
            continue
        if not ok:
            raise RuntimeError(_failure_report((stamp, rank, body), results, world_size,
                                               pending=world_size - len(done) - 1))
        done[rank] = body
    return done


def _failure_report(first: tuple, results: Any, world_size: int, pending: int) -> str:
    """Every failure reported within a moment of the first, earliest first (the others are often
    peers that lost their connection to the failing rank)."""
    failures = [first]
    deadline = time.monotonic() + _GRACE_S / 2
    while pending > 0 and time.monotonic() < deadline:
        try:
            rank, ok, body, stamp = results.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        pending -= 1
        if not ok:
            failures.append((stamp, rank, body))
    failures.sort()
    (_, rank, body), later = failures[0], failures[1:]
    lines = [f"run_gloo: rank {rank} of {world_size} raised:\n{body}"]
    lines += [f"then rank {other} raised:\n{text}" for _, other, text in later]
    return "\n".join(lines)


def run_gloo(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120,
             env: dict[str, str] | None = None) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each in its own process.

    Each child gets ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``OMP_NUM_THREADS=1`` and ``env`` on top. If a child raises, the others are killed
    and this raises ``RuntimeError`` with the child's traceback; past ``timeout`` seconds all children
    are killed and this raises ``TimeoutError``.
    """
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"run_gloo needs a module-level function of an importable module, got {fn!r}")
    child_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    child_env.update(env or {})
    payload = pickle.dumps(args)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, child_env, (module, qualname), payload, timeout, results),
                    name=f"gloo-rank{rank}", daemon=False)  # ranks may start processes (dist-checkpoint writers)
        for rank in range(world_size)
    ]
    done: dict[int, bytes] = {}
    try:
        for proc in procs:
            proc.start()
        done = _collect(procs, results, timeout)
    finally:
        # On failure the other ranks are usually blocked in a collective: do not wait for them.
        _stop(procs, grace_s=5.0 if len(done) == world_size else 0.0)
        results.close()
    return [pickle.loads(done[rank]) for rank in range(world_size)]
