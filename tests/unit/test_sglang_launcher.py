"""Launching and shutting down node-local servers, with a fake "server" (tests/sglang_standin.py run as
a script in place of `python -m sglang.launch_server`).

These tests check OUR launcher (command line, health wait, process-group shutdown on error and at
exit, diagnostics of a dead server); they do not run SGLang.
"""

import os
import sys
import time

import pytest

from liteppo_mcore.rollout.sglang import launcher
from liteppo_mcore.rollout.sglang.client import SGLangServerError
from liteppo_mcore.rollout.sglang.launcher import (
    build_server_command,
    extra_args_from_env,
    free_port,
    launch_server,
    server_env,
)

STANDIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sglang_standin.py")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as dead
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return True


def _wait_dead(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _fake(port, *test_flags, tmp_path=None):
    command = build_server_command("/models/qwen", port=port, tp=2, base_gpu_id=2, mem_fraction_static=0.4,
                                   seed=7, launcher=[sys.executable, STANDIN])
    return command + list(test_flags), f"http://127.0.0.1:{port}"


def test_server_command_line():
    command = build_server_command("/models/qwen", port=31000, tp=2, base_gpu_id=4, mem_fraction_static=0.45,
                                   seed=3, extra_args=["--attention-backend", "fa3"])
    assert command[:3] == [sys.executable, "-m", "sglang.launch_server"]
    flags = dict(zip(command[3::2], command[4::2]))
    assert flags["--model-path"] == "/models/qwen" and flags["--port"] == "31000"
    assert flags["--tp-size"] == "2" and flags["--base-gpu-id"] == "4"
    assert flags["--mem-fraction-static"] == "0.45" and flags["--random-seed"] == "3"
    for flag in ("--skip-tokenizer-init", "--enable-memory-saver"):
        assert flag in command
    assert command[-2:] == ["--attention-backend", "fa3"]
    assert "--enable-memory-saver" not in build_server_command("/m", port=1, enable_memory_saver=False)


def test_extra_args_and_server_environment():
    assert extra_args_from_env({launcher.EXTRA_ARGS_ENV: "--attention-backend 'fa3' --cuda-graph-max-bs 8"}) == [
        "--attention-backend", "fa3", "--cuda-graph-max-bs", "8"]
    env = server_env({"SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "RANK": "3", "MASTER_PORT": "1", "PATH": "/bin"})
    assert env["PATH"] == "/bin" and "SGLANG_RETURN_ORIGINAL_LOGPROB" not in env and "RANK" not in env


def test_launch_waits_for_health_and_shutdown_kills_the_process_group(tmp_path):
    port = free_port()
    pid_file = tmp_path / "child.pid"
    command, url = _fake(port, "--healthy-after", "0.3", "--child-pid-file", str(pid_file))
    client = launch_server(command, url, start_timeout_s=20, request_timeout_s=5, max_retries=0,
                           log_path=str(tmp_path / "server.log"), poll_s=0.05)
    try:
        assert client.is_healthy()
        child = int(pid_file.read_text())
        assert _alive(child) and client.process.poll() is None
        assert client.server_info()["tp_size"] == 2  # the fake read --tp-size from our command line
    finally:
        client.process.shutdown(grace_s=2.0)
    assert client.process.poll() is not None
    assert _wait_dead(child)
    assert "serving on" in (tmp_path / "server.log").read_text()
    client.process.shutdown()  # twice is fine


def test_launch_that_never_gets_healthy_is_killed_with_a_clear_error(tmp_path):
    port = free_port()
    pid_file = tmp_path / "child.pid"
    command, url = _fake(port, "--never-healthy", "--child-pid-file", str(pid_file))
    with pytest.raises(SGLangServerError, match="did not report healthy within 1 s") as info:
        launch_server(command, url, start_timeout_s=1.0, request_timeout_s=5, max_retries=0, poll_s=0.05)
    assert url in str(info.value) and "serving on" in str(info.value)  # the log tail is in the error
    assert _wait_dead(int(pid_file.read_text()))
    assert not launcher._LIVE


def test_server_that_exits_during_start_is_reported_with_its_exit_code():
    port = free_port()
    command = [sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(5)", "--port", str(port)]
    start = time.monotonic()
    with pytest.raises(SGLangServerError, match="exited with code 5") as info:
        launch_server(command, f"http://127.0.0.1:{port}", start_timeout_s=30, request_timeout_s=5,
                      max_retries=0, poll_s=0.05)
    assert "CUDA out of memory" in str(info.value)
    assert time.monotonic() - start < 10


def test_server_dying_mid_request_names_url_exit_code_and_log(tmp_path):
    port = free_port()
    command, url = _fake(port, "--die-on", "/generate", "--exit-code", "3")
    client = launch_server(command, url, start_timeout_s=20, request_timeout_s=2, max_retries=2, poll_s=0.05)
    client.retry_delay_s = 0.05
    try:
        start = time.monotonic()
        with pytest.raises(SGLangServerError) as info:
            client.request("/generate", {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 2}})
        message = str(info.value)
        assert url in message and "exited with code 3" in message and "dying during /generate" in message
        assert time.monotonic() - start < 8
    finally:
        client.process.shutdown(grace_s=1.0)


def test_atexit_handler_shuts_down_every_launched_server():
    port = free_port()
    command, url = _fake(port)
    client = launch_server(command, url, start_timeout_s=20, request_timeout_s=2, max_retries=0, poll_s=0.05)
    assert client.process in launcher._LIVE
    launcher.shutdown_all()
    assert client.process.poll() is not None and not launcher._LIVE
