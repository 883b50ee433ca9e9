"""Request payloads, answer parsing and the version check of the SGLang engine.

These tests check OUR side of the protocol against the shapes in SGLang 0.5.x's source (GenerateReqInput,
SamplingParams, meta_info.output_token_logprobs, finish_reason); they do not run SGLang.
"""

import math
import subprocess
import sys

import pytest

from liteppo_mcore.rollout.engine import SamplingParams
from liteppo_mcore.rollout.sglang.client import SGLangServerError
from liteppo_mcore.rollout.sglang.protocol import (
    generate_payload,
    parse_generate_response,
    parse_generation,
    sample_seed,
)
from liteppo_mcore.rollout.sglang.version import SGLangVersionError, check_sglang_version, parse_version

PARAMS = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, n=2, seed=5,
                        stop_token_ids=(2, 9))


def _item(tokens, logprobs, reason, output_ids=None):
    item = {"meta_info": {"finish_reason": reason,
                          "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens)]}}
    if output_ids is not None:
        item["output_ids"] = output_ids
    return item


def test_package_imports_without_sglang():
    code = ("import sys; sys.modules['sglang'] = None\n"  # any `import sglang` would now fail
            "import liteppo_mcore.rollout.sglang as pkg\n"
            "from liteppo_mcore.rollout.sglang import build, engine, launcher, weight_sync, protocol\n"
            "assert callable(pkg.build_sglang_engine)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_generate_payload_fields():
    payload = generate_payload([[1, 2, 3], [4]], PARAMS, stream=3, first_prompt_index=10)
    assert payload["return_logprob"] is True and payload["stream"] is False
    assert payload["input_ids"] == [[1, 2, 3], [1, 2, 3], [4], [4]]  # prompt-major, n copies each
    first = payload["sampling_params"][0]
    assert first["temperature"] == 0.7 and first["top_p"] == 0.9 and first["top_k"] == 20
    assert first["max_new_tokens"] == 8 and first["n"] == 1 and first["stop_token_ids"] == [2, 9]
    assert first["ignore_eos"] is False
    seeds = [sp["sampling_seed"] for sp in payload["sampling_params"]]
    assert len(set(seeds)) == 4 and seeds[0] == sample_seed(5, 3, 10, 0) and seeds[3] == sample_seed(5, 3, 11, 1)
    assert generate_payload([[1]], PARAMS, stream=4)["sampling_params"][0]["sampling_seed"] != seeds[0]


def test_disabled_top_k_and_greedy_payloads():
    assert generate_payload([[1]], SamplingParams(top_k=-1))["sampling_params"][0]["top_k"] == -1
    greedy = generate_payload([[1]], SamplingParams(greedy=True, temperature=0.6, top_k=5))["sampling_params"][0]
    assert greedy["temperature"] == 0.0 and "top_k" not in greedy and "top_p" not in greedy


def test_parse_stop_and_length_generations():
    stop = parse_generation(_item([5, 6, 2], [-0.1, -0.2, -0.3], {"type": "stop", "matched": 2}, [5, 6, 2]), PARAMS)
    assert stop.token_ids == [5, 6, 2] and stop.logprobs == [-0.1, -0.2, -0.3] and stop.finish_reason == "stop"
    length = parse_generation(_item([5, 6], [-0.1, -0.2], {"type": "length", "length": 2}), PARAMS)
    assert length.finish_reason == "length"
    # a stop token as the last allowed token is a stop, whatever SGLang calls it
    last = parse_generation(_item([5, 9], [-0.1, -0.2], {"type": "length", "length": 2}), PARAMS)
    assert last.finish_reason == "stop"
    # output_ids trimmed of the stop token still agree
    trimmed = parse_generation(_item([5, 2], [-0.1, -0.2], {"type": "stop", "matched": 2}, [5]), PARAMS)
    assert trimmed.token_ids == [5, 2]


def test_greedy_logprobs_are_nan_unless_temperature_is_one():
    item = _item([5, 2], [-0.1, -0.2], {"type": "stop", "matched": 2})
    at_07 = parse_generation(item, SamplingParams(greedy=True, temperature=0.7, stop_token_ids=(2,)))
    assert all(math.isnan(x) for x in at_07.logprobs) and at_07.token_ids == [5, 2]
    at_1 = parse_generation(item, SamplingParams(greedy=True, temperature=1.0, stop_token_ids=(2,)))
    assert at_1.logprobs == [-0.1, -0.2]


@pytest.mark.parametrize("item, match", [
    (_item([5], [-0.1], {"type": "abort", "message": "client disconnected"}), "aborted a request"),
    (_item([5, 6], [-0.1, -0.2], {"type": "stop"}, [7, 6]), "disagree"),
    ({"meta_info": {"finish_reason": {"type": "length"}}}, "return_logprob"),
    (_item([5], [-0.1], {"type": "weird"}), "unexpected SGLang finish reason"),
])
def test_bad_answers_raise_clear_errors(item, match):
    with pytest.raises(SGLangServerError, match=match):
        parse_generation(item, PARAMS)


def test_parse_response_groups_by_prompt_and_checks_the_count():
    items = [_item([10 + i], [-0.5], {"type": "length"}) for i in range(4)]
    grouped = parse_generate_response(items, 2, PARAMS)
    assert [[g.token_ids[0] for g in group] for group in grouped] == [[10, 11], [12, 13]]
    with pytest.raises(SGLangServerError, match="answered 3 generations for 4 requests"):
        parse_generate_response(items[:3], 2, PARAMS)


@pytest.mark.parametrize("version, ok", [("0.5.20", True), ("0.5.23.post1", True), ("0.5.99", True),
                                         ("0.5.19", False), ("0.6.0", False), ("0.4.10", False), ("1.0", False)])
def test_version_range(version, ok):
    if ok:
        assert check_sglang_version(version) == version
    else:
        with pytest.raises(SGLangVersionError, match=r">=0.5.20,<0.6"):
            check_sglang_version(version)


def test_missing_sglang_error_says_how_to_fix(monkeypatch):
    from liteppo_mcore.rollout.sglang import version as version_module

    monkeypatch.setattr(version_module, "installed_version", lambda: None)
    with pytest.raises(SGLangVersionError, match="not installed.*rollout.engine=hf"):
        check_sglang_version()
    assert parse_version("v0.5") == (0, 5, 0)


# ---- versions, weight versions, the CPU wire format, the probe check ------------------------------

def test_each_version_gets_its_protocol_and_others_are_refused():
    from liteppo_mcore.rollout.sglang.version import SGLangVersionError, protocol_for

    # the weight-update session is enforced from 0.5.21 on (read in the 0.5.20-0.5.23 wheels)
    assert [protocol_for(v).weight_update_session for v in ("0.5.20", "0.5.21", "0.5.23.post1")] == [False, True, True]
    assert protocol_for("0.5.20").server_info_path == "/server_info"
    for bad in ("0.4.10", "0.6.0", "1.0"):
        with pytest.raises(SGLangVersionError, match=r">=0\.5\.20,<0\.6"):
            protocol_for(bad)


def test_generations_must_report_the_version_last_pushed():
    from liteppo_mcore.rollout.sglang.protocol import check_weight_versions

    answer = [{"meta_info": {"weight_version": "5"}}, {"meta_info": {"weight_version": "5"}}]
    check_weight_versions(answer, "5", "server A")
    check_weight_versions(answer, None, "server A")  # before the first push: nothing to compare
    with pytest.raises(SGLangServerError, match="server A generated with weight_version '5', but the trainer "
                                                "last pushed '6'"):
        check_weight_versions(answer, "6", "server A")
    with pytest.raises(SGLangServerError, match="weight_version None"):
        check_weight_versions([{"meta_info": {}}], "6", "server A")


def test_cpu_wire_format_round_trips_every_dtype_in_one_bucket():
    import torch

    from liteppo_mcore.rollout.sglang.cpu_wire import deserialize_cpu_bucket, serialize_cpu_bucket

    bucket = [("a", torch.randn(3, 2)), ("b", torch.arange(5, dtype=torch.int64)),
              ("c", torch.randn(4).to(torch.bfloat16))]
    wire, keep = serialize_cpu_bucket(bucket)
    assert isinstance(wire, str) and keep is None
    back = deserialize_cpu_bucket(wire)
    assert [n for n, _ in back] == ["a", "b", "c"]
    assert all(t.dtype == s.dtype and torch.equal(t, s) for (_, t), (_, s) in zip(back, bucket))


def test_the_probe_check_passes_rounding_and_catches_a_broken_sync():
    import torch

    from liteppo_mcore.rollout.metrics import WeightSyncError, check_probe_logprobs, probe_tolerance

    trainer = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    engine = trainer + 1e-5
    engine[1, 2] = float("nan")  # past the response: ignored
    assert check_probe_logprobs(engine, trainer, mask, engine="sglang", atol=probe_tolerance(torch.float32)) < 1e-4
    broken = trainer.clone()
    broken[0, 1] -= 0.7
    with pytest.raises(WeightSyncError, match="differ from the trainer's by up to 7.000e-01"):
        check_probe_logprobs(broken, trainer, mask, engine="sglang", atol=1e-3)
    engine[0, 0] = float("nan")  # a NaN on a valid token is a failure, not a pass
    with pytest.raises(WeightSyncError):
        check_probe_logprobs(engine, trainer, mask, engine="sglang", atol=1e-3)
    assert probe_tolerance(torch.bfloat16) > probe_tolerance(torch.float32)
