"""One writer per run directory: `RUN_DIR/run.lock`.

The lock file is created with O_EXCL and holds who holds it: host, PID, the process's start time
(from /proc, so that a reused PID is not mistaken for the holder), the SLURM job when there is one,
and when the run started. The holder touches it every `HEARTBEAT_S` seconds from a daemon thread.

A lock is stale, and is taken over with a warning, when
- its host is this host and its process is gone (or the PID now belongs to another process), or
- its host is another host and it has not been touched for `STALE_AFTER_S` seconds (a job requeued
  on another node after its node died).

Anything else is a live run: starting a second one on the same directory is refused (exit 2) with a
message naming the holder. The lock is removed on a normal exit; a killed run leaves it behind, and
the next start on the same host, or anywhere after `STALE_AFTER_S`, takes it over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from liteppo_mcore.checkpoint.paths import CheckpointError

LOCK_FILE = "run.lock"
READ_MARKER = ".reading."  # + host.pid, inside a checkpoint folder being read
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunDirLocked(CheckpointError):
    """Another live run holds the run directory."""


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or
    None when the process does not exist (or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    now = process_start_time(pid)
    if now is not None:
        return start is None or now == start
    try:  # no /proc (not Linux): the PID alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not os.path.isdir("/proc")


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host')}, PID {holder.get('pid')}{job}, started {holder.get('started')}"


class RunDirLock:
    """`acquire()` takes the lock or raises RunDirLocked; `release()` removes it (only if still ours)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._mine: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None
        """When a stale lock was replaced: why it was stale (for the log)."""

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start_time(pid),
                "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def holder(self) -> dict[str, Any] | None:
        """The current lock file's content (None when there is none); an unreadable one is {}."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock described by `holder` no longer protects a live run (None: it does)."""
        try:
            age = time.time() - os.path.getmtime(self.path)
        except OSError:
            return "it was removed"
        if not holder:
            # Half-written by a process killed while creating it (or garbage): give a live writer a moment.
            return "it is empty or unreadable" if age > 10 else None
        if holder.get("host") == socket.gethostname():
            if not _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
                return f"its process ({_describe(holder)}) is gone"
            return None
        if age > STALE_AFTER_S:
            return f"its holder ({_describe(holder)}) has not renewed it for {age:.0f} s"
        return None

    def acquire(self) -> RunDirLock:
        os.makedirs(self.run_dir, exist_ok=True)
        record = self._record()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile
                reason = self.stale_reason(holder)
                if reason is None:
                    raise RunDirLocked(
                        f"output_dir={self.run_dir} is in use by another run ({_describe(holder)}; lock file "
                        f"{self.path}). Two runs on one directory overwrite each other's checkpoints and metrics: "
                        "wait for that run to end or stop it, or choose another output_dir. If that process is "
                        f"gone (it ran on another host), delete {self.path}.") from None
                # Move the stale file aside under a name of our own, so that of two processes that
                # both found it stale only one removes it, and neither removes a fresh lock.
                aside = f"{self.path}.stale.{os.getpid()}"
                try:
                    os.rename(self.path, aside)
                    os.remove(aside)
                except FileNotFoundError:
                    pass
                self.took_over = reason
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            self._mine = record
            self._thread = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
            self._thread.start()
            return self
        raise RunDirLocked(f"could not take the lock {self.path} (it keeps changing): is another run starting "
                           "on the same output_dir?")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._mine is None:
            return
        self._stop.set()
        if self.holder() == self._mine:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self._mine = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def reading(folder: str) -> Iterator[None]:
    """Mark `folder` as being read (by this process) while the block runs: retention leaves it alone."""
    path = os.path.join(folder, f"{READ_MARKER}{socket.gethostname()}.{os.getpid()}")
    try:
        with open(path, "w", encoding="utf-8") as f:
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start_time(os.getpid())}
            json.dump(holder, f)
    except OSError:
        path = ""  # a read-only checkpoint: nobody can delete it from here either
    try:
        yield
    finally:
        if path:
            with contextlib.suppress(OSError):
                os.remove(path)


def being_read(folder: str) -> bool:
    """Whether a live process (this host), or any process of another host within a day, reads `folder`."""
    for name in os.listdir(folder):
        if not name.startswith(READ_MARKER):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                marker = json.load(f)
            age = time.time() - os.path.getmtime(path)
        except (OSError, ValueError):
            continue
        if marker.get("host") != socket.gethostname():
            if age < 24 * 3600:  # another host's reader cannot be checked: trusted for a day
                return True
        elif process_start_time(int(marker.get("pid", -1))) == marker.get("pid_start"):
            return True
    return False
