"""Scores a batch with a reward function in worker processes, each sample under a time limit that ends
the computation, and never stops training.

    runner = RewardRunner.from_name(name, timeout_s=..., num_workers=...)   # or build_reward_runner(cfg.reward)
    scores, stats = runner(responses, answers)
    runner.close()

- Workers are ``num_workers`` processes, started at construction from a ``forkserver`` context
  (``spawn`` where there is none), never by a plain fork of the trainer, which holds threads, CUDA
  state and process groups. A worker imports this package and the reward function's module, not
  torch or megatron (unless the function does), resolves the function by its name (a registered
  name, ``module:function`` or ``path/to/file.py:function``) and reports when it is ready.
  ``RewardRunner(fn, ...)`` takes a function object instead; it must be picklable by reference
  (a module-level function of an importable module).
- Each sample gets ``timeout_s`` seconds from the moment it is handed to an idle, ready worker. A
  worker that runs past it is killed (SIGKILL, together with its process group, so subprocesses the
  function started go too), reaped, and replaced by a fresh one; no stuck computation survives, and a
  batch waits at most about ``timeout_s`` (plus a worker's start-up) per wave of ``num_workers``
  samples.
- A failure scores 0.0, is counted in ``stats["reward/errors"]`` and the first few per batch are
  logged with the function's name and the sample. Kinds: ``error`` (the function raised),
  ``timeout`` (also counted in ``stats["reward/timeouts"]``), ``bad_value`` (not a finite real
  number), ``out_of_range`` (outside the range the function declares, see registry.py) and
  ``crash`` (the worker process died while scoring, e.g. a segfault or ``os._exit``).
- A worker that cannot start (its function does not resolve in a fresh process) raises
  ``RewardWorkerError`` from the call: that is the environment's fault, not a sample's.
- ``close()`` ends every worker (on its own, within a short grace, else by SIGKILL); so does
  interpreter exit, and so does garbage collection of the runner. A worker whose trainer process dies
  without any of these exits by itself when the pipe to it closes.
- One batch at a time: calls from several threads are serialized.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # imported before the atexit hook below, so that the hook runs first at exit
import numbers
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .registry import RewardFn, RewardRange, canonical_name, declared_range, get_reward, reward_names, reward_range

logger = logging.getLogger(__name__)
ERRORS_METRIC = "reward/errors"
TIMEOUTS_METRIC = "reward/timeouts"
EXCERPT_CHARS = 200
START_TIMEOUT_S = 120.0  # a worker not ready by then (importing the function's module) is an error
CLOSE_GRACE_S = 0.5  # close(): time for idle workers to exit on their own before SIGKILL
JOIN_TIMEOUT_S = 5.0  # reaping a killed worker


class RewardBatchCancelled(Exception):
    """The caller's ``should_stop`` asked to give up the batch (a stop signal)."""


class RewardWorkerError(RuntimeError):
    """A reward worker process could not start, so no sample can be scored."""


@dataclass
class RewardFailure:
    index: int
    """Position of the sample in the batch."""
    kind: str
    """``error``, ``timeout``, ``bad_value``, ``out_of_range`` or ``crash``."""
    message: str
    """The exception or the problem, in one line."""
    response: str
    """The response (shortened for the log)."""
    answer: str
    """The reference answer."""


