"""A collective that failed because another rank stopped, hung or died: recognised, explained, and the
process ended without waiting on the broken groups.

Every process group has the run's `parallel.timeout_minutes` (parallel/setup.py for the default group,
parallel/mcore.py for megatron's). When a rank stops answering, gloo raises a RuntimeError on its peers
once one send or receive of a collective has waited that long ("Timed out waiting 15000ms for recv
operation to complete"); a peer that exits instead closes its sockets, and the others fail at once
("Connection reset by peer"). NCCL reports the same situations through its watchdog ("Watchdog caught
collective operation timeout: WorkNCCL(SeqNum=.., OpType=ALLREDUCE, ..)", "NCCL communicator was
aborted", "remote process exited"); with its default error handling the watchdog ends the process
itself, and the exception is only seen with blocking waits (TORCH_NCCL_BLOCKING_WAIT=1).

`describe_collective_failure(exc)` turns such an exception into a few lines naming the collective, the
place in this package that called it, the stage and step the rank was in (parallel/stage.py), and what
to do; it returns None for any other exception. `exit_now(code)` ends the process without the usual
teardown, which can block on the dead peer (destroying an NCCL communicator that is waiting on it).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from liteppo_mcore.parallel.stage import StageInfo, current_stage, stage_of_exception

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../liteppo_mcore
_PACKAGE_PARENT = os.path.dirname(_PACKAGE_ROOT)

# Frames between the caller and the collective itself: torch.distributed, torch's function and
# dispatch modes, and this package's own modes (the CPU compatibility layer and the strict device mode).
_PLUMBING_TORCH = (os.sep + os.path.join("torch", "distributed") + os.sep,
                   os.sep + os.path.join("torch", "overrides.py"),
                   os.sep + os.path.join("torch", "_ops.py"),
                   os.sep + os.path.join("torch", "utils", "_python_dispatch.py"))
_PLUMBING_OURS = (os.path.join(_PACKAGE_ROOT, "parallel", "cpu_compat.py"),
                  os.path.join(_PACKAGE_ROOT, "parallel", "strict_device.py"))
_STDLIB = os.path.normpath(sysconfig.get_paths()["stdlib"])
_PLUMBING_STDLIB = tuple(os.path.join(_STDLIB, name) for name in ("contextlib.py", "functools.py"))
_COLLECTIVE_FILES = (os.path.join("torch", "distributed", "distributed_c10d.py"),
                     os.path.join("torch", "distributed", "_functional_collectives.py"))

_TIMEOUT = re.compile(r"timed out|timeout|before timing out", re.IGNORECASE)
_PEER = re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused|read error|write error"
                   r"|remote process exited|ncclRemoteError|ncclSystemError|unhandled system error"
                   r"|communicator was aborted|socket closed|some nccl operations have failed", re.IGNORECASE)
_DISTRIBUTED_TEXT = re.compile(r"gloo|nccl|c10d|processgroup|worknccl", re.IGNORECASE)
_TIMEOUT_MS = re.compile(r"waiting (\d+)\s*ms|Timeout\(ms\)=(\d+)|ran for (\d+) milliseconds", re.IGNORECASE)
_NCCL_OP = re.compile(r"OpType=(\w+)")
_NCCL_OPS = {"ALLREDUCE": "all_reduce", "ALLREDUCE_COALESCED": "all_reduce_coalesced", "BROADCAST": "broadcast",
             "ALLGATHER": "all_gather", "_ALLGATHER_BASE": "all_gather_into_tensor",
             "ALLGATHER_COALESCED": "all_gather_coalesced", "REDUCE_SCATTER": "reduce_scatter",
             "_REDUCE_SCATTER_BASE": "reduce_scatter_tensor", "REDUCE": "reduce", "BARRIER": "barrier",
             "SEND": "send", "RECV": "recv", "RECVANYSOURCE": "recv", "ALLTOALL": "all_to_all",
             "ALLTOALL_BASE": "all_to_all_single", "GATHER": "gather", "SCATTER": "scatter",
             "COALESCED": "a coalesced group of collectives"}

EXIT_PEER_FAILURE = 4  # 2: bad input (launch), 3: a run that cannot make progress (trainer/health.py)


@dataclass(frozen=True)
class Frame:
    path: str   # absolute, normalised
    line: int
    name: str
    frame: Any = field(default=None, compare=False, repr=False)  # the live frame, when there is one

    @property
    def ours(self) -> bool:
        return self.path.startswith(_PACKAGE_ROOT + os.sep)

    @property
    def in_torch_distributed(self) -> bool:
        return _PLUMBING_TORCH[0] in self.path

    @property
    def plumbing(self) -> bool:
        return (self.path in _PLUMBING_OURS or self.path in _PLUMBING_STDLIB
                or any(part in self.path for part in _PLUMBING_TORCH))

    def where(self) -> str:
        return f"{_short(self.path)}:{self.line} ({self.name})"


@dataclass(frozen=True)
class CollectiveFailure:
    """What `describe_collective_failure` found: the exception, its kind and where it was raised."""

    exc: BaseException
    kind: str                     # "timeout" or "peer"
    collective: str | None     # e.g. "all_reduce"; None when no frame or message names one
    caller: Frame | None       # the frame that called into torch.distributed (may be megatron's)
    called: bool                  # False: no torch.distributed frame; `caller` is where the error surfaced
    ours: list[Frame]             # this package's frames from that call outwards, innermost first
    waited_ms: int | None      # the limit the message reports, when it does
    stage: StageInfo


def _short(path: str) -> str:
    """Installed packages relative to site-packages (a virtualenv may sit inside the repository), this
    repository's files relative to it."""
    marker = os.sep + "site-packages" + os.sep
    if marker in path:
        return path.split(marker, 1)[1]
    if path.startswith(_PACKAGE_PARENT + os.sep):
        return os.path.relpath(path, _PACKAGE_PARENT)
    return path


