"""A small stdlib HTTP client for one SGLang server: time limits, bounded retries, and errors that name
the server (and, when we launched it, its exit code and last log lines) instead of hanging.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any, Protocol

RETRY_STATUSES = frozenset({500, 502, 503, 504})


class SGLangServerError(RuntimeError):
    """A rollout server failed, died, timed out or answered something we cannot use."""


class ProcessInfo(Protocol):
    """What the client (and the rank that launched it) needs from a server process (see launcher.ServerProcess)."""

    def poll(self) -> int | None: ...

    def diagnostics(self) -> str: ...

    def shutdown(self, grace_s: float = ...) -> None: ...


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return False  # classified by status in the caller
    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
                            http.client.HTTPException, OSError))


class ServerClient:
    """JSON requests to one server. `process` is set when this rank launched the server."""

    def __init__(self, url: str, *, timeout_s: float = 600.0, max_retries: int = 3,
                 retry_delay_s: float = 1.0, process: ProcessInfo | None = None):
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.retry_delay_s = float(retry_delay_s)
        self.process = process
        self._protocol = None

    def __repr__(self) -> str:
        return f"ServerClient({self.url!r})"

    def describe(self) -> str:
        """The server's URL, plus its exit code and log tail when we launched it and it is gone."""
        text = f"SGLang server {self.url}"
        if self.process is not None:
            text += f" ({self.process.diagnostics()})"
        return text

    def _raise_if_dead(self, path: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise SGLangServerError(f"{self.describe()} is not running, so {path} cannot be served. "
                                    "Check its log above for the cause (out of memory, bad model path...).")

    def _once(self, path: str, payload: Any, method: str, timeout_s: float) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")

    def request(self, path: str, payload: Any = None, *, method: str = "POST",
                timeout_s: float | None = None, retries: int | None = None,
                retry_statuses: Iterable[int] = RETRY_STATUSES) -> Any:
        """Send one request; retry transient failures at most `retries` times, then raise a clear error."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        retries = self.max_retries if retries is None else retries
        retry_statuses = frozenset(retry_statuses)
        last: BaseException = RuntimeError("no attempt made")
        for attempt in range(retries + 1):
            self._raise_if_dead(path)
            try:
                return self._once(path, payload, method, timeout_s)
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                last = SGLangServerError(f"HTTP {exc.code}: {detail}")
                if exc.code not in retry_statuses:
                    raise SGLangServerError(f"{self.describe()} rejected {method} {path}: HTTP {exc.code} "
                                            f"{detail}") from None
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not _is_transient(exc):
                    raise
                last = exc
            if attempt < retries:
                time.sleep(self.retry_delay_s * (attempt + 1))
        self._raise_if_dead(path)
        raise SGLangServerError(
            f"{self.describe()} failed {method} {path} {retries + 1} time(s) (time limit {timeout_s:g} s "
            f"each); last error: {type(last).__name__}: {last}. Is the server up and reachable? Raise "
            "rollout.request_timeout_s / rollout.max_retries if it is only slow.") from None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request(path, None, method="GET", **kwargs)

    def is_healthy(self, timeout_s: float = 5.0) -> bool:
        """One /health probe: True on HTTP 200, False on any failure."""
        try:
            self._once("/health", None, "GET", timeout_s)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not healthy yet"
            return False

    def wait_healthy(self, timeout_s: float, *, poll_s: float = 1.0,
                     sleep: Callable[[float], None] = time.sleep) -> None:
        """Poll /health until it answers 200; raise if the process dies or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._raise_if_dead("/health")
            if self.is_healthy(timeout_s=min(5.0, max(poll_s, 0.5))):
                return
            if time.monotonic() >= deadline:
                raise SGLangServerError(
                    f"{self.describe()} did not report healthy within {timeout_s:g} s. Large models take "
                    "minutes to load: raise rollout.server_start_timeout_s, or check the server's log.")
            sleep(poll_s)

    def server_info(self) -> dict[str, Any]:
        """/server_info (the server's arguments and `version`), else its deprecated alias
        /get_server_info; {} when neither answers."""
        from .version import SERVER_INFO_PATHS

        for path in SERVER_INFO_PATHS:
            try:
                info = self.get(path, retries=0, timeout_s=min(self.timeout_s, 30.0))
            except SGLangServerError:
                continue
            if isinstance(info, dict):
                return info
        return {}

    @property
    def protocol(self):
        """The `ServerProtocol` of this server's SGLang version, read once from /server_info. An
        unsupported version, or a server that does not say its version, is refused."""
        if self._protocol is None:
            from .version import protocol_for

            version = self.server_info().get("version")
            if not version:
                raise SGLangServerError(f"{self.describe()} does not report its version in /server_info, so "
                                        "its protocol is unknown; is it an SGLang server?")
            self._protocol = protocol_for(str(version), where=f"the server at {self.url} runs")
        return self._protocol