def mp_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where the platform has it, else ``spawn``; never ``fork``."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# ---------------------------------------------------------------------------------------- worker side
def _worker_main(target: tuple[str, Any], conn, lifeline) -> None:
    """A worker process: resolve the function, say ready, then score one sample per message."""
    try:
        os.setpgid(0, 0)  # its own process group: a kill reaches the subprocesses it starts
    except OSError:
        pass
    threading.Thread(target=_exit_with_parent, args=(lifeline,), name="reward-lifeline", daemon=True).start()
    try:
        kind, spec = target
        fn = get_reward(spec) if kind == "name" else pickle.loads(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", _one_line(e, limit=2000)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        batch, index, response, answer = job
        try:
            value = fn(response, answer)
        except BaseException as e:  # noqa: BLE001 - any failure of the function is the sample's
            conn.send((batch, index, "error", _one_line(e)))
            continue
        conn.send((batch, index) + _finite_float(value))


def _exit_with_parent(lifeline) -> None:
    """Ends the worker when the parent closes its end of ``lifeline`` or dies (its end closes then)."""
    try:
        lifeline.recv()
    except BaseException:  # noqa: BLE001 - EOF, or anything else: either way the parent is gone
        pass
    os._exit(0)


def _finite_float(value: Any) -> tuple[str, Any]:
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except Exception:  # noqa: BLE001 - a broken number type is a bad value
            number = math.nan
        if math.isfinite(number):
            return ("ok", number)
    return ("bad_value", f"returned {_excerpt(repr(value))}, not a finite number")


def _one_line(error: BaseException, limit: int = EXCERPT_CHARS) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return _excerpt(text.splitlines()[0] if text.strip() else type(error).__name__, limit)


# ---------------------------------------------------------------------------------------- parent side
class _Worker:
    """One worker process and the two pipes to it: jobs and results, and the lifeline."""

    def __init__(self, ctx, target: tuple[str, Any], serial: int) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        lifeline_r, self.lifeline = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_worker_main, args=(target, child_conn, lifeline_r),
                                   name=f"reward-worker-{serial}", daemon=False)
        try:
            self.process.start()
        finally:
            child_conn.close()
            lifeline_r.close()
        self.pid: int = self.process.pid
        self.started = time.monotonic()
        self.ready = False
        self.dead = False
        self.job: tuple[int, int] | None = None  # (batch, index) being scored
        self.job_start = 0.0

    def kill(self) -> None:
        """SIGKILL the worker and its process group, reap it, close the pipes."""
        self.signal_kill()
        self.reap()

    def signal_kill(self) -> None:
        if self.ready:  # it made itself a group leader before saying ready
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.process.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass

    def reap(self) -> None:
        self.dead = True
        try:
            self.process.join(timeout=JOIN_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            pass
        for conn in (self.conn, self.lifeline):
            try:
                conn.close()
            except OSError:
                pass


def _stop_workers(workers: list[_Worker]) -> None:
    """Ask the idle workers to exit, give them a moment, SIGKILL whatever is left, reap all."""
    for w in workers:
        if w.dead:
            continue
        try:
            w.lifeline.close()  # a worker busy in Python code exits at once through its lifeline thread
            if w.job is None:
                w.conn.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + CLOSE_GRACE_S
    for w in workers:
        if not w.dead:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for w in workers:
        if not w.dead:
            w.kill()
    workers.clear()


def _by_reference(fn: RewardFn, label: str) -> bytes:
    """``fn`` pickled (a function by its module and qualified name), checked to load in this process."""
    try:
        payload = pickle.dumps(fn)
        pickle.loads(payload)
    except Exception as e:  # noqa: BLE001 - lambdas, nested functions, functions of unimportable modules
        raise TypeError(
            f"reward {label}: the function cannot be sent to a worker process ({type(e).__name__}: {e}). "
            "Use a module-level function of an importable module, or name it as module:function or "
            "path/to/file.py:function (RewardRunner.from_name)."
        ) from None
    return payload


_LIVE_RUNNERS: weakref.WeakSet[RewardRunner] = weakref.WeakSet()


@atexit.register
def _close_live_runners() -> None:
    # Registered after multiprocessing's own exit hook (imported above), so this runs before it: the
    # workers are gone before multiprocessing joins its children.
    for runner in list(_LIVE_RUNNERS):
        runner.close()


class RewardRunner:
    """Calls ``fn(response, answer)`` for every sample of a batch in ``num_workers`` processes."""

    def __init__(self, fn: RewardFn, *, timeout_s: float, num_workers: int = 4, max_logged_failures: int = 3,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        if not callable(fn):
            raise TypeError(f"a reward function must be callable, got {type(fn).__name__}")
        label = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        self._setup(("fn", _by_reference(fn, label)), label, declared_range(fn), timeout_s, num_workers,
                    max_logged_failures, start_timeout_s)

    @classmethod
    def from_name(cls, name: str, *, timeout_s: float, num_workers: int = 4, max_logged_failures: int = 3,
                  start_timeout_s: float = START_TIMEOUT_S) -> RewardRunner:
        """A runner for the reward ``name`` (see registry.py), resolved here first, so that a bad name is
        a ValueError at construction with the registry's message. Workers import a registered function
        by its module and qualified name (so one registered at run time works too), and resolve
        ``module:function`` and ``path/to/file.py:function`` (made absolute here) by that name."""
        name = canonical_name(name)
        fn = get_reward(name)
        declared = reward_range(name)
        target = ("fn", _by_reference(fn, name)) if name in reward_names() else ("name", name)
        runner = cls.__new__(cls)
        runner._setup(target, name, declared, timeout_s, num_workers, max_logged_failures, start_timeout_s)
        return runner

    def _setup(self, target: tuple[str, Any], label: str, declared: RewardRange | None, timeout_s: float,
               num_workers: int, max_logged_failures: int, start_timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if int(num_workers) != num_workers or num_workers <= 0:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers}")
        self.name = label
        """The function, as logged: its reward name, or module:qualname."""
        self.reward_range = declared
        """The declared (lo, hi) of the function's values, or None (unrestricted)."""
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers)
        self.max_logged_failures = max_logged_failures
        self.start_timeout_s = float(start_timeout_s)
        self.last_failures: list[RewardFailure] = []
        self.total_errors = 0
        self.total_timeouts = 0
        self.num_killed = 0
        """Workers killed for running past the time limit, over the runner's life."""
        self._target = target
        self._ctx = mp_context()
        self._workers: list[_Worker] = []  # one list object for the runner's life (the finalizer holds it)
        self._num_started = 0
        self._num_batches = 0
        self._closed = False
        self._call_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self._finalizer.atexit = False  # _close_live_runners does it, before multiprocessing's hook
        _LIVE_RUNNERS.add(self)
        self._fill()

    # ------------------------------------------------------------------ public
    def __call__(self, responses: Sequence[str], answers: Sequence[str], *,
                 should_stop: Callable[[], bool] | None = None) -> tuple[list[float], dict[str, float]]:
        """Scores (one float per response, in order, failures 0.0), and
        ``{"reward/errors": failures, "reward/timeouts": time-outs}`` for this batch.

        ``should_stop`` is asked about once a second while the batch runs; when it answers True the
        batch is given up (the busy workers are killed and replaced) and RewardBatchCancelled raised."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self._closed:
            raise RuntimeError("this RewardRunner is closed")
        with self._call_lock:
            try:
                return self._score(list(responses), list(answers), should_stop)
            finally:
                if self._closed:  # closed by another thread meanwhile
                    self._finalizer()

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (at most ``num_workers``)."""
        return [w.pid for w in self._workers if not w.dead]

    def close(self) -> None:
        """End every worker process; idempotent. The runner refuses work afterwards. Called while a
        batch runs in another thread, it kills the workers at once and that batch raises RuntimeError."""
        if self._closed:
            return
        self._closed = True
        _LIVE_RUNNERS.discard(self)
        if self._call_lock.acquire(timeout=CLOSE_GRACE_S):
            try:
                self._finalizer()
            finally:
                self._call_lock.release()
        else:  # the batch in flight notices, raises, and reaps them (see __call__)
            for w in list(self._workers):
                w.signal_kill()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ workers
    def _fill(self) -> None:
        """Start workers until ``num_workers`` are alive (they get ready in the background)."""
        self._workers[:] = [w for w in self._workers if not w.dead]
        while len(self._workers) < self.num_workers:
            if self._closed:
                raise RuntimeError("this RewardRunner was closed during a batch")
            self._num_started += 1
            self._workers.append(_Worker(self._ctx, self._target, self._num_started))

    def _start_failed(self, worker: _Worker, why: str) -> RewardWorkerError:
        worker.kill()
        return RewardWorkerError(
            f"reward {self.name}: a worker process {why}. The function must resolve by its name in a fresh "
            "Python process (an importable module, or a file path, with the same PYTHONPATH and working "
            "directory)."
        )

    # ------------------------------------------------------------------ one batch
    def _score(self, responses: list[str], answers: list[str],
               should_stop: Callable[[], bool] | None = None) -> tuple[list[float], dict[str, float]]:
        # Jobs carry their batch, so that a result of an interrupted batch can never land in this one.
        self._num_batches += 1
        batch = self._num_batches
        scores = [0.0] * len(responses)
        failures: list[RewardFailure] = []
        queued = collections.deque(range(len(responses)))
        pending = set(queued)
        try:
            while pending:
                if self._closed:
                    raise RuntimeError("this RewardRunner was closed during a batch")
                if should_stop is not None and should_stop():
                    raise RewardBatchCancelled(f"reward {self.name}: batch given up with {len(pending)} samples left")
                self._fill()
                self._dispatch(batch, queued, responses, answers)
                self._wait()
                for w in list(self._workers):
                    if not w.dead:
                        self._collect(w, batch, pending, queued, scores, failures, responses, answers)
                self._expire(batch, pending, failures, responses, answers)
        except BaseException:
            for w in self._workers:  # their results would belong to no batch: end them
                if w.job is not None and not w.dead:
                    w.kill()
            raise
        self._fill()  # replace killed workers now: they start while the trainer does other work
        failures.sort(key=lambda f: f.index)
        self._record(failures)
        timeouts = sum(f.kind == "timeout" for f in failures)
        return scores, {ERRORS_METRIC: float(len(failures)), TIMEOUTS_METRIC: float(timeouts)}

    def _dispatch(self, batch: int, queued: collections.deque[int], responses: list[str],
                  answers: list[str]) -> None:
        for w in self._workers:
            if not queued:
                return
            if w.dead or not w.ready or w.job is not None:
                continue
            index = queued.popleft()
            try:
                w.conn.send((batch, index, responses[index], answers[index]))
            except OSError:  # it died while idle: the sentinel tells; the sample waits for another worker
                queued.appendleft(index)
                continue
            w.job, w.job_start = (batch, index), time.monotonic()

    def _wait(self) -> None:
        """Until a worker has something to say or exits, or the next deadline passes."""
        now = time.monotonic()
        deadlines = [w.job_start + self.timeout_s if w.ready else w.started + self.start_timeout_s
                     for w in self._workers if w.job is not None or not w.ready]
        timeout = min(max(0.0, min(deadlines, default=now + 1.0) - now) + 1e-3, 1.0)
        handles = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
        multiprocessing.connection.wait(handles, timeout=timeout)

    def _collect(self, w: _Worker, batch: int, pending: set, queued: collections.deque[int],
                 scores: list[float], failures: list[RewardFailure], responses: list[str],
                 answers: list[str]) -> None:
        """Read what ``w`` sent; handle its death."""
        while True:
            try:
                if not w.conn.poll():
                    break
                message = w.conn.recv()
            except (EOFError, OSError):
                break  # it died: handled below through its exit code
            if message[0] == "ready":
                w.ready = True
            elif message[0] == "failed":
                raise self._start_failed(w, f"could not load the function ({message[1]})")
            else:
                job_batch, index, kind, payload = message
                w.job = None
                if job_batch != batch or index not in pending:
                    continue
                pending.discard(index)
                failure = self._check(index, kind, payload, responses[index], answers[index])
                if failure is None:
                    scores[index] = payload
                else:
                    failures.append(failure)
        if w.process.exitcode is None:
            return
        code = w.process.exitcode
        w.reap()
        if not w.ready:
            raise self._start_failed(w, f"exited with code {code} before it was ready (its stderr says why; "
                                        "workers import the main script, which needs the "
                                        "`if __name__ == '__main__':` guard)")
        if w.job is not None:
            job_batch, index = w.job
            w.job = None
            if job_batch == batch and index in pending:
                pending.discard(index)
                failures.append(RewardFailure(index, "crash", f"the worker process died (exit code {code})",
                                              responses[index], answers[index]))

    def _expire(self, batch: int, pending: set, failures: list[RewardFailure], responses: list[str],
                answers: list[str]) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.dead:
                continue
            if not w.ready and now >= w.started + self.start_timeout_s:
                raise self._start_failed(w, f"was not ready within {self.start_timeout_s:g} s")
            if w.job is None or now < w.job_start + self.timeout_s:
                continue
            (job_batch, index), w.job = w.job, None
            w.kill()
            self.num_killed += 1
            if job_batch == batch and index in pending:
                pending.discard(index)
                failures.append(RewardFailure(index, "timeout", f"no result within {self.timeout_s:g} s "
                                              "(worker killed)", responses[index], answers[index]))

    def _check(self, index: int, kind: str, payload: Any, response: str, answer: str) -> RewardFailure | None:
        if kind != "ok":
            return RewardFailure(index, kind, payload, response, answer)
        if self.reward_range is not None:
            lo, hi = self.reward_range
            if not lo <= payload <= hi:
                message = f"returned {payload!r}, outside its declared range [{lo:g}, {hi:g}]"
                return RewardFailure(index, "out_of_range", message, response, answer)
        return None

    def _record(self, failures: list[RewardFailure]) -> None:
        self.last_failures = failures
        timeouts = sum(f.kind == "timeout" for f in failures)
        self.total_timeouts += timeouts
        self.total_errors += len(failures)
        for f in failures[: self.max_logged_failures]:
            logger.warning(
                "reward %s: %s on sample %d (scored 0): %s | response: %r | answer: %r",
                self.name, f.kind, f.index, f.message, _excerpt(f.response), _excerpt(f.answer),
            )
        if len(failures) > self.max_logged_failures:
            logger.warning(
                "reward %s: %d more failures in this batch (%d in all, %d time-outs), each scored 0",
                self.name, len(failures) - self.max_logged_failures, len(failures), timeouts,
            )


def build_reward_runner(reward_cfg: Any) -> RewardRunner:
    """A runner for the config's reward section (``name``, ``timeout_s``, ``num_workers``)."""
    return RewardRunner.from_name(reward_cfg.name, timeout_s=reward_cfg.timeout_s,
                                  num_workers=reward_cfg.num_workers)


def _excerpt(text: Any, limit: int = EXCERPT_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