def _frames(exc: BaseException) -> list[Frame]:
    out, tb = [], exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        out.append(Frame(os.path.normpath(os.path.abspath(code.co_filename)), tb.tb_lineno, code.co_name, tb.tb_frame))
        tb = tb.tb_next
    return out


def _collective_name(frames: Sequence[Frame]) -> str | None:
    """The torch.distributed function the caller called: the first public one past it (a private one,
    e.g. `_coalescing_manager`, when that is all there is; a coalesced group names its operation)."""
    api = [f for f in frames if f.path.endswith(_COLLECTIVE_FILES) and f.name != "wrapper"]
    public = next((f for f in api if not f.name.startswith("_")), None)
    if public is not None:
        return public.name
    if not api:
        return None
    first = api[0]
    if first.name == "_coalescing_manager":
        op = getattr(first.frame, "f_locals", {}).get("op0") if first.frame is not None else None
        name = getattr(op, "__name__", None)
        return f"{name} (coalesced)" if name else "coalesced collectives (torch.distributed._coalescing_manager)"
    return f"torch.distributed.{first.name}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then what caused it or was being handled when it was raised (each once)."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ if current.__cause__ is not None else current.__context__


def _dist_error_types() -> tuple[type, ...]:
    try:
        import torch.distributed as dist
    except Exception:  # noqa: BLE001 - without torch nothing can be a torch error
        return ()
    return tuple(t for t in (getattr(dist, n, None) for n in ("DistBackendError", "DistNetworkError",
                                                                 "DistStoreError")) if isinstance(t, type))


def _classify(exc: BaseException, frames: Sequence[Frame]) -> str | None:
    if not isinstance(exc, RuntimeError):  # torch's DistError types are RuntimeErrors too
        return None
    text = str(exc)
    in_torch_distributed = any(f.in_torch_distributed for f in frames)
    typed = isinstance(exc, _dist_error_types())
    if not (in_torch_distributed or typed or _DISTRIBUTED_TEXT.search(text)):
        return None
    if _TIMEOUT.search(text):
        return "timeout"
    if _PEER.search(text):
        return "peer"
    network_error = getattr(sys.modules.get("torch.distributed"), "DistNetworkError", None)
    if isinstance(network_error, type) and isinstance(exc, network_error):
        return "peer"
    return None


def analyse(exc: BaseException) -> CollectiveFailure | None:
    """The first exception in `exc`'s chain that is a collective's time-out or a lost peer, else None."""
    for candidate in _chain(exc):
        frames = _frames(candidate)
        kind = _classify(candidate, frames)
        if kind is None:
            continue
        # The caller: the innermost frame outside the plumbing that leads into torch.distributed.
        caller_index = None
        for i, frame in enumerate(frames):
            if not frame.plumbing and any(f.in_torch_distributed for f in frames[i + 1:]):
                caller_index = i
        called = caller_index is not None
        collective = _collective_name(frames[caller_index + 1:]) if caller_index is not None else None
        if collective is None:
            op = _NCCL_OP.search(str(candidate))
            if op:
                collective = _NCCL_OPS.get(op.group(1), op.group(1).lower())
        if caller_index is None:  # no torch.distributed frame: waited on in the innermost frame
            caller_index = len(frames) - 1 if frames else None
        caller = frames[caller_index] if caller_index is not None else None
        outward = frames[:caller_index + 1][::-1] if caller_index is not None else []
        ours = [f for f in outward if f.ours and not f.plumbing]
        waited = _TIMEOUT_MS.search(str(candidate))
        waited_ms = int(next(g for g in waited.groups() if g)) if waited else None
        info = stage_of_exception(candidate) or stage_of_exception(exc) or current_stage()
        return CollectiveFailure(candidate, kind, collective, caller, called, ours, waited_ms, info)
    return None


