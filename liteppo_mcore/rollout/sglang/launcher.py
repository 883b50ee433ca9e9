"""Launching node-local SGLang servers as subprocesses, and making sure they die with us.

Each server runs in its own process group (SGLang forks scheduler and detokenizer processes), so
shutdown signals the whole group: SIGTERM, then SIGKILL after a grace period. Every launched server is
also registered for `atexit`, and a launch that fails (timeout, early exit) shuts its server down
before the error propagates.
"""

from __future__ import annotations

import atexit
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence

from .client import ServerClient

EXTRA_ARGS_ENV = "LITEPPO_SGLANG_EXTRA_ARGS"
# Variables that would make SGLang report log-probs other than those of softmax(logits / T), or that
# torchrun set for the trainer and must not leak into the server's own process groups.
_DROPPED_ENV = ("SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB", "RANK", "WORLD_SIZE",
                "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID")

_LIVE: set[ServerProcess] = set()
_LIVE_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def build_server_command(model_path: str, *, port: int, tp: int = 1, base_gpu_id: int = 0,
                         mem_fraction_static: float = 0.5, seed: int = 0, host: str = "127.0.0.1",
                         enable_memory_saver: bool = True, extra_args: Sequence[str] = (),
                         launcher: Sequence[str] | None = None) -> list[str]:
    """The `python -m sglang.launch_server` command line of one server.

    Token ids in and out (`--skip-tokenizer-init`), so the server needs no tokenizer and never
    re-tokenizes. `launcher` replaces the program (tests run a stand-in server with the same flags).
    """
    program = list(launcher) if launcher is not None else [sys.executable, "-m", "sglang.launch_server"]
    command = program + [
        "--model-path", str(model_path), "--host", host, "--port", str(port),
        "--tp-size", str(tp), "--base-gpu-id", str(base_gpu_id),
        "--mem-fraction-static", str(mem_fraction_static), "--random-seed", str(seed),
        "--skip-tokenizer-init", "--trust-remote-code"]
    if enable_memory_saver:
        command.append("--enable-memory-saver")
    return command + list(extra_args)


def extra_args_from_env(env: dict[str, str] | None = None) -> list[str]:
    """User flags for every launched server, e.g. LITEPPO_SGLANG_EXTRA_ARGS='--attention-backend fa3'."""
    return shlex.split((env if env is not None else os.environ).get(EXTRA_ARGS_ENV, ""))


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key in _DROPPED_ENV:
        env.pop(key, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ServerProcess:
    """One launched server: its process group, a rolling tail of its output, and its shutdown."""

    def __init__(self, command: Sequence[str], url: str, *, log_path: str | None = None,
                 env: dict[str, str] | None = None, tail_lines: int = 40):
        self.command = list(command)
        self.url = url
        self.log_path = log_path
        self._tail: deque = deque(maxlen=tail_lines)
        self._proc = subprocess.Popen(self.command, env=server_env(env), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        self._reader = threading.Thread(target=self._pump, name=f"sglang-log-{self.pid}", daemon=True)
        self._reader.start()
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _pump(self) -> None:
        """Copy the server's output to its log file (and keep the last lines for error messages)."""
        stdout = self._proc.stdout
        assert stdout is not None  # started with stdout=PIPE
        log = open(self.log_path, "a", buffering=1) if self.log_path else None
        try:
            for raw in iter(stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                self._tail.append(line)
                if log is not None:
                    log.write(line + "\n")
        finally:
            if log is not None:
                log.close()

    def poll(self) -> int | None:
        return self._proc.poll()

    def log_tail(self, lines: int = 20) -> list[str]:
        return list(self._tail)[-lines:]

    def diagnostics(self) -> str:
        code = self.poll()
        state = "running" if code is None else f"exited with code {code}"
        tail = "\n    ".join(self.log_tail()) or "(no output)"
        where = f"; full log: {self.log_path}" if self.log_path else ""
        return f"pid {self.pid}, {state}{where}; last log lines:\n    {tail}"

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL). Safe to call twice."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self._proc.wait(timeout=wait_s)
                if sig == signal.SIGTERM:
                    # The leader is gone; still SIGKILL stragglers left in its group.
                    try:
                        os.killpg(self.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                break
            except subprocess.TimeoutExpired:
                continue
        self._reader.join(timeout=2.0)


def launch_server(command: Sequence[str], url: str, *, start_timeout_s: float, request_timeout_s: float,
                  max_retries: int, log_path: str | None = None,
                  env: dict[str, str] | None = None, poll_s: float = 1.0) -> ServerClient:
    """Start a server and wait for /health; on any failure the server is shut down before raising."""
    process = ServerProcess(command, url, log_path=log_path, env=env)
    client = ServerClient(url, timeout_s=request_timeout_s, max_retries=max_retries, process=process)
    try:
        client.wait_healthy(start_timeout_s, poll_s=poll_s)
    except BaseException:
        process.shutdown(grace_s=5.0)
        raise
    return client


def shutdown_all() -> None:
    """Shut down every server this process launched (registered with atexit)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for process in live:
        process.shutdown(grace_s=5.0)


atexit.register(shutdown_all)
