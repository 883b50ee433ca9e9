"""A stand-in for an SGLang HTTP server, for tests of OUR side of the protocol (not of SGLang).

It speaks the request and response shapes of the SGLang 0.5.x endpoints that liteppo_mcore uses
(/health, /get_server_info, /generate, /pause_generation, /flush_cache, /continue_generation,
/update_weights_from_tensor, /init_weights_update_group, /update_weights_from_distributed,
/destroy_weights_update_group, /get_weights_by_name, /release_memory_occupation,
/resume_memory_occupation), records every call, and can misbehave on purpose: become healthy late
or never, answer slowly, fail a number of times, or die in the middle of a request.

Run as a script it plays a launched server: it accepts SGLang's command-line flags (only --port,
--host and --tp-size matter) plus test-only flags, so the launcher can start it in place of
`python -m sglang.launch_server`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple


class StandIn:
    """The server's behaviour and its record of calls."""

    def __init__(self, *, healthy_after_s: float = 0.0, never_healthy: bool = False, delay_s: float = 0.0,
                 fail: Optional[Dict[str, Tuple[int, int]]] = None, die_on: Optional[str] = None,
                 exit_code: Optional[int] = None, version: str = "0.5.23", tp_size: int = 1,
                 answers: Optional[Dict[str, Any]] = None, weights: Optional[Dict[str, List[float]]] = None,
                 response_len: int = 3):
        self.started = time.monotonic()
        self.healthy_after_s, self.never_healthy = healthy_after_s, never_healthy
        self.delay_s = delay_s                  # slow answers to /generate
        self.fail = dict(fail or {})            # path -> (HTTP status, how many times)
        self.die_on = die_on                    # path on which the server dies mid-request
        self.exit_code = exit_code              # script mode: die with os._exit(exit_code)
        self.version, self.tp_size = version, tp_size
        self.answers = dict(answers or {})      # path -> JSON answer overriding the default
        self.weights = dict(weights or {})      # name -> values for /get_weights_by_name
        self.response_len = response_len
        self.calls: List[Tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.httpd: Optional[ThreadingHTTPServer] = None

    # -- lifecycle (thread mode) -------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        standin = self

        class Handler(_Handler):
            state = standin

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://{host}:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        if self.httpd is not None:
            httpd, self.httpd = self.httpd, None
            httpd.shutdown()
            httpd.server_close()

    def paths(self) -> List[str]:
        with self.lock:
            return [path for path, _ in self.calls]

    def payloads(self, path: str) -> List[Any]:
        with self.lock:
            return [payload for p, payload in self.calls if p == path]

    # -- answers -----------------------------------------------------------------------------------
    def healthy(self) -> bool:
        return not self.never_healthy and time.monotonic() - self.started >= self.healthy_after_s

    def generate(self, payload: Dict[str, Any]) -> List[Dict[str, Any]]:
        input_ids = payload["input_ids"]
        params = payload["sampling_params"]
        if isinstance(params, dict):
            params = [params] * len(input_ids)
        return [self._one(prompt, sp, i) for i, (prompt, sp) in enumerate(zip(input_ids, params))]

    def _one(self, prompt: List[int], sp: Dict[str, Any], index: int) -> Dict[str, Any]:
        budget = int(sp.get("max_new_tokens", 16))
        base = (sum(prompt) + int(sp.get("sampling_seed", 0))) % 97 + 100
        stops = list(sp.get("stop_token_ids") or [])
        tokens = [base + k for k in range(min(budget, self.response_len))]
        if stops and len(tokens) < budget:  # emit a stop token when there is room for it
            tokens.append(int(stops[0]))
            reason: Dict[str, Any] = {"type": "stop", "matched": int(stops[0])}
        else:
            reason = {"type": "length", "length": len(tokens)}
        logprobs = [[-0.25 * (k + 1), t, None] for k, t in enumerate(tokens)]
        return {"output_ids": tokens, "meta_info": {
            "id": f"req-{index}", "finish_reason": reason, "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens), "output_token_logprobs": logprobs}}

    def answer(self, path: str, payload: Any) -> Any:
        if path in self.answers:
            return self.answers[path]
        if path == "/generate":
            return self.generate(payload)
        if path == "/get_server_info":
            return {"version": self.version, "tp_size": self.tp_size, "dp_size": 1, "pp_size": 1}
        if path == "/get_weights_by_name":
            return self.weights.get(payload["name"], [])[: int(payload.get("truncate_size", 100))]
        if path == "/flush_cache":
            return "Cache flushed."
        return {"success": True, "message": "Succeeded"}


class _Handler(BaseHTTPRequestHandler):
    state: StandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._serve(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self._serve(json.loads(body) if body else None)

    def _serve(self, payload: Any) -> None:
        state, path = self.state, self.path
        with state.lock:
            state.calls.append((path, payload))
        if path == "/health":
            return self._send(200 if state.healthy() else 503, {} if state.healthy() else {"error": "loading"})
        if state.die_on == path:
            return self._die()
        status, times = state.fail.get(path, (200, 0))
        if times > 0:
            state.fail[path] = (status, times - 1)
            return self._send(status, {"error": f"injected failure {status}"})
        if path == "/generate" and state.delay_s:
            time.sleep(state.delay_s)
        self._send(200, state.answer(path, payload))

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _die(self) -> None:
        """Drop the connection without an answer, then stop serving (a crashed server)."""
        print(f"stand-in: dying during {self.path}", flush=True)
        if self.state.exit_code is not None:
            os._exit(self.state.exit_code)
        self.close_connection = True
        threading.Thread(target=self.state.stop, daemon=True).start()
        self.connection.close()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--healthy-after", type=float, default=0.0)
    parser.add_argument("--never-healthy", action="store_true")
    parser.add_argument("--die-on", default=None)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--child-pid-file", default=None, help="spawn a child (like SGLang's schedulers)")
    args, _ = parser.parse_known_args(argv)
    if args.child_pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(args.child_pid_file, "w") as handle:
            handle.write(str(child.pid))
    standin = StandIn(healthy_after_s=args.healthy_after, never_healthy=args.never_healthy,
                      die_on=args.die_on, exit_code=args.exit_code, tp_size=args.tp_size)
    print(f"stand-in: serving on {args.host}:{args.port}", flush=True)
    standin.start(args.host, args.port)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
