"""The stand-in SGLang server itself (tests/sglang_standin.py): it must refuse what the real server
refuses, per version, and compute its answers from the weights it was pushed.

Each behaviour checked here is read from the wheels of SGLang 0.5.20 and 0.5.23 (the stand-in's
docstring names the file). The last tests also compare the stand-in's tables (routes, request fields,
the 0.5.23 contract) with the wheels' own source, fetched and cached like the contract tests' wheels
(tests/sglang_wheels.py; required in CI).
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from tests.sglang_standin import (
    _API_SAMPLING_FIELDS,
    CPU_WIRE_KIND,
    MSG_FLUSH_AFTER_UPDATE,
    MSG_SESSION_DIST,
    MSG_SESSION_NONE,
    MSG_SESSION_OPEN,
    MSG_SESSION_TENSOR,
    NOT_MODELLED,
    REQUIRED,
    StandIn,
    encode_cpu_bucket,
    generate_contract_error,
)

VERSIONS = ("0.5.20", "0.5.23")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def call(url, path, body=None, method="POST", raw=None, timeout=30):
    """(status, parsed answer): JSON when it is JSON, else the text."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


@pytest.fixture
def server(standin_factory):
    return standin_factory


def tiny_model(tmp_path, architecture="LlamaForCausalLM", tie=False):
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[architecture]
    folder = tmp_path / model_type
    folder.mkdir(exist_ok=True)
    config = {"architectures": [architecture], "model_type": model_type, "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 8, "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "tie_word_embeddings": tie, "torch_dtype": "float32", "eos_token_id": 2,
              "bos_token_id": 1, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def state_dict(model_path, seed):
    """A full set of weights for the tiny model (a transformers model of the same config, seeded)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, {name: p.detach().clone() for name, p in model.named_parameters()}


def push(url, named, version, weight_version=None, tp=1, flush_cache=False, session=True):
    entry = encode_cpu_bucket(list(named.items()) if isinstance(named, dict) else named)
    body = {"serialized_named_tensors": [entry] * tp, "load_format": "flattened_bucket", "flush_cache": flush_cache}
    if weight_version is not None:
        body["weight_version"] = weight_version
    if version == "0.5.23" and session:
        assert call(url, "/begin_weight_update", {})[0] == 200
    answer = call(url, "/update_weights_from_tensor", body)
    if version == "0.5.23" and session:
        assert call(url, "/end_weight_update", {})[0] == 200
    return answer


def generate(url, prompts, **sampling):
    sampling.setdefault("max_new_tokens", 4)
    body = {"input_ids": prompts, "sampling_params": sampling, "return_logprob": True}
    return call(url, "/generate", body)


def in_thread(fn, *args, **kwargs):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


# -- endpoints and methods ------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_endpoints_and_methods_of_each_version(server, version):
    standin, url = server(version=version)
    assert call(url, "/no_such_endpoint", {}) == (404, {"detail": "Not Found"})
    assert call(url, "/v1/chat/completions", {})[0] == 501  # real, but not modelled
    assert call(url, "/generate", method="GET")[0] == 405
    assert call(url, "/pause_generation", method="GET")[0] == 405
    assert call(url, "/health", {}, method="POST")[0] == 405
    assert call(url, "/health", method="GET") == (200, None)
    assert call(url, "/flush_cache", method="GET")[0] == 200 and call(url, "/flush_cache")[0] == 200
    for path in ("/server_info", "/get_server_info"):
        status, info = call(url, path, method="GET")
        assert status == 200 and info["version"] == version and info["tp_size"] == 1
        assert ("frontend" in info) == (version == "0.5.23")
    status, info = call(url, "/model_info", method="GET")
    assert status == 200 and info["weight_version"] == "default"
    begin = call(url, "/begin_weight_update", {})
    gone = call(url, "/get_weight_version", method="GET")
    if version == "0.5.20":
        assert begin == (404, {"detail": "Not Found"})
        assert gone[0] == 404 and "Please use '/model_info' instead" in gone[1]["message"]
    else:
        assert begin == (200, {"success": True, "message": "Success"})
        assert gone == (404, {"detail": "Not Found"})


@pytest.mark.parametrize("version", VERSIONS)
def test_request_bodies_are_validated_as_pydantic_does(server, version):
    _, url = server(version=version)
    # unknown keys are ignored (msgspec_struct_pydantic_core_schema: extra_behavior="ignore")
    assert call(url, "/pause_generation", {"mode": "retract", "no_such_key": 1})[0] == 200
    assert call(url, "/continue_generation", {"also_unknown": True})[0] == 200
    # a wrong type, a bad literal, a missing body or field: 400 ErrorResponse
    status, answer = call(url, "/pause_generation", {"mode": "sideways"})
    assert status == 400 and answer["object"] == "error" and answer["code"] == 400
    assert "literal_error" in answer["message"]
    assert call(url, "/pause_generation")[0] == 400  # Body() is required
    status, answer = call(url, "/get_weights_by_name", {"truncate_size": 3})
    assert status == 400 and "'missing'" in answer["message"] and "'name'" in answer["message"]
    status, answer = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": [{"a": 1}]})
    assert status == 400 and "bytes_type" in answer["message"]
    status, answer = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": ["not base64!"]})
    assert status == 400 and "Expected base64-encoded bytes" in answer["message"]
    status, answer = call(url, "/init_weights_update_group", {"master_address": "h", "master_port": "x",
                                                              "rank_offset": 1, "world_size": 2})
    assert status == 400 and "int_parsing" in answer["message"]
    # lax conversions: "false" is a boolean, "29500" an integer
    assert call(url, "/init_weights_update_group", {"master_address": "h", "master_port": "29500", "rank_offset": 1,
                                                    "world_size": 2})[0] == 200
    status, answer = call(url, "/release_memory_occupation", {"tags": "weights"})
    assert status == 400 and "list_type" in answer["message"]


def test_sampling_params_are_checked_by_the_0_5_23_contract(server):
    _, url = server(version="0.5.23")
    status, answer = generate(url, [[1, 2]], temprature=0.5)
    assert status == 400 and answer["error"].startswith("unknown field `temprature`, expected one of `max_new_tokens`")
    status, answer = generate(url, [[1, 2]], temperature="hot")
    assert (status, answer) == (400, {"error": 'invalid type: string "hot", expected f64'})
    status, answer = generate(url, [[1, 2]], top_k=2.5)
    assert (status, answer) == (400, {"error": "invalid type: floating point `2.5`, expected i64"})
    assert call(url, "/generate", {"input_ids": [[1]], "return_logprob": "yes"})[1] == {
        "error": 'invalid type: string "yes", expected a value or an array of values for BoolOrList'}
    # unknown top-level keys are ignored, by the dataclass and by the contract
    assert call(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "extra": 1})[0] == 200
    assert generate_contract_error({"input_ids": [1], "sampling_params": [{"n": 1}, {"nn": 1}]}).startswith(
        "unknown field `nn`")


def test_sampling_params_without_a_contract_in_0_5_20(server):
    _, url = server(version="0.5.20")
    # SamplingParams(**kwargs) raises TypeError, which the /generate handler does not catch
    assert generate(url, [[1, 2]], temprature=0.5) == (500, "Internal Server Error")


@pytest.mark.parametrize("version", VERSIONS)
def test_sampling_values_and_prompts_are_checked(server, version):
    _, url = server(version=version, context_length=16)
    assert generate(url, [[1, 2]], top_p=0.0) == (400, {"error": {"message": "top_p must be in (0, 1], got 0.0."}})
    assert generate(url, [[1, 2]], top_k=0)[0] == 400
    status, answer = generate(url, [[1] * 12], max_new_tokens=8)
    assert status == 400 and "maximum context length of 16 tokens" in answer["error"]["message"]
    status, answer = call(url, "/generate", {"text": "hello", "sampling_params": {}})
    assert status == 400 and "skip_tokenizer_init=True cannot accept text prompts" in answer["error"]["message"]
    status, answer = call(url, "/generate", {"input_ids": "1 2 3"})
    assert status == 400 and "must be list or null; got str" in answer["message"]


# -- the weight-update session (0.5.23) ------------------------------------------------------------------
def test_the_0_5_23_session_refuses_what_the_scheduler_refuses(server):
    _, url = server(version="0.5.23")
    entry = encode_cpu_bucket([("x", torch.ones(2))])
    tensor = {"serialized_named_tensors": [entry], "load_format": "flattened_bucket"}
    assert call(url, "/update_weights_from_tensor", tensor) == (400, {"success": False, "message": MSG_SESSION_TENSOR})
    dist = {"names": ["x"], "dtypes": ["float32"], "shapes": [[2]], "group_name": "g"}
    assert call(url, "/update_weights_from_distributed", dist) == (400, {"success": False, "message": MSG_SESSION_DIST})
    assert call(url, "/end_weight_update", {}) == (400, {"success": False, "message": MSG_SESSION_NONE})
    assert call(url, "/begin_weight_update", {})[0] == 200
    assert call(url, "/begin_weight_update", {}) == (400, {"success": False, "message": MSG_SESSION_OPEN})
    assert call(url, "/update_weights_from_tensor", tensor) == (200, {"success": True, "message": "Success"})
    status, answer = call(url, "/update_weights_from_distributed", dist)
    assert status == 400 and answer["message"].startswith("Failed to receive weights: Group g not in []")
    assert call(url, "/init_weights_update_group", {"master_address": "h", "master_port": 1, "rank_offset": 1,
                                                    "world_size": 2, "group_name": "g"})[0] == 200
    assert call(url, "/update_weights_from_distributed", {**dist, "weight_version": "9"}) == (
        200, {"success": True, "message": "Succeeded to update parameter online. Weight version updated to 9."})
    assert call(url, "/end_weight_update", {})[0] == 200
    assert call(url, "/destroy_weights_update_group", {"group_name": "nope"})[0] == 400


def test_0_5_20_has_no_session_and_asserts_on_a_missing_group(server):
    standin, url = server(version="0.5.20")
    entry = encode_cpu_bucket([("x", torch.ones(2))])
    assert call(url, "/update_weights_from_tensor", {"serialized_named_tensors": [entry],
                                                     "load_format": "flattened_bucket"}) == (
        200, {"success": True, "message": "Success"})
    status, answer = call(url, "/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"],
                                                                    "shapes": [[2]]})
    assert status == 500 and "AssertionError: Group weight_update_group not in []" in answer["error"]["message"]


# -- pushed weights, generation --------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_generation_runs_on_the_pushed_weights(server, tmp_path, version):
    path = tiny_model(tmp_path)
    standin, url = server(version=version, model_path=path)
    reference, weights = state_dict(path, seed=11)
    prompt = [5, 9, 17]
    before = generate(url, [prompt], temperature=0.0, max_new_tokens=5)[1][0]
    assert push(url, weights, version, weight_version="7") == (
        200, {"success": True, "message": "Success Weight version updated to 7."})
    status, [after] = generate(url, [prompt], temperature=0.0, max_new_tokens=5)
    assert status == 200 and after["output_ids"] != before["output_ids"]
    meta = after["meta_info"]
    n = len(after["output_ids"])
    assert meta["weight_version"] == "7" and meta["weight_versions"] == [{"version": "7", "start": 0, "end": n}]
    assert meta["finish_reason"] in ({"type": "length", "length": 5}, {"type": "stop", "matched": 2})
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == len(after["output_ids"])
    # greedy: the argmax of the reference model, with log_softmax(logits) (temperature 1) as log-prob
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([prompt])).logits[0, -1]
    first = meta["output_token_logprobs"][0]
    assert first[1] == int(logits.argmax()) == after["output_ids"][0] and first[2] is None
    assert first[0] == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-5)
    assert len(meta["output_token_logprobs"]) == meta["output_token_logprobs_length"] == len(after["output_ids"])
    assert standin.generations[-1]["weight_version"] == "7" and not standin.generations[-1]["initial_weights"]
    assert standin.generations[0]["initial_weights"]


def test_sampled_log_probs_are_at_the_temperature_and_seeded(server, tmp_path):
    path = tiny_model(tmp_path)
    _, url = server(model_path=path)
    reference, weights = state_dict(path, seed=3)
    push(url, weights, "0.5.23")
    answers = [generate(url, [[4, 8]], temperature=0.7, top_k=-1, sampling_seed=s, max_new_tokens=3)[1][0]
               for s in (1, 1, 2)]
    assert answers[0]["output_ids"] == answers[1]["output_ids"]
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([[4, 8]])).logits[0, -1]
    lp, token, _ = answers[0]["meta_info"]["output_token_logprobs"][0]
    assert lp == pytest.approx(float(torch.log_softmax(logits / 0.7, -1)[token]), abs=1e-5)


def test_a_bucket_may_mix_dtypes_and_tp_entries_must_agree(server, tmp_path):
    path = tiny_model(tmp_path)
    standin, url = server(model_path=path, tp_size=2)
    norm = torch.linspace(0.5, 1.5, 16)
    bucket = [("model.norm.weight", norm), ("model.embed_tokens.weight", torch.ones(64, 16, dtype=torch.bfloat16)),
              ("no.such.weight", torch.zeros(3))]
    assert push(url, bucket, "0.5.23", tp=2)[0] == 200
    status, values = call(url, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 4})
    assert status == 200 and values == pytest.approx(norm[:4].tolist())
    embed = call(url, "/get_weights_by_name", {"name": "model.embed_tokens.weight", "truncate_size": 1})[1]
    assert embed == [[1.0] * 16]  # the bfloat16 tensor of the same bucket
    assert any("no.such.weight not found" in e.get("message", "") for e in standin.events)
    other = encode_cpu_bucket([("model.norm.weight", norm + 1)])
    call(url, "/begin_weight_update", {})
    entries = [encode_cpu_bucket(bucket[:1]), other]
    status, _ = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": entries,
                                                          "load_format": "flattened_bucket"})
    assert status == 200 and standin.violations[-1]["violation"] == "tp_entries_differ"
    status, answer = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": [other],
                                                               "load_format": "flattened_bucket"})
    assert status == 500 and "IndexError" in answer["error"]["message"]  # entry i is TP rank i's
    bad = encode_cpu_bucket([("model.norm.weight", torch.ones(5))])
    status, answer = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": [bad, bad],
                                                               "load_format": "flattened_bucket"})
    assert status == 500 and "Attempted to load weight" in answer["error"]["message"]


def test_the_cpu_wire_format(server):
    standin, url = server(version="0.5.20")
    tensors = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
               ("b", torch.tensor([1, 2], dtype=torch.int64)), ("c", torch.tensor([0.5], dtype=torch.bfloat16))]
    wire = encode_cpu_bucket(tensors)
    payload = torch.load(io.BytesIO(base64.b64decode(wire)), weights_only=True)
    assert payload["kind"] == CPU_WIRE_KIND and payload["flattened_tensor"].dtype == torch.uint8
    rows = [(m["name"], m["shape"], m["dtype"], m["start_idx"], m["end_idx"], m["numel"]) for m in payload["metadata"]]
    assert rows == [("a", [2, 3], "float32", 0, 24, 24), ("b", [2], "int64", 24, 40, 16),
                    ("c", [1], "bfloat16", 40, 42, 2)]
    assert call(url, "/update_weights_from_tensor", {"serialized_named_tensors": [wire],
                                                     "load_format": "flattened_bucket"})[0] == 200
    assert standin.model.values["a"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    # without "kind" it is accepted too; a real MultiprocessingSerializer pickle is not (CUDA IPC)
    no_kind = encode_cpu_bucket(tensors, kind=None)
    assert call(url, "/update_weights_from_tensor", {"serialized_named_tensors": [no_kind],
                                                     "load_format": "flattened_bucket"})[0] == 200
    pickled = base64.b64encode(b"\x80\x04fake").decode()
    status, answer = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": [pickled],
                                                               "load_format": "flattened_bucket"})
    assert status == 500 and "CUDA IPC" in answer["error"]["message"]
    status, answer = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": [wire]})
    assert status == 500 and "flattened_bucket" in answer["error"]["message"]  # load_format None: named tensors


def test_get_weights_by_name_is_llama_only(server, tmp_path):
    _, url = server(model_path=tiny_model(tmp_path, "Qwen2ForCausalLM"))
    # Qwen2ForCausalLM has no get_weights_by_name (sglang/srt/models/qwen2.py): the exporter returns None
    assert call(url, "/get_weights_by_name", {"name": "model.norm.weight"}) == (
        400, {"error": {"message": "Get parameter by name failed"}})
    _, url = server(model_path=tiny_model(tmp_path, "LlamaForCausalLM"))
    assert call(url, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 2})[0] == 200
    assert call(url, "/get_weights_by_name", {"name": "model.nothing"})[0] == 400


# -- scheduling: pause, flush, continue --------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_flush_pause_modes_and_continue(server, version):
    standin, url = server(version=version, token_delay_s=0.05, response_len=40)
    thread, out = in_thread(generate, url, [[1, 2], [3]], max_new_tokens=30)
    wait_for(lambda: len(standin.running) == 2)
    assert call(url, "/flush_cache") == (400, "Flush cache failed.\n")  # requests are running
    assert call(url, "/pause_generation", {"mode": "in_place"})[0] == 200
    assert call(url, "/flush_cache")[0] == 400  # in place: they stay in the running batch
    assert call(url, "/continue_generation", {})[0] == 200
    assert call(url, "/pause_generation", {"mode": "retract"})[0] == 200
    assert len(standin.waiting) == 2 and not standin.running
    status, text = call(url, "/flush_cache")
    if version == "0.5.20":  # is_fully_idle() counts the waiting queue
        assert (status, text) == (400, "Flush cache failed.\n")
    else:  # is_fully_idle(ignore_waiting=_engine_paused)
        assert status == 200 and text.startswith("Cache flushed.")
    assert call(url, "/continue_generation", {}) == (200, {"message": "Generation continued successfully.",
                                                          "status": "ok"})
    thread.join(30)
    status, answers = out["value"]
    assert status == 200 and [a["meta_info"]["num_retractions"] for a in answers] == [1, 1]
    assert all(a["meta_info"]["finish_reason"] == {"type": "length", "length": 30} for a in answers)
    assert call(url, "/flush_cache")[0] == 200  # idle
    assert call(url, "/flush_cache?timeout=-1")[0] == 400


def test_pause_abort_aborts_and_generate_waits_while_paused(server):
    standin, url = server(token_delay_s=0.05, response_len=40)
    thread, out = in_thread(generate, url, [[1, 2]], max_new_tokens=30)
    wait_for(lambda: standin.running)
    assert call(url, "/pause_generation", {}) == (200, {"message": "Generation paused successfully.", "status": "ok"})
    thread.join(10)
    status, [answer] = out["value"]
    assert status == 200 and answer["meta_info"]["finish_reason"] == {
        "type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    waiting, out = in_thread(generate, url, [[1, 2]], max_new_tokens=2)
    time.sleep(0.3)
    assert waiting.is_alive() and "value" not in out  # blocked in the tokenizer manager while paused
    call(url, "/continue_generation", {})
    waiting.join(10)
    assert out["value"][0] == 200


@pytest.mark.parametrize("version", VERSIONS)
def test_an_update_that_must_flush_with_requests_in_place(server, version):
    standin, url = server(version=version, token_delay_s=0.05, response_len=40)
    thread, _ = in_thread(generate, url, [[1, 2]], max_new_tokens=20)
    wait_for(lambda: standin.running)
    call(url, "/pause_generation", {"mode": "in_place"})
    status, answer = push(url, [("x", torch.ones(2))], version, flush_cache=True)
    if version == "0.5.23":
        assert (status, answer) == (400, {"success": False, "message": MSG_FLUSH_AFTER_UPDATE})
    else:  # assert flush_cache_success, "Cache flush failed after updating weights"
        assert status == 500 and "Cache flush failed after updating weights" in answer["error"]["message"]
    call(url, "/continue_generation", {})
    thread.join(30)


def test_an_update_not_paused_waits_for_running_generations(server):
    standin, url = server(version="0.5.20", token_delay_s=0.05, response_len=40)
    thread, out = in_thread(generate, url, [[1]], max_new_tokens=10)
    wait_for(lambda: standin.running)
    push(url, [("x", torch.ones(2))], "0.5.20")  # the model-update writer lock: after the generation
    pushed = next(e for e in standin.events if e["event"] == "pushed")
    assert len(standin.generations) == 1 and standin.generations[0]["epoch"] == pushed["epoch"] - 1
    thread.join(5)
    assert out["value"][0] == 200


# -- memory ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_released_weights_without_a_cpu_backup_are_garbage_until_pushed(server, tmp_path, version):
    path = tiny_model(tmp_path)
    standin, url = server(version=version, model_path=path, enable_memory_saver=True)
    _, weights = state_dict(path, seed=5)
    push(url, weights, version, weight_version="1")
    good = generate(url, [[3, 4]], temperature=0.0)[1][0]["output_ids"]
    assert call(url, "/release_memory_occupation", {"tags": ["kv_cache", "weights"]}) == (200, None)
    status, answer = generate(url, [[3, 4]])  # the forward touches unmapped memory
    assert status == 500 and "released" in answer["error"]["message"]
    assert call(url, "/health", method="GET")[0] == 503
    assert call(url, "/get_weights_by_name", {"name": "model.norm.weight"})[0] == 500
    assert push(url, weights, version)[0] == 500  # loading into released weights faults too
    assert call(url, "/resume_memory_occupation", {"tags": ["weights"]}) == (200, None)
    status, answer = generate(url, [[3, 4]])  # still no KV cache
    assert status == 500 and "kv_cache" in answer["error"]["message"]
    call(url, "/resume_memory_occupation", {"tags": ["kv_cache"]})
    status, [sampled] = generate(url, [[3, 4]], temperature=1.0)
    assert status == 200 and sampled["meta_info"]["finish_reason"] == {"type": "stop", "matched": "NaN happened"}
    assert sampled["output_ids"][-1] == 2 and sampled["meta_info"]["output_token_logprobs"][-1][0] is None
    assert standin.generations[-1]["garbage_weights"]
    assert standin.violations[-1]["violation"] == "generated_on_garbage_weights"
    push(url, weights, version, weight_version="2")
    assert generate(url, [[3, 4]], temperature=0.0)[1][0]["output_ids"] == good
    assert not standin.generations[-1]["garbage_weights"]


def test_a_cpu_backup_or_no_memory_saver_keeps_the_weights(server, tmp_path):
    path = tiny_model(tmp_path)
    for kwargs in ({"enable_memory_saver": True, "enable_weights_cpu_backup": True}, {}):
        standin, url = server(model_path=path, **kwargs)
        before = generate(url, [[3, 4]], temperature=0.0)[1][0]["output_ids"]
        call(url, "/release_memory_occupation", {"tags": None})
        call(url, "/resume_memory_occupation", {"tags": None})
        assert generate(url, [[3, 4]], temperature=0.0)[1][0]["output_ids"] == before
        assert not standin.violations


@pytest.mark.parametrize("version", VERSIONS)
def test_memory_calls_the_scheduler_refuses(server, version):
    standin, url = server(version=version, token_delay_s=0.05, response_len=40)
    status, answer = call(url, "/resume_memory_occupation", {"tags": ["weights"]})
    assert status == 500 and "KeyError: 'weights'" in answer["error"]["message"]
    thread, _ = in_thread(generate, url, [[1]], max_new_tokens=20)
    wait_for(lambda: standin.running)
    status, answer = call(url, "/release_memory_occupation", {})
    assert status == 500 and "should be called only when server is idle" in answer["error"]["message"]
    call(url, "/pause_generation", {"mode": "retract"})
    status, _ = call(url, "/release_memory_occupation", {"tags": ["kv_cache"]})
    assert status == (500 if version == "0.5.20" else 200)  # 0.5.23 ignores the waiting queue when paused
    call(url, "/resume_memory_occupation", {"tags": ["kv_cache"]}) if status == 200 else None
    call(url, "/continue_generation", {})
    thread.join(30)


# -- weight versions and the prefix cache ------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_weight_versions(server, version):
    standin, url = server(version=version, weight_version="v0")
    assert generate(url, [[1]])[1][0]["meta_info"]["weight_version"] == "v0"
    push(url, [("x", torch.ones(2))], version, weight_version="v1")
    assert generate(url, [[1]])[1][0]["meta_info"]["weight_version"] == "v1"
    assert call(url, "/model_info", method="GET")[1]["weight_version"] == "v1"
    assert call(url, "/server_info", method="GET")[1]["weight_version"] == "v0"  # the launch flag, not live
    assert call(url, "/update_weight_version", {"new_version": "v2"}) == (
        200, {"success": True, "message": "Weight version updated to v2", "new_version": "v2"})
    assert generate(url, [[1]])[1][0]["meta_info"]["weight_version"] == "v2"


def test_a_version_change_mid_generation_is_reported_in_spans(server):
    standin, url = server(token_delay_s=0.05, response_len=40)
    thread, out = in_thread(generate, url, [[1]], max_new_tokens=12)
    wait_for(lambda: standin.running and len(standin.running[0].out) >= 3)
    call(url, "/pause_generation", {"mode": "retract"})
    produced = len(standin.waiting[0].out)  # the step in flight completed before the pause returned
    push(url, [("x", torch.ones(2))], "0.5.23", weight_version="new")
    assert standin.waiting[0].version_events == [("default", produced)]
    call(url, "/continue_generation", {})
    thread.join(30)
    meta = out["value"][1][0]["meta_info"]
    assert meta["weight_version"] == "new"
    assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": produced},
                                       {"version": "new", "start": produced, "end": 12}]


def test_a_push_without_a_flush_leaves_stale_prefixes_in_the_cache(server):
    standin, url = server(version="0.5.20")
    prompt = [7, 8, 9, 10]
    generate(url, [prompt])
    assert generate(url, [prompt])[1][0]["meta_info"]["cached_tokens"] == 3
    push(url, [("x", torch.ones(2))], "0.5.20", flush_cache=False)
    assert generate(url, [prompt])[1][0]["meta_info"]["cached_tokens"] == 3
    assert standin.violations[-1]["violation"] == "stale_prefix_cache"
    push(url, [("x", torch.zeros(2))], "0.5.20", flush_cache=True)
    count = len(standin.violations)
    assert generate(url, [prompt])[1][0]["meta_info"]["cached_tokens"] == 0 and len(standin.violations) == count


def test_health_waits_for_a_generation_while_paused(server):
    _, url = server(health_check_timeout_s=0.3)
    call(url, "/pause_generation", {"mode": "retract"})
    assert call(url, "/health", method="GET")[0] == 503 and call(url, "/ready", method="GET")[0] == 503
    call(url, "/continue_generation", {})
    assert call(url, "/health_generate", method="GET")[0] == 200


# -- process mode -----------------------------------------------------------------------------------------
def test_process_mode_takes_sglang_flags(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "tests.sglang_standin", "--model-path", tiny_model(tmp_path), "--host",
               "127.0.0.1", "--port", str(port), "--sglang-version", "0.5.20", "--tp-size", "2",
               "--mem-fraction-static", "0.4", "--skip-tokenizer-init", "--attention-backend", "torch_native"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(url, "/health", method="GET", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        info = call(url, "/server_info", method="GET")[1]
        assert info["version"] == "0.5.20" and info["tp_size"] == 2 and info["mem_fraction_static"] == 0.4
        assert info["attention_backend"] == "torch_native" and info["skip_tokenizer_init"] is True
        assert call(url, "/model_info", method="GET")[1]["architectures"] == ["LlamaForCausalLM"]
        status, answer = generate(url, [[1, 2]], temperature=0.0, max_new_tokens=2)
        assert status == 200 and all(0 <= t < 64 for t in answer[0]["output_ids"])
        assert call(url, "/_standin/state", method="GET")[1]["generations"][0]["initial_weights"]
    finally:
        process.kill()
        process.wait(10)


# -- the stand-in's tables against the wheels' source (when the wheels are here) ---------------------------
def _wheel_source(version, monkeypatch, tmp_path_factory):
    """The wheel's source, downloaded once and cached like the contract tests' (tests/sglang_wheels.py):
    a skip only where the registry is unreachable, a failure then under LITEPPO_REQUIRE_SGLANG_WHEELS=1."""
    from tests import sglang_wheels

    return sglang_wheels.source_for_test(version)


@pytest.mark.parametrize("version", VERSIONS)
def test_routes_and_fields_match_the_wheel(version, monkeypatch, tmp_path_factory):
    from tests import sglang_wheels

    source = _wheel_source(version, monkeypatch, tmp_path_factory)
    standin = StandIn(version=version)
    for path, (methods, _) in standin.routes().items():
        if path.startswith("/_standin"):
            continue
        assert source.methods(path) == frozenset(methods), path
    for path in ("/begin_weight_update", "/get_weight_version"):
        assert (path in standin.routes()) == bool(source.methods(path)), path
    real = {route.path for route in source.routes if "{" not in route.path}
    assert real - set(standin.routes()) == NOT_MODELLED[version]  # the rest answers 501 here, not 404
    bodies = {route.path: route.body for route in source.routes if route.body}
    for path, fields in standin.schemas.items():
        declared = source.class_fields(sglang_wheels.IO_STRUCT, bodies[path])
        assert set(fields) == set(declared), (path, set(fields) ^ set(declared))
        required = {n for n, (_, default) in fields.items() if default is REQUIRED}
        assert required == {n for n, f in declared.items() if f.required}, path


def test_the_contract_matches_the_wheels_decoder(monkeypatch, tmp_path_factory):
    source = _wheel_source("0.5.23", monkeypatch, tmp_path_factory)
    api = source.api_types_module
    if api is None:
        pytest.skip("no api_types in this wheel")
    bodies = [{"input_ids": [1], "sampling_params": {"temprature": 1}},
              {"input_ids": [1], "sampling_params": {"top_k": 2.5}},
              {"input_ids": [[1], [2]], "sampling_params": [{"max_new_tokens": 2}, {"temperature": "x"}]},
              {"input_ids": "x"}, {"input_ids": [1], "return_logprob": "yes"}, {"input_ids": [1], "stream": 1},
              {"input_ids": [1], "sampling_params": {"stop_token_ids": [2, "3"]}}, {"input_ids": [1], "unknown": 5},
              {"input_ids": [1], "max_thinking_tokens": -1},
              {"input_ids": [1], "sampling_params": {"watermark": {"enabled": True, "x": 1}}},
              {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "n": 1, "stop_token_ids": [2],
                                                        "ignore_eos": False, "no_stop_trim": True,
                                                        "skip_special_tokens": False, "sampling_seed": 3,
                                                        "temperature": 0.5, "top_p": 0.9, "top_k": -1}}]
    for body in bodies:
        try:
            api.GenerateRequest.from_json_value(body)
            expected = None
        except api.JsonContractError as exc:
            expected = str(exc)
        assert generate_contract_error(body) == expected, body
    assert tuple(source.api_struct_fields("SamplingParams")) == _API_SAMPLING_FIELDS
