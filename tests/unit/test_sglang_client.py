"""Our HTTP client against a stand-in SGLang server (tests/sglang_standin.py).

These tests check OUR side of the protocol (health waiting, time limits, bounded retries, clear errors
about dead servers); they do not run SGLang.
"""

import time

import pytest

from liteppo_mcore.rollout.sglang.client import ServerClient, SGLangServerError
from liteppo_mcore.rollout.sglang.version import SGLangVersionError


def test_wait_healthy_when_server_becomes_healthy_late(standin_factory):
    standin, url = standin_factory(healthy_after_s=0.4)
    start = time.monotonic()
    ServerClient(url).wait_healthy(timeout_s=5.0, poll_s=0.05)
    assert 0.35 <= time.monotonic() - start < 3.0
    assert standin.paths().count("/health") >= 2


def test_wait_healthy_times_out_with_clear_error(standin_factory):
    _, url = standin_factory(never_healthy=True)
    start = time.monotonic()
    with pytest.raises(SGLangServerError, match="did not report healthy within 0.3 s") as info:
        ServerClient(url).wait_healthy(timeout_s=0.3, poll_s=0.05)
    assert url in str(info.value) and "server_start_timeout_s" in str(info.value)
    assert time.monotonic() - start < 3.0


def test_wait_healthy_on_nothing_listening_times_out():
    client = ServerClient("http://127.0.0.1:9")  # discard port: nothing answers
    with pytest.raises(SGLangServerError, match="did not report healthy"):
        client.wait_healthy(timeout_s=0.2, poll_s=0.05)


def test_transient_failures_are_retried_then_succeed(standin_factory):
    standin, url = standin_factory(fail={"/pause_generation": (503, 2)})
    client = ServerClient(url, max_retries=3, retry_delay_s=0.01)
    assert client.request("/pause_generation", {"mode": "retract"})["status"] == "ok"  # SGLang's own answer
    assert standin.paths().count("/pause_generation") == 3


def test_retries_are_bounded_and_the_error_names_the_server(standin_factory):
    standin, url = standin_factory(fail={"/generate": (503, 100)})
    client = ServerClient(url, max_retries=2, retry_delay_s=0.01)
    with pytest.raises(SGLangServerError, match="failed POST /generate 3 time") as info:
        client.request("/generate", {"input_ids": [[1]], "sampling_params": {}})
    assert url in str(info.value)
    assert standin.paths().count("/generate") == 3


def test_client_errors_are_not_retried(standin_factory):
    standin, url = standin_factory(fail={"/generate": (400, 100)})
    client = ServerClient(url, max_retries=5, retry_delay_s=0.01)
    with pytest.raises(SGLangServerError, match="rejected POST /generate: HTTP 400"):
        client.request("/generate", {"input_ids": [[1]], "sampling_params": {}})
    assert standin.paths().count("/generate") == 1


def test_request_time_limit_is_bounded(standin_factory):
    standin, url = standin_factory(delay_s=3.0)
    client = ServerClient(url, timeout_s=0.2, max_retries=1, retry_delay_s=0.01)
    start = time.monotonic()
    with pytest.raises(SGLangServerError, match="time limit 0.2 s"):
        client.request("/generate", {"input_ids": [[1]], "sampling_params": {}})
    assert time.monotonic() - start < 2.0
    assert standin.paths().count("/generate") == 2


def test_server_dying_mid_request_gives_a_clear_error_not_a_hang(standin_factory):
    _, url = standin_factory(die_on="/generate")
    client = ServerClient(url, timeout_s=2.0, max_retries=2, retry_delay_s=0.05)
    start = time.monotonic()
    with pytest.raises(SGLangServerError) as info:
        client.request("/generate", {"input_ids": [[1]], "sampling_params": {}})
    assert url in str(info.value)
    assert time.monotonic() - start < 5.0


def test_server_info_prefers_the_current_endpoint_and_falls_back_to_the_alias(standin_factory):
    standin, url = standin_factory()
    assert ServerClient(url).server_info()["version"] == standin.version
    assert "/server_info" in standin.paths() and "/get_server_info" not in standin.paths()
    _, url = standin_factory(fail={"/server_info": (404, 100)})
    assert ServerClient(url).server_info()["version"]  # the deprecated alias still answers
    _, url = standin_factory(fail={"/server_info": (404, 100), "/get_server_info": (404, 100)})
    assert ServerClient(url).server_info() == {}


def test_the_protocol_follows_the_servers_version_and_refuses_unsupported_ones(standin_factory):
    _, url = standin_factory(version="0.5.20")
    assert not ServerClient(url).protocol.weight_update_session
    _, url = standin_factory(version="0.5.23")
    assert ServerClient(url).protocol.weight_update_session
    _, url = standin_factory(version="0.4.9")
    with pytest.raises(SGLangVersionError, match=r"0\.4\.9 is outside the range .*>=0\.5\.20,<0\.6"):
        _ = ServerClient(url).protocol  # the access itself raises