def _up_to_the_trainer(frames: Sequence[Frame], most: int = 5) -> list[Frame]:
    """The callers, innermost first, up to the first one in the trainer package (the step's code)."""
    trainer = os.path.join(_PACKAGE_ROOT, "trainer") + os.sep
    out: list[Frame] = []
    for frame in frames[:most]:
        out.append(frame)
        if frame.path.startswith(trainer):
            break
    return out


def _rank() -> str:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            return str(dist.get_rank())
    except Exception:  # noqa: BLE001
        pass
    return os.environ.get("RANK", "0")


def _seconds(ms: int) -> str:
    s = ms / 1000
    return f"{s:g} s" if s < 120 else f"{s / 60:g} min"


def describe_collective_failure(exc: BaseException, *, timeout_minutes: float | None = None,
                                rank: int | None = None) -> str | None:
    """A message for a collective that timed out or lost its peer (None for any other exception):
    which collective, where this package called it, the stage and step, the cause, and what to do."""
    found = analyse(exc)
    if found is None:
        return None
    prefix = f"liteppo: rank {_rank() if rank is None else rank}:"
    what = found.collective or "a collective"
    limit = "" if found.waited_ms is None else f" after {_seconds(found.waited_ms)}"
    verb = f"timed out{limit}" if found.kind == "timeout" else "failed: a peer rank closed its connection"
    head = f"{prefix} {what} {verb} {found.stage.describe()}"
    how = "called" if found.called else "raised"  # raised: an asynchronous collective's error seen later
    if found.ours:
        head += f", {how} at {found.ours[0].where()}"
    lines = [head]
    if found.caller is not None and found.ours and found.caller != found.ours[0]:
        lines.append(f"  (the call into torch.distributed is at {found.caller.where()})" if found.called else
                     f"  (the error surfaced at {found.caller.where()})")
    elif found.caller is not None and not found.ours:
        lines.append(f"  {how} at {found.caller.where()}")
    outer = _up_to_the_trainer(found.ours[1:])
    if outer:
        lines.append("  from " + " <- ".join(f.where() for f in outer))
    cause = " ".join(str(found.exc).split())
    lines.append(f"  cause: {type(found.exc).__name__}: {cause[:400]}")
    setting = "parallel.timeout_minutes" + ("" if timeout_minutes is None else
                                            f"={timeout_minutes:g} ({_seconds(round(timeout_minutes * 60000))})")
    if found.kind == "timeout":
        lines.append(f"  Another rank stopped, hung or died before it reached this collective (or waits in a "
                     f"different one): its own output shows where. The limit is {setting}; raise it only if a "
                     "rank legitimately needs longer than that between two collectives (a slow checkpoint, "
                     "a long generation).")
        if timeout_minutes is not None and found.waited_ms is not None \
                and abs(found.waited_ms - timeout_minutes * 60000) > max(1000.0, 0.05 * timeout_minutes * 60000):
            lines.append(f"  Note: this group waited {_seconds(found.waited_ms)}, not the {timeout_minutes:g} "
                         "min of parallel.timeout_minutes: it was created without the run's timeout.")
    else:
        lines.append(f"  Another rank exited or crashed (its own error, in its output, is the cause) or the "
                     f"network between them failed. Collectives wait at most {setting} for a rank that "
                     "stops answering.")
    return "\n".join(lines)


def exit_now(code: int = EXIT_PEER_FAILURE, *, cleanup_s: float | None = 5.0) -> None:
    """End the process with `code` after flushing and running the `atexit` hooks (servers this process
    started are shut down there), skipping the interpreter's finalization.

    After a collective timed out, that spares the process-group teardown, which can block on the dead peer;
    a hard SIGALRM then ends the process if the hooks take more than `cleanup_s` seconds. At a normal end
    (`cleanup_s=None`: the hooks run without a deadline) it spares gloo's worker threads being killed in
    the middle of a collective's clean-up: a worker that drops the last reference to a tensor of the final
    collective takes the GIL, and one that asks for it while the interpreter finalizes is ended with
    pthread_exit, which aborts the process ("terminate called without an active exception", SIGABRT)
    after the run itself succeeded."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
            pass
    if cleanup_s is None or cleanup_s > 0:
        if cleanup_s is not None and hasattr(signal, "alarm"):
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the kernel ends the process, whatever Python is doing
            signal.alarm(max(1, int(round(cleanup_s))))
        try:
            atexit._run_exitfuncs()
        except Exception:  # noqa: BLE001
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)
