"""Scores a batch with a reward function under a per-sample time limit, and never stops training.

``RewardRunner(fn, timeout_s=..., num_workers=...)(responses, answers) -> (scores, stats)``

- Each sample gets ``timeout_s`` seconds from the moment a worker starts it. An exception, a time-out,
  or a return value that is not a finite number scores 0, is counted in ``stats["reward/errors"]``,
  and the first few per batch are logged with the sample.
- Workers are daemon threads. A thread running Python code cannot be killed, so a timed-out call is
  abandoned: it keeps running in the background (using CPU if it computes) and its result is thrown
  away when it ends. A fresh worker takes its place at once, so stuck calls never starve the pool and
  a batch waits at most about ``timeout_s`` per wave of ``num_workers`` samples. Being daemons, stuck
  threads do not hold up the interpreter's exit either (a ``concurrent.futures`` pool would).
- One batch at a time: calls from several threads are serialized.
"""

from __future__ import annotations

import logging
import math
import numbers
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .registry import RewardFn, get_reward

logger = logging.getLogger(__name__)
ERRORS_METRIC = "reward/errors"
EXCERPT_CHARS = 200


@dataclass
class RewardFailure:
    index: int
    """Position of the sample in the batch."""
    kind: str
    """``error``, ``timeout`` or ``bad_value``."""
    message: str
    """The exception or the problem, in one line."""
    response: str
    """The response (shortened for the log)."""
    answer: str
    """The reference answer."""


class _Job:
    __slots__ = ("batch", "index", "response", "answer", "start", "abandoned")

    def __init__(self, batch: int, index: int, response: str, answer: str) -> None:
        self.batch, self.index, self.response, self.answer = batch, index, response, answer
        self.start: Optional[float] = None
        self.abandoned = False


class RewardRunner:
    """Calls ``fn(response, answer)`` for every sample of a batch on ``num_workers`` threads."""

    def __init__(self, fn: RewardFn, *, timeout_s: float, num_workers: int = 4, max_logged_failures: int = 3) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if num_workers <= 0:
            raise ValueError(f"num_workers must be positive, got {num_workers}")
        self.fn = fn
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers)
        self.max_logged_failures = max_logged_failures
        self.last_failures: List[RewardFailure] = []
        self.total_errors = 0
        self.total_timeouts = 0
        self.num_abandoned_threads = 0
        self._jobs: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._results: "queue.Queue[Tuple[_Job, Any, Optional[BaseException]]]" = queue.Queue()
        self._lock = threading.Lock()
        self._running: Dict[int, _Job] = {}  # started, not finished, not abandoned: at most ~num_workers
        self._call_lock = threading.Lock()
        self._num_spawned = 0
        self._num_batches = 0
        self._closed = False
        for _ in range(self.num_workers):
            self._spawn()

    def _spawn(self) -> None:
        self._num_spawned += 1
        name = f"reward-worker-{self._num_spawned}"
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                job.start = time.monotonic()
                self._running[id(job)] = job
            value: Any = None
            error: Optional[BaseException] = None
            try:
                value = self.fn(job.response, job.answer)
            except Exception as e:  # any failure of the function is the sample's, not the worker's
                error = e
            with self._lock:
                if job.abandoned:
                    return  # timed out: a replacement worker already took this thread's place
                del self._running[id(job)]
            self._results.put((job, value, error))

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> Tuple[List[float], Dict[str, float]]:
        """Scores (one float per response, failures 0.0) and ``{"reward/errors": count}``."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self._closed:
            raise RuntimeError("this RewardRunner is closed")
        with self._call_lock:
            return self._score(responses, answers)

    def _score(self, responses: Sequence[str], answers: Sequence[str]) -> Tuple[List[float], Dict[str, float]]:
        # Jobs carry their batch so that leftovers of an interrupted batch can never land in this one.
        self._num_batches += 1
        batch = self._num_batches
        jobs = [_Job(batch, i, r, a) for i, (r, a) in enumerate(zip(responses, answers))]
        for job in jobs:
            self._jobs.put(job)
        scores = [0.0] * len(jobs)
        failures: List[RewardFailure] = []
        pending = {job.index: job for job in jobs}
        while pending:
            failures.extend(self._expire(pending, batch))
            if not pending:
                break
            try:
                job, value, error = self._results.get(timeout=self._wait_s())
            except queue.Empty:
                continue
            if job.batch != batch:
                continue
            del pending[job.index]
            failure = self._check(job, value, error)
            if failure is None:
                scores[job.index] = float(value)
            else:
                failures.append(failure)
        failures.sort(key=lambda f: f.index)
        self._record(failures)
        return scores, {ERRORS_METRIC: float(len(failures))}

    def _wait_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            deadlines = [job.start + self.timeout_s for job in self._running.values()]
        # Jobs still queued have no deadline yet; look again within timeout_s to catch the next start.
        return max(0.0, min(deadlines, default=now + self.timeout_s) - now) + 1e-3

    def _expire(self, pending: Dict[int, _Job], batch: int) -> List[RewardFailure]:
        now = time.monotonic()
        expired: List[_Job] = []
        with self._lock:
            for key, job in list(self._running.items()):
                if now >= job.start + self.timeout_s:
                    job.abandoned = True
                    del self._running[key]
                    expired.append(job)
        for job in expired:
            self.num_abandoned_threads += 1
            self._spawn()
        expired = [job for job in expired if job.batch == batch]
        for job in expired:
            del pending[job.index]
        return [
            RewardFailure(j.index, "timeout", f"no result within {self.timeout_s:g} s", j.response, j.answer)
            for j in expired
        ]

    @staticmethod
    def _check(job: _Job, value: Any, error: Optional[BaseException]) -> Optional[RewardFailure]:
        if error is not None:
            message = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
            return RewardFailure(job.index, "error", message, job.response, job.answer)
        ok = isinstance(value, numbers.Real) and math.isfinite(value)
        if not ok:
            message = f"returned {value!r}, not a finite number"
            return RewardFailure(job.index, "bad_value", message, job.response, job.answer)
        return None

    def _record(self, failures: List[RewardFailure]) -> None:
        self.last_failures = failures
        timeouts = sum(f.kind == "timeout" for f in failures)
        self.total_timeouts += timeouts
        self.total_errors += len(failures)
        for f in failures[: self.max_logged_failures]:
            logger.warning(
                "reward %s on sample %d (scored 0): %s | response: %r | answer: %r",
                f.kind, f.index, f.message, _excerpt(f.response), _excerpt(f.answer),
            )
        if len(failures) > self.max_logged_failures:
            logger.warning(
                "reward: %d more failures in this batch (%d in all, %d time-outs), each scored 0",
                len(failures) - self.max_logged_failures, len(failures), timeouts,
            )

    def close(self) -> None:
        """Stop the idle workers (abandoned ones end with their call)."""
        if not self._closed:
            self._closed = True
            for _ in range(self.num_workers):
                self._jobs.put(None)

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build_reward_runner(reward_cfg: Any) -> RewardRunner:
    """A runner for the config's reward section (``name``, ``timeout_s``, ``num_workers``)."""
    return RewardRunner(get_reward(reward_cfg.name), timeout_s=reward_cfg.timeout_s, num_workers=reward_cfg.num_workers)


def _excerpt(text: Any) -> str:
    text = str(text)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + f"... ({len(text)} chars)"
