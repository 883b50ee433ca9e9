"""A stand-in for an SGLang HTTP server: a model of the real server's state machine, per version, read
from SGLang's own wheels, for tests of OUR side of the protocol (it does not run SGLang).

Versions: "0.5.20" and "0.5.23" (chosen at construction, default "0.5.23", or by `--sglang-version` as a
process). Another version string is reported as given in /server_info (to test a client's version
check) and behaves as the nearest modelled one (`_behaviour_of`). Every behaviour below names the wheel
file it models (paths inside the wheel; "http_server" is
sglang/srt/entrypoints/http_server.py, "io_struct" sglang/srt/managers/io_struct.py, "tokenizer_manager"
sglang/srt/managers/tokenizer_manager.py, "control_mixin" sglang/srt/managers/tokenizer_control_mixin.py,
"weight_updater" sglang/srt/managers/scheduler_components/weight_updater.py, "scheduler"
sglang/srt/managers/scheduler.py, "schedule_batch" sglang/srt/managers/schedule_batch.py).

Endpoints (http_server; others answer 404 {"detail": "Not Found"}, a wrong method 405
{"detail": "Method Not Allowed"}; real endpoints this model leaves out answer 501):
  GET /health, /health_generate; GET /ready; GET /model_info, /get_model_info (deprecated alias);
  GET /server_info, /get_server_info (deprecated alias); POST|PUT /generate; GET|POST /flush_cache
  (?timeout=); POST /pause_generation, /continue_generation; POST /update_weights_from_tensor,
  /update_weights_from_distributed, /init_weights_update_group, /destroy_weights_update_group,
  /update_weight_version, /abort_request; GET|POST /get_weights_by_name, /release_memory_occupation,
  /resume_memory_occupation.  0.5.20 only: GET /get_weight_version and /weight_version, which answer 404
  "...deprecated. Please use '/model_info' instead." (ErrorResponse shape). 0.5.23 only: POST
  /begin_weight_update, /end_weight_update (0.5.23 has no /get_weight_version nor /weight_version).
  The weight version is read from /model_info's "weight_version" in both.

Request bodies (io_struct; http_server's RequestValidationError handler): the `*ReqInput` msgspec structs
are validated by pydantic through `msgspec_struct_pydantic_core_schema`
(sglang/srt/utils/msgspec_utils.py): a typed dict with extra_behavior="ignore", so UNKNOWN KEYS ARE
IGNORED; a wrong type or a missing required field is a 400 {"object": "error", "message": ..., "type":
"Bad Request", "param": null, "code": 400} (FastAPI's 422 turned into 400), with pydantic's lax
conversions ("false" -> False, 3.0 -> 3). `serialized_named_tensors` is `Annotated[List[bytes],
Base64Bytes()]`: JSON strings, base64-decoded (validate=True) at the HTTP layer; anything else is a 400.
/generate's body is the `GenerateReqInput` dataclass (unknown top-level keys ignored, field types
checked); 0.5.23 then runs the JSON contract gate (sglang/srt/entrypoints/api_contract.py,
sglang/api/v1/api_types.py): sampling_params keys outside the API's SamplingParams are a 400
{"error": "unknown field `x`, expected one of `max_new_tokens`, ..."} and wrong JSON types a 400
{"error": "invalid type: string \\"a\\", expected f64"}. 0.5.20 has no gate: an unknown sampling key reaches
`SamplingParams(**kwargs)` (sglang/srt/sampling/sampling_params.py, a msgspec Struct), whose TypeError
is not caught (the handler catches ValueError only): a 500 "Internal Server Error". In both, value
errors of `SamplingParams.verify` (e.g. top_p outside (0, 1]) and of the tokenizer manager (context
length, text prompts under --skip-tokenizer-init) are 400 {"error": {"message": ...}}.

Weight-update session (0.5.23, weight_updater: `_session`): update_weights_from_tensor and
update_weights_from_distributed outside begin_weight_update/end_weight_update answer 400
{"success": false, "message": "update_weights_from_tensor must run between begin_weight_update() and
end_weight_update()"} (resp. ..._distributed); begin twice: 400 "a weight-update session is already open;
call end_weight_update() first"; end without begin: 400 "no weight-update session is open; call
begin_weight_update() first". 0.5.20 has no session.

Updates (weight_updater, control_mixin): not paused, an update takes the model-update writer lock, so it
waits for in-flight generations; paused, it runs at once. `flush_cache` (default True) flushes after
the update: with requests running or queued, 0.5.23 fails the call (400 "Weights were updated, but the
cache was not flushed because requests are still running or queued. ...") while 0.5.20 asserts
("Cache flush failed after updating weights", a scheduler crash: 500 here). `weight_version` (default
"default", --weight-version) is kept from successful pushes and /update_weight_version (whose
abort_all_requests defaults to True: in-flight requests are aborted). Unknown names are skipped with a
warning (Qwen2/Llama `load_weights`), a shape mismatch is an assertion (500 here). Entry i of
serialized_named_tensors is TP rank i's (sglang/srt/managers/tp_worker.py `deserialize_own_rank`); the
stand-in opens entries 0..tp_size-1, loads entry 0 and records a violation when the others differ.
update_weights_from_distributed needs /init_weights_update_group first (0.5.23: 400 "Failed to receive
weights: Group g not in [...]"; 0.5.20: an assertion, 500); the tensors of a broadcast cannot reach
the stand-in, so they come from the `distributed_source` hook (in-process) or are marked "unreceived".

Memory (weight_updater release/resume_memory_occupation; sglang/srt/constants.py tags "kv_cache",
"weights", "cuda_graph"; tags None or [] = all): release asserts the scheduler idle (0.5.23 ignores
the waiting queue while paused; 0.5.20 does not): otherwise an AssertionError kills the real scheduler,
here a 500. Releasing "kv_cache" flushes the cache. Resuming a tag that is not released is a KeyError
(500). With --enable-memory-saver (torch_memory_saver, sglang/srt/utils/torch_memory_saver_adapter.py)
released memory is unmapped: the real scheduler faults on a /generate, /health, push or
get_weights_by_name that touches it (the stand-in refuses with 500 and records a violation); resumed
weights are GARBAGE unless --enable-weights-cpu-backup (load_model_utils.py `region(...,
enable_cpu_backup=...)`): the stand-in fills them with random bits (so with NaNs, as uninitialised
memory), and generations on them finish as the real sampler does on NaN logits: sampled requests draw an
out-of-vocabulary token, turned into {"type": "stop", "matched": "NaN happened"} (schedule_batch
`_check_vocab_boundary_finish`, the token replaced by a stop/EOS id); greedy ones take argmax with a
null log-prob. Without --enable-memory-saver release/resume keep the memory (a no-op adapter).
Every generation is also recorded (`StandIn.generations`, GET /_standin/state, a stand-in-only path)
with the weight version, the push epoch and whether any weight was garbage, unreceived or initial, and
whether it reused a prefix cached under older weights (`violations`).

Health (http_server health_generate): /health and /health_generate answer 503 while starting; then,
SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION being on by default, both run a one-token generation that must
be answered within SGLANG_HEALTH_CHECK_TIMEOUT (20 s; `health_check_timeout_s`): 503 while paused (the
request waits in the tokenizer manager) or when it would touch released memory; /ready is 503 while paused.

Scheduling (scheduler pause_generation/continue_generation/flush_cache, tokenizer_manager): /generate
blocks while paused. pause mode "abort" (the default of PauseGenerationReqInput) aborts every request
(finish_reason {"type": "abort", "message": "Aborted", "status_code": null, "err_type": null}) and waits
until none runs; "retract" moves running requests to the waiting queue (num_retractions + 1; they resume
after /continue_generation, under the then-current weights); "in_place" leaves them running. /flush_cache
answers 400 "Flush cache failed.\\n" (text) while requests run, or wait (0.5.20 even while paused after a
retract, 0.5.23 ignores the waiting queue when paused); ?timeout=s waits for idle ("Timed out waiting for
idle state."). `token_delay_s` slows each generated token so tests can pause mid-generation.

Answers (tokenizer_manager `_handle_batch_output`, `add_logprob_to_meta_info`, schedule_batch finish
reasons, sglang/srt/utils/weight_versions.py): {"output_ids": [...], "meta_info": {"id", "finish_reason",
"prompt_tokens", "weight_version", "num_retractions", "reasoning_tokens", "completion_tokens",
"cached_tokens", "weight_versions": [{"version", "start", "end"}], "e2e_latency", and with return_logprob
"input_token_logprobs": [], "output_token_logprobs": [[logprob, token_id, null], ...],
"output_token_logprobs_length"}} (a list for a batch; always --skip-tokenizer-init: no "text", the stop
token kept in output_ids); finish_reason {"type": "stop", "matched": id} | {"type": "length", "length": n}
| abort. Log-probs are those of sglang/srt/layers/sampler.py: log_softmax(logits / T) of the sampled
token before top-k/top-p; greedy (temperature 0 -> top_k 1) at T = 1. /server_info: the launch flags
(tp_size, ...), "version" (the package version), "launch_command", "internal_states"; 0.5.23 adds
"frontend": "python". Not modelled (501): streaming, top log-probs, input log-probs (logprob_start_len).

Generation: with `model_path` (a folder with a Hugging Face config.json, as `--model-path`) a tiny
transformers model of that family runs on the CPU (checkpoint weights when the folder has them, else a
seeded init), fed by the pushed tensors. Without one (or when the folder has no config.json) a fake model
answers: tokens derived from the prompt, `sampling_seed` and a digest of the pushed weights.

Pushed weights on the CPU (the CUDA IPC path cannot run here): `update_weights_from_tensor` with
load_format "flattened_bucket", each serialized_named_tensors entry = base64 (standard alphabet, padded)
of the bytes `torch.save` writes for
    {"kind": "liteppo-cpu-flattened-bucket-v1",              # optional; if present must be this
     "flattened_tensor": <1-D torch.uint8 CPU tensor>,         # every tensor's bytes, concatenated
     "metadata": [{"name": str, "shape": [int, ...], "dtype": "bfloat16",   # SGLang's dtype spelling
                   "start_idx": int, "end_idx": int, "numel": int}, ...]}    # byte offsets, end - start
mirroring FlattenedTensorBucket (sglang/srt/weight_sync/tensor_bucket.py: tensors viewed as uint8 and
concatenated, FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx, numel)); several dtypes may
share a bucket (`supports_multi_dtypes = True` in both versions). It is read with
torch.load(weights_only=True). A real MultiprocessingSerializer pickle is refused (500: it holds CUDA IPC
handles). `encode_cpu_bucket` below writes the format.

Misbehaviour on purpose (test knobs, not SGLang): become healthy late or never, answer /generate slowly
(`delay_s`), fail a number of times (`fail`, before parsing), override an answer (`answers`, after
parsing), or die in the middle of a request (`die_on`).

Process mode: `python -m tests.sglang_standin --model-path DIR --host H --port P [--sglang-version V]
[any sglang.launch_server flag]`; flags the model uses: --tp-size/--tp, --random-seed, --weight-version,
--enable-memory-saver, --enable-weights-cpu-backup, --disable-cuda-graph, --context-length, --dtype,
--skip-tokenizer-init; every flag is recorded in /server_info. Test-only flags: --healthy-after S,
--never-healthy, --die-on PATH, --exit-code N, --child-pid-file F, --token-delay S, --health-timeout S.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSIONS = ("0.5.20", "0.5.23")
DEFAULT_VERSION = "0.5.23"
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # sglang/srt/constants.py GPU_MEMORY_ALL_TYPES
CPU_WIRE_KIND = "liteppo-cpu-flattened-bucket-v1"
TOP_K_ALL = 1 << 30                                   # sampling_params.py TOP_K_ALL
SAMPLING_EPS = 1e-6                                   # sampling_params.py _SAMPLING_EPS

# -- messages, verbatim from the wheels ------------------------------------------------------------
MSG_SESSION_TENSOR = ("update_weights_from_tensor must run between begin_weight_update() and "
                      "end_weight_update()")
MSG_SESSION_DIST = ("update_weights_from_distributed must run between begin_weight_update() and "
                    "end_weight_update()")
MSG_SESSION_OPEN = "a weight-update session is already open; call end_weight_update() first"
MSG_SESSION_NONE = "no weight-update session is open; call begin_weight_update() first"
MSG_FLUSH_AFTER_UPDATE = ("Weights were updated, but the cache was not flushed because requests are still "
                          "running or queued. Retract or finish them, then call /flush_cache.")
MSG_FLUSH_OK = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                "waiting requests, the operation will not be performed.)\n")
MSG_FLUSH_FAILED = "Flush cache failed.\n"
MSG_RELEASE_BUSY = "release_memory_occupation should be called only when server is idle."
MSG_WEIGHT_VERSION_GONE = ("Endpoint '/get_weight_version' or '/weight_version' is deprecated. Please use "
                           "'/model_info' instead.")


def _behaviour_of(version: str) -> str:
    """The modelled version whose behaviour a reported version gets: 0.5.20 and 0.5.23 are read from
    their wheels; any other version string is reported as given (to test a client's version check) and
    behaves as 0.5.20 below 0.5.21, else as 0.5.23 (liteppo_mcore/rollout/sglang/version.py dates the
    weight-update session to 0.5.21; the stand-in has not read 0.5.21 or 0.5.22)."""
    if version in VERSIONS:
        return version
    digits = [int(x) for x in re.findall(r"\d+", str(version))[:3]] + [0, 0, 0]
    return "0.5.20" if tuple(digits[:3]) < (0, 5, 21) else "0.5.23"


class HTTPAnswer(Exception):
    """An answer other than the handler's normal one (errors, mostly)."""

    def __init__(self, status: int, body: Any, text: bool = False):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body, self.text = status, body, text


def _error_response(status: int, message: str) -> HTTPAnswer:
    """http_server `_create_error_response`: {"error": {"message": ...}}."""
    return HTTPAnswer(status, {"error": {"message": message}})


def _crash(message: str) -> HTTPAnswer:
    """What kills the real scheduler (an uncaught assertion, a CUDA fault): a 500 here."""
    return HTTPAnswer(500, {"error": {"message": f"stand-in: the real SGLang server would crash here: {message}"}})


# ==================================================================================================
# Request validation: pydantic (lax mode) over the msgspec structs of io_struct
# ==================================================================================================
REQUIRED = object()
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _perr(kind: str, loc: tuple[Any, ...], msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ("body",) + tuple(loc), "msg": msg, "input": value}


def _check(spec: Any, value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
    """One value against a type spec, pydantic's lax conversions; errors appended, the value returned."""
    if isinstance(spec, tuple):
        head = spec[0]
        if head == "opt":
            return None if value is None else _check(spec[1], value, loc, errors)
        if head == "list":
            if not isinstance(value, list):
                errors.append(_perr("list_type", loc, "Input should be a valid list", value))
                return value
            return [_check(spec[1], v, loc + (i,), errors) for i, v in enumerate(value)]
        if head == "dict":
            if not isinstance(value, dict):
                errors.append(_perr("dict_type", loc, "Input should be a valid dictionary", value))
                return value
            return {k: _check(spec[2], v, loc + (k,), errors) for k, v in value.items()}
        if head == "literal":
            if value not in spec[1]:
                expected = " or ".join(", ".join(repr(v) for v in spec[1]).rsplit(", ", 1))
                errors.append(_perr("literal_error", loc, f"Input should be {expected}", value))
            return value
        if head == "union":
            for member in spec[1:]:
                trial: list[dict[str, Any]] = []
                out = _check(member, value, loc, trial)
                if not trial:
                    return out
            errors.append(_perr("union_error", loc, f"Input matches none of {spec[1:]}", value))
            return value
        raise ValueError(f"bad spec {spec!r}")
    if spec == "any":
        return value
    if spec == "str":
        if not isinstance(value, str):
            errors.append(_perr("string_type", loc, "Input should be a valid string", value))
        return value
    if spec == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, float) and value in (0.0, 1.0):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        errors.append(_perr("bool_parsing" if isinstance(value, str) else "bool_type", loc,
                            "Input should be a valid boolean", value))
        return value
    if spec == "int":
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            errors.append(_perr("int_from_float", loc,
                                "Input should be a valid integer, got a number with a fractional part", value))
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            errors.append(_perr("int_parsing", loc, "Input should be a valid integer, unable to parse string "
                                "as an integer", value))
            return value
        errors.append(_perr("int_type", loc, "Input should be a valid integer", value))
        return value
    if spec == "float":
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        errors.append(_perr("float_type", loc, "Input should be a valid number", value))
        return value
    if spec == "b64bytes":  # msgspec_utils.Base64Bytes, then pydantic bytes
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                errors.append(_perr("value_error", loc, "Value error, Expected base64-encoded bytes", value))
                return value
        if not isinstance(value, bytes):
            errors.append(_perr("bytes_type", loc, "Input should be a valid bytes", value))
        return value
    raise ValueError(f"bad spec {spec!r}")


_BASE = {"rid": (("opt", "str"), None), "http_worker_ipc": (("opt", "str"), None)}  # io_struct BaseReq
_SELECTOR = (("literal", ("target", "draft", "all")), "all")


def _req_schemas(version: str) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Fields of the *ReqInput structs (io_struct) each modelled endpoint parses its body into."""
    old = version == "0.5.20"
    tensor = {"serialized_named_tensors": (("list", "b64bytes"), REQUIRED), "load_format": (("opt", "str"), None),
              "flush_cache": ("bool", True), "abort_all_requests": ("bool", False),
              "weight_version": (("opt", "str"), None), "torch_empty_cache": ("bool", False)}
    tensor.update({"disable_draft_model": (("opt", "bool"), None)} if old else {"selector": _SELECTOR})
    dist = {"names": (("list", "str"), REQUIRED), "dtypes": (("list", "str"), REQUIRED),
            "shapes": (("list", ("list", "int")), REQUIRED), "group_name": ("str", "weight_update_group"),
            "flush_cache": ("bool", True), "abort_all_requests": ("bool", False),
            "weight_version": (("opt", "str"), None), "load_format": (("opt", "str"), None),
            "torch_empty_cache": ("bool", False)}
    if not old:
        dist["selector"] = _SELECTOR
    schemas = {
        "/pause_generation": {"mode": (("literal", ("abort", "retract", "in_place")), "abort")},
        "/continue_generation": {"torch_empty_cache": ("bool", True)},
        "/update_weights_from_tensor": tensor,
        "/update_weights_from_distributed": dist,
        "/init_weights_update_group": {"master_address": ("str", REQUIRED), "master_port": ("int", REQUIRED),
                                       "rank_offset": ("int", REQUIRED), "world_size": ("int", REQUIRED),
                                       "group_name": ("str", "weight_update_group"), "backend": ("str", "nccl")},
        "/destroy_weights_update_group": {"group_name": ("str", "weight_update_group")},
        "/update_weight_version": {"new_version": ("str", REQUIRED), "abort_all_requests": ("bool", True)},
        "/get_weights_by_name": {"name": ("str", REQUIRED), "truncate_size": ("int", 100)},
        "/release_memory_occupation": {"tags": (("opt", ("list", "str")), None)},
        "/resume_memory_occupation": {"tags": (("opt", ("list", "str")), None)},
        "/abort_request": {"abort_all": ("bool", False), "finished_reason": (("opt", ("dict", "str", "any")), None),
                           "abort_message": (("opt", "str"), None), "weight_versions": ("any", None)},
    }
    if not old:
        schemas["/begin_weight_update"] = {"selector": _SELECTOR}
        schemas["/end_weight_update"] = {}
    return {path: {**_BASE, **fields} for path, fields in schemas.items()}


def _validation_error(errors: list[dict[str, Any]]) -> HTTPAnswer:
    """http_server's RequestValidationError handler: FastAPI's 422 as a 400 ErrorResponse."""
    return HTTPAnswer(400, {"object": "error", "message": str(errors), "type": "Bad Request", "param": None,
                            "code": 400})


def validate_body(fields: dict[str, tuple[Any, Any]], body: Any, present: bool) -> dict[str, Any]:
    """The body as the struct pydantic builds (defaults filled, unknown keys dropped), or a 400."""
    if not present:
        raise _validation_error([_perr("missing", (), "Field required", None)])
    if not isinstance(body, dict):
        raise _validation_error([_perr("dict_type", (), "Input should be a valid dictionary", body)])
    errors: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    for name, (spec, default) in fields.items():
        if name in body:
            out[name] = _check(spec, body[name], (name,), errors)
        elif default is REQUIRED:
            errors.append(_perr("missing", (name,), "Field required", body))
        else:
            out[name] = default
    if errors:
        raise _validation_error(errors)
    return out


# -- /generate: the GenerateReqInput dataclass (io_struct), the 0.5.23 contract (api_types) ---------
_GEN_FIELDS: dict[str, Any] = {  # the fields whose types matter here; the others are accepted as they are
    "rid": ("opt", ("union", "str", ("list", "str"))),
    "text": ("opt", ("union", ("list", "str"), "str")),
    "sampling_params": ("opt", ("union", ("list", ("dict", "str", "any")), ("dict", "str", "any"))),
    "return_logprob": ("opt", ("union", ("list", "bool"), "bool")),
    "logprob_start_len": ("opt", ("union", ("list", "int"), "int")),
    "top_logprobs_num": ("opt", ("union", ("list", "int"), "int")),
    "return_text_in_logprobs": "bool", "stream": "bool", "log_metrics": "bool",
    "return_prompt_token_ids": "bool", "priority": ("opt", "int"),
}


def _check_list_i64(value: Any) -> str | None:
    """field_validators.validate_list_i64_1d."""
    if not isinstance(value, list):
        return f"must be list; got {type(value).__name__}"
    if not value:
        return None
    if not isinstance(value[0], int):
        return f"elements must be int; got {type(value[0]).__name__}"
    for x in value:
        if not isinstance(x, int):
            return f"contains non-int64 element: an integer is required (got type {type(x).__name__})"
        if not -2**63 <= x < 2**63:
            return "contains non-int64 element: signed integer is greater than maximum"
    return None


def _check_input_ids(value: Any) -> str | None:
    """field_validators.validate_optional_list_i64_1d_2d (a PlainValidator): the error, or None."""
    if value is None:
        return None
    if not isinstance(value, list):
        return f"must be list or null; got {type(value).__name__}"
    if not value:
        return None
    if isinstance(value[0], int):
        return _check_list_i64(value)
    if isinstance(value[0], list):
        for i, row in enumerate(value):
            problem = _check_list_i64(row)
            if problem:
                return f"row {i}: {problem}"
        return None
    return f"elements must be int or list; got {type(value[0]).__name__}"


def validate_generate_dataclass(body: Any, present: bool) -> dict[str, Any]:
    if not present:
        raise _validation_error([_perr("missing", (), "Field required", None)])
    if not isinstance(body, dict):
        raise _validation_error([_perr("dataclass_type", (), "Input should be a dictionary or an instance "
                                       "of GenerateReqInput", body)])
    errors: list[dict[str, Any]] = []
    out = dict(body)
    for name, spec in _GEN_FIELDS.items():
        if name in body:
            out[name] = _check(spec, body[name], (name,), errors)
    problem = _check_input_ids(body.get("input_ids"))
    if problem:
        errors.append(_perr("value_error", ("input_ids",), f"Value error, {problem}", body.get("input_ids")))
    if errors:
        raise _validation_error(errors)
    return out


# sglang/api/v1/api_types.py (0.5.23): serde-style texts of the JSON contract
_API_SAMPLING_FIELDS = ("max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p",
                        "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                        "min_new_tokens", "n", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos",
                        "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                        "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
                        "watermark", "choice")
_API_SAMPLING_KINDS = {"max_new_tokens": "i64", "stop": "str_or_list", "stop_token_ids": "i64_list",
                       "stop_regex": "str_or_list", "min_new_tokens": "i64", "n": "i64", "top_k": "i64",
                       "stream_interval": "i64", "sampling_seed": "i64", "beam_width": "i64",
                       "json_schema": "str", "regex": "str", "ebnf": "str", "structural_tag": "str",
                       "ignore_eos": "bool", "skip_special_tokens": "bool", "no_stop_trim": "bool",
                       "spaces_between_special_tokens": "bool", "logit_bias": "map_f64", "custom_params": "any",
                       "watermark": "watermark", "choice": "str_list"}
_API_GENERATE_KINDS = {"rid": "str_or_list", "text": "str_or_list", "input_ids": "ids_or_list", "stream": "bool",
                       "sampling_params": "sp_or_list", "return_logprob": "bool_or_list",
                       "logprob_start_len": "i64_or_list", "top_logprobs_num": "i64_or_list",
                       "token_ids_logprob": "ids_or_list", "return_hidden_states": "bool_or_list",
                       "return_text_in_logprobs": "bool", "routed_dp_rank": "i64", "disagg_prefill_dp_rank": "i64",
                       "extra_key": "str_or_list", "priority": "i64", "cache_salt": "str_or_list",
                       "require_reasoning": "bool", "routing_key": "str", "max_thinking_tokens": "u64",
                       "session_id": "str", "custom_labels": "map_str", "return_sampling_mask": "bool_or_list",
                       "return_prompt_token_ids": "bool!", "routed_experts_start_len": "i64!"}


class ContractError(ValueError):
    pass


def _unexpected(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    return "sequence" if isinstance(v, list) else "map" if isinstance(v, dict) else type(v).__name__


def _invalid(v: Any, expected: str) -> ContractError:
    return ContractError(f"invalid type: {_unexpected(v)}, expected {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _contract(kind: str, x: Any) -> None:
    """One value of the generated decoders (decode_GenerateRequest, decode_SamplingParams, ...)."""
    if kind.endswith("!"):
        kind = kind[:-1]
    elif x is None or kind == "any":
        return
    if kind == "i64" and not _is_int(x):
        raise _invalid(x, "i64")
    if kind == "u64":
        if not _is_int(x):
            raise _invalid(x, "u64")
        if x < 0:
            raise ContractError(f"invalid value: integer `{x}`, expected u64")
    if kind == "f64" and not (isinstance(x, (int, float)) and not isinstance(x, bool)):
        raise _invalid(x, "f64")
    if kind == "bool" and not isinstance(x, bool):
        raise _invalid(x, "a boolean")
    if kind == "str" and not isinstance(x, str):
        raise _invalid(x, "a string")
    if kind in ("str_or_list", "str_list"):
        if isinstance(x, list):
            for e in x:
                if not isinstance(e, str):
                    raise _invalid(e, "a string")
        elif kind == "str_list":
            raise _invalid(x, "a sequence")
        elif not isinstance(x, str):
            raise _invalid(x, "a value or an array of values for StringOrList")
    if kind == "i64_list":
        if not isinstance(x, list):
            raise _invalid(x, "a sequence")
        for e in x:
            if not _is_int(e):
                raise _invalid(e, "i64")
    if kind in ("bool_or_list", "i64_or_list"):
        elem, name = ("a boolean", "BoolOrList") if kind == "bool_or_list" else ("i64", "Int64OrList")
        ok = (lambda e: isinstance(e, bool)) if kind == "bool_or_list" else _is_int
        if isinstance(x, list):
            for e in x:
                if not ok(e):
                    raise _invalid(e, elem)
        elif not ok(x):
            raise _invalid(x, f"a value or an array of values for {name}")
    if kind == "ids_or_list":
        if not isinstance(x, list):
            raise _invalid(x, "a value or an array of values for TokenIdsOrList")
        rows = [x] if not x or (isinstance(x[0], (int, float)) and not isinstance(x[0], bool)) else x
        for row in rows:
            if not isinstance(row, list):
                raise _invalid(row, "a sequence")
            for e in row:
                if not _is_int(e):
                    raise _invalid(e, "i64")
    if kind in ("map_f64", "map_str"):
        if not isinstance(x, dict):
            raise _invalid(x, "a map")
        for e in x.values():
            _contract("f64" if kind == "map_f64" else "str", e)
            if e is None:
                raise _invalid(e, "f64" if kind == "map_f64" else "a string")
    if kind == "watermark":
        if not isinstance(x, dict):
            raise _invalid(x, "struct WatermarkRequestConfig")
        fields = ("enabled", "key", "context_window")
        for key, e in x.items():
            if key not in fields:
                raise _unknown_field(key, fields)
            _contract({"enabled": "bool", "key": "str", "context_window": "i64"}[key], e)
    if kind == "sp_or_list":
        for sp in (x if isinstance(x, list) else [x]):
            if not isinstance(sp, dict):
                raise _invalid(sp, "struct SamplingParams")
            for key, e in sp.items():
                if key not in _API_SAMPLING_FIELDS:
                    raise _unknown_field(key, _API_SAMPLING_FIELDS)
                _contract(_API_SAMPLING_KINDS.get(key, "f64"), e)


def _unknown_field(key: str, fields: Sequence[str]) -> ContractError:
    listed = ", ".join(f"`{f}`" for f in fields)
    return ContractError(f"unknown field `{key}`, expected one of {listed}")


def generate_contract_error(body: Any) -> str | None:
    """sglang/srt/entrypoints/api_contract.py (0.5.23): the contract violation of a /generate body, or None.
    GenerateRequest ignores unknown keys; SamplingParams rejects them."""
    if not isinstance(body, dict):
        return str(_invalid(body, "struct GenerateRequest"))
    try:
        for key, x in body.items():
            kind = _API_GENERATE_KINDS.get(key)
            if kind is not None:
                _contract(kind, x)
    except ContractError as exc:
        return str(exc)
    return None


# srt SamplingParams (sglang/srt/sampling/sampling_params.py): constructor keywords per version
_SRT_SAMPLING_FIELDS = ("max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
                        "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
                        "n", "beam_width", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos",
                        "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                        "stream_interval", "logit_bias", "sampling_seed", "custom_params", "stop_strs",
                        "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len", "is_normalized",
                        "ebnf_full_assistant")
_SRT_NUMERIC = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                "presence_penalty", "repetition_penalty", "min_new_tokens", "n")


def srt_sampling_params(raw: dict[str, Any], version: str, vocab_size: int | None) -> dict[str, Any]:
    """SamplingParams(**kwargs), __post_init__ and verify(): the normalized parameters, a 500 for what
    raises TypeError (uncaught by http_server's generate handler), a 400 for verify's ValueErrors."""
    allowed = _SRT_SAMPLING_FIELDS + (("watermark",) if version != "0.5.20" else ())
    for key in raw:
        if key not in allowed:  # msgspec Struct.__init__
            raise HTTPAnswer(500, "Internal Server Error", text=True)
    for key in _SRT_NUMERIC:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise HTTPAnswer(500, "Internal Server Error", text=True)  # a TypeError in __post_init__/verify
    sp = {"max_new_tokens": 128, "stop_token_ids": None, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
          "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
          "min_new_tokens": 0, "n": 1, "ignore_eos": False, "no_stop_trim": False, "logit_bias": None,
          "sampling_seed": None, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
          "beam_width": None}
    sp.update({k: v for k, v in raw.items() if v is not None or k in ("max_new_tokens", "sampling_seed")})
    if "max_new_tokens" not in raw:
        sp["max_new_tokens"] = 128
    stops = raw.get("stop_token_ids")
    sp["stop_token_ids"] = [int(t) for t in dict.fromkeys(t for t in stops if t is not None)] if stops else None
    if 0 <= sp["temperature"] < SAMPLING_EPS:  # __post_init__: greedy
        sp["temperature"], sp["top_k"] = 1.0, 1
    if sp["top_k"] == -1:
        sp["top_k"] = TOP_K_ALL
    problem = None
    if sp["beam_width"] is not None and sp["beam_width"] < 1:
        problem = f"beam_width must be at least 1, got {sp['beam_width']}."
    elif not math.isfinite(sp["temperature"]) or sp["temperature"] < 0.0:
        problem = f"temperature must be a non-negative finite number, got {sp['temperature']}."
    elif not 0.0 < sp["top_p"] <= 1.0:
        problem = f"top_p must be in (0, 1], got {sp['top_p']}."
    elif not 0.0 <= sp["min_p"] <= 1.0:
        problem = f"min_p must be in [0, 1], got {sp['min_p']}."
    elif sp["top_k"] < 1 or sp["top_k"] == -1:
        problem = f"top_k must be -1 (disable) or at least 1, got {sp['top_k']}."
    elif not -2.0 <= sp["frequency_penalty"] <= 2.0:
        problem = f"frequency_penalty must be in [-2, 2], got {sp['frequency_penalty']}."
    elif not -2.0 <= sp["presence_penalty"] <= 2.0:
        problem = f"presence_penalty must be in [-2, 2], got {sp['presence_penalty']}."
    elif not 0.0 < sp["repetition_penalty"] <= 2.0:
        problem = f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {sp['repetition_penalty']}."
    elif not 0 <= sp["min_new_tokens"]:
        problem = f"min_new_tokens must be in [0, max_new_tokens], got {sp['min_new_tokens']}."
    elif sp["max_new_tokens"] is not None and sp["max_new_tokens"] < 0:
        problem = f"max_new_tokens must be at least 0, got {sp['max_new_tokens']}."
    elif sp["max_new_tokens"] is not None and not sp["min_new_tokens"] <= sp["max_new_tokens"]:
        problem = (f"min_new_tokens must be in [0, max_new_tokens({sp['max_new_tokens']})], got "
                   f"{sp['min_new_tokens']}.")
    elif sp["logit_bias"] is not None and vocab_size is not None and any(
            not 0 <= int(t) < vocab_size for t in sp["logit_bias"]):
        problem = f"logit_bias must has keys in [0, {vocab_size - 1}]."
    elif sp["sampling_seed"] is not None and version != "0.5.20" and not isinstance(sp["sampling_seed"], int):
        problem = f"sampling_seed must be an integer, got {type(sp['sampling_seed']).__name__}."
    elif sum(sp[k] is not None for k in ("json_schema", "regex", "ebnf", "structural_tag")) > 1:
        problem = "Only one of json_schema, regex, ebnf, or structural_tag can be set."
    if problem:
        raise _error_response(400, problem)
    return sp


# ==================================================================================================
# The CPU wire format of pushed weights (see the module docstring)
# ==================================================================================================
def encode_cpu_bucket(named_tensors: Sequence[tuple[str, Any]], *, kind: str | None = CPU_WIRE_KIND) -> str:
    """The wire string of one bucket (any mix of dtypes): what each serialized_named_tensors entry holds.
    The client's own encoder (liteppo_mcore/rollout/sglang/cpu_wire.py); `kind=None` leaves the marker out."""
    import io

    import torch

    from liteppo_mcore.rollout.sglang.cpu_wire import flatten_bucket

    payload = flatten_bucket(list(named_tensors))
    if kind is None:
        payload.pop("kind")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_cpu_payload(data: bytes, load_format: str | None) -> list[tuple[str, Any]]:
    """Raw bytes of one entry (already base64-decoded by the HTTP layer) -> (name, tensor) pairs, as
    weight_updater `_update_weights_from_flattened_bucket` / FlattenedTensorBucket.reconstruct_tensors."""
    import io

    import torch

    if len(data) >= 2 and data[0] == 0x80:
        raise _crash("this entry is a MultiprocessingSerializer pickle (CUDA IPC handles), which the CPU "
                     "stand-in cannot open; send the CPU wire format (tests/sglang_standin.py docstring)")
    if data[:2] != b"PK":  # sglang/srt/utils/common.py normalize_serialized_named_tensor_payload: b64 again
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            pass
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the real deserializer raises in the scheduler
        raise _crash(f"cannot deserialize serialized_named_tensors entry: {type(exc).__name__}: {exc}") from exc
    if load_format == "flattened_bucket":
        if not isinstance(payload, dict) or "flattened_tensor" not in payload or "metadata" not in payload:
            raise _crash("load_format flattened_bucket needs {'flattened_tensor', 'metadata'}, got "
                         f"{type(payload).__name__}")
        if "kind" in payload and payload["kind"] != CPU_WIRE_KIND:
            raise _crash(f"unknown CPU wire kind {payload['kind']!r} (expected {CPU_WIRE_KIND!r})")
        flat = payload["flattened_tensor"]
        if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
            raise _crash("flattened_tensor must be a 1-D uint8 tensor (tensor_bucket.py views every tensor "
                         "as uint8)")
        out = []
        for meta in payload["metadata"]:
            get = (lambda k, meta=meta: meta[k]) if isinstance(meta, dict) else (lambda k, meta=meta: getattr(meta, k))
            dtype = get("dtype")
            dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
            try:
                tensor = flat[get("start_idx"):get("end_idx")].view(dtype).reshape(tuple(get("shape")))
            except RuntimeError as exc:
                raise _crash(f"reconstructing {get('name')}: {exc}") from exc
            out.append((get("name"), tensor))
        return out
    if load_format in (None, "direct"):
        if isinstance(payload, dict) and "flattened_tensor" in payload:
            raise _crash(f"load_format {load_format!r} got a flattened bucket; send load_format "
                         "'flattened_bucket'")
        if not isinstance(payload, (list, tuple)):
            raise _crash(f"load_format {load_format!r} needs a list of (name, tensor)")
        return [(str(n), t) for n, t in payload]
    raise _crash(f"NotImplementedError: Unknown load_format={load_format}")


# ==================================================================================================
# Models: a tiny transformers model from a config.json, or a fake one
# ==================================================================================================
class _FakeModel:
    """No model: tokens from the prompt, the seed and a digest of the pushed weights (0 before any)."""

    vocab_size = None
    eos_token_ids: tuple[int, ...] = ()
    architecture = None
    context_len = 32768

    def __init__(self, response_len: int, weights: dict[str, Any]):
        self.response_len = response_len
        self.tensors: dict[str, Any] = {}
        self.values = dict(weights)   # /get_weights_by_name answers (legacy knob)
        self.digest = 0
        self.garbage = False

    def param_names(self) -> list[str]:
        return list(self.tensors) or list(self.values)

    def load(self, named: Sequence[tuple[str, Any]]) -> list[str]:
        for name, tensor in named:
            self.tensors[name] = tensor.detach().clone()
            self.values[name] = tensor.detach().float().tolist()
        total = sum(float(t.float().sum()) for t in self.tensors.values())
        self.digest = 0 if not math.isfinite(total) else int(abs(total) * 1000) % 97
        self.garbage = False
        return []

    def scramble(self) -> None:
        self.garbage = True

    def weights_by_name(self, name: str, truncate: int) -> list | None:
        value = self.values.get(name)
        return None if value is None else value[:truncate]

    def next_token(self, req: _Req) -> tuple[int, float | None]:
        k = len(req.out)
        if self.garbage:
            return -1, None
        base = (sum(req.prompt) + int(req.sp.get("sampling_seed") or 0) + self.digest) % 97 + 100
        stops = req.sp["stop_token_ids"] or []
        token = stops[0] if k >= self.response_len and stops else base + k
        return token, -0.25 * (k + 1)


class _TorchModel:
    """A transformers causal LM of the family and shape of `model_path/config.json`, on the CPU."""

    def __init__(self, model_path: str, dtype: str, seed: int, context_length: int | None):
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(model_path)
        if dtype in ("auto", None):
            torch_dtype = getattr(config, "dtype", None) or torch.float32
            torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        else:
            torch_dtype = {"half": torch.float16, "float": torch.float32}.get(dtype) or getattr(torch, dtype)
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(model_path))
        torch.manual_seed(seed)
        if has_weights:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        else:
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        self.model.eval().requires_grad_(False)
        self.config = config
        self.architecture = (getattr(config, "architectures", None) or [None])[0]
        self.vocab_size = int(config.vocab_size)
        eos = getattr(config, "eos_token_id", None)
        try:
            generation = transformers.GenerationConfig.from_pretrained(model_path)
            eos = generation.eos_token_id if generation.eos_token_id is not None else eos
        except Exception:  # noqa: BLE001 - no generation_config.json
            pass
        self.eos_token_ids = tuple(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.context_len = int(context_length or getattr(config, "max_position_embeddings", 32768))
        self.params = dict(self.model.named_parameters())
        self.garbage = False

    def param_names(self) -> list[str]:
        return list(self.params)

    def load(self, named: Sequence[tuple[str, Any]]) -> list[str]:
        """Qwen2ForCausalLM/LlamaForCausalLM `load_weights` (sglang/srt/models/qwen2.py, llama.py): unknown
        names skipped with a warning, rotary buffers skipped, shapes asserted (default_weight_loader)."""
        import torch

        skipped = []
        with torch.no_grad():
            for name, tensor in named:
                if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
                    continue
                param = self.params.get(name)
                if param is None:
                    skipped.append(name)
                    continue
                if tuple(param.shape) != tuple(tensor.shape):
                    raise _crash(f"AssertionError: Attempted to load weight ({tuple(tensor.shape)}) into "
                                 f"parameter ({tuple(param.shape)}) for {name}")
                param.copy_(tensor)
        return skipped

    def scramble(self) -> None:
        """Released weights resumed without a CPU backup: whatever the fresh pages hold (random bits)."""
        import torch

        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for param in self.params.values():
                bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[param.element_size()]
                info = torch.iinfo(bits)
                noise = torch.randint(info.min, info.max, param.shape, generator=generator, dtype=torch.int64)
                param.view(bits).copy_(noise.to(bits))
        self.garbage = True

    def weights_by_name(self, name: str, truncate: int) -> list | None:
        """LlamaForCausalLM.get_weights_by_name (sglang/srt/models/llama.py); Qwen2/Qwen3 have none, so
        weight_exporter.get_weights_by_name returns None (400 "Get parameter by name failed")."""
        if self.architecture not in ("LlamaForCausalLM",):
            return None
        if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            name = "model.embed_tokens.weight"
        param = self.params.get(name)
        if param is None:
            return None
        return param.detach().float().tolist()[:truncate]

    def next_token(self, req: _Req) -> tuple[int, float | None]:
        """One step of sglang/srt/layers/sampler.py on this model's logits."""
        import torch

        sp = req.sp
        with torch.no_grad():
            ids = torch.tensor([req.prompt + req.out], dtype=torch.long)
            logits = self.model(input_ids=ids).logits[0, -1].float().clone()
        if os.environ.get("SGLANG_SANITIZE_NAN_LOGITS", "") not in ("", "0", "false"):
            torch.nan_to_num_(logits, nan=-1e30, posinf=1e30, neginf=-1e30)
        if sp["logit_bias"]:
            for token, bias in sp["logit_bias"].items():
                logits[int(token)] += float(bias)
        if req.out and (sp["frequency_penalty"] or sp["presence_penalty"] or sp["repetition_penalty"] != 1.0):
            seen = torch.tensor(req.out, dtype=torch.long)
            counts = torch.bincount(seen, minlength=logits.numel()).float()
            logits -= sp["frequency_penalty"] * counts + sp["presence_penalty"] * (counts > 0).float()
            if sp["repetition_penalty"] != 1.0:
                hit = counts > 0
                logits[hit] = torch.where(logits[hit] > 0, logits[hit] / sp["repetition_penalty"],
                                          logits[hit] * sp["repetition_penalty"])
        if len(req.out) < sp["min_new_tokens"]:  # min_new_tokens penalizer: no stop before the minimum
            for token in list(sp["stop_token_ids"] or []) + list(self.eos_token_ids):
                if 0 <= token < logits.numel():
                    logits[token] = float("-inf")
        if sp["top_k"] == 1:  # greedy: argmax, log-prob at temperature 1
            token = int(torch.argmax(logits))
            value = float(torch.log_softmax(logits, dim=-1)[token])
            return token, (value if math.isfinite(value) else None)
        scaled = logits / sp["temperature"]
        logprobs = torch.log_softmax(scaled, dim=-1).clamp(min=torch.finfo(torch.float32).min)
        probs = torch.softmax(scaled, dim=-1)
        if torch.isnan(probs).any():  # undefined in the sampling kernels: an out-of-vocabulary id
            return self.vocab_size, None
        if sp["top_k"] < probs.numel():
            kth = torch.topk(probs, sp["top_k"]).values[-1]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        if sp["top_p"] < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = (cumulative - sorted_probs) > sp["top_p"] * cumulative[-1]
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        if sp["min_p"] > 0.0:
            probs = torch.where(probs >= sp["min_p"] * probs.max(), probs, torch.zeros_like(probs))
        token = int(torch.multinomial(probs / probs.sum(), 1, generator=req.generator))
        return token, float(logprobs[token])


# ==================================================================================================
# The server's state
# ==================================================================================================
class _Req:
    def __init__(self, rid: str, prompt: list[int], sp: dict[str, Any], return_logprob: bool, generator: Any):
        self.rid, self.prompt, self.sp, self.return_logprob = rid, prompt, sp, return_logprob
        self.generator = generator
        self.out: list[int] = []
        self.logprobs: list[float | None] = []
        self.finish: dict[str, Any] | None = None
        self.retractions = 0
        self.cached_tokens = 0
        self.version_events: list[tuple[str, int]] = []  # weight_versions.py WeightVersionEvent
        self.started = time.monotonic()


class StandIn:
    """The server's behaviour and its record of calls (see the module docstring)."""

    def __init__(self, *, healthy_after_s: float = 0.0, never_healthy: bool = False, delay_s: float = 0.0,
                 fail: dict[str, tuple[int, int]] | None = None, die_on: str | None = None,
                 exit_code: int | None = None, version: str = DEFAULT_VERSION, tp_size: int = 1,
                 answers: dict[str, Any] | None = None, weights: dict[str, list[float]] | None = None,
                 response_len: int = 3, model_path: str | None = None, enable_memory_saver: bool = False,
                 enable_weights_cpu_backup: bool = False, weight_version: str = "default",
                 disable_cuda_graph: bool = False, random_seed: int = 0, dtype: str = "auto",
                 context_length: int | None = None, token_delay_s: float = 0.0,
                 health_check_timeout_s: float | None = None,
                 distributed_source: Callable[[list[str], list[str], list[list[int]]], list[Any]] | None = None,
                 server_args: dict[str, Any] | None = None, launch_command: str | None = None):
        self.behaves_as = _behaviour_of(version)
        self.started = time.monotonic()
        self.startup_time = time.time()
        self.healthy_after_s, self.never_healthy = healthy_after_s, never_healthy
        self.delay_s = delay_s                  # slow answers to /generate
        self.fail = dict(fail or {})            # path -> (HTTP status, how many times)
        self.die_on = die_on                    # path on which the server dies mid-request
        self.exit_code = exit_code              # script mode: die with os._exit(exit_code)
        self.version, self.tp_size = str(version), int(tp_size)  # the version reported in /server_info
        self.answers = dict(answers or {})      # path -> JSON answer overriding the default
        self.enable_memory_saver = enable_memory_saver
        self.enable_weights_cpu_backup = enable_weights_cpu_backup
        self.disable_cuda_graph = disable_cuda_graph
        self.random_seed = random_seed
        self.token_delay_s = token_delay_s
        env_timeout = os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT")
        self.health_check_timeout_s = (health_check_timeout_s if health_check_timeout_s is not None
                                       else float(env_timeout) if env_timeout else 20.0)
        self.distributed_source = distributed_source
        self.model_path = model_path
        self.model: Any = None
        if model_path and os.path.isfile(os.path.join(model_path, "config.json")):
            self.model = _TorchModel(model_path, dtype, random_seed, context_length)
        else:
            self.model = _FakeModel(response_len, weights or {})
            if context_length:
                self.model.context_len = int(context_length)
        self.schemas = _req_schemas(self.behaves_as)
        self.server_args = {"model_path": model_path, "tokenizer_path": model_path, "host": "127.0.0.1",
                            "port": None, "tp_size": self.tp_size, "dp_size": 1, "pp_size": 1,
                            "random_seed": random_seed, "skip_tokenizer_init": True,
                            "enable_memory_saver": enable_memory_saver,
                            "enable_weights_cpu_backup": enable_weights_cpu_backup,
                            "disable_cuda_graph": disable_cuda_graph, "weight_version": weight_version,
                            "context_length": context_length, "dtype": dtype, "load_format": "auto",
                            **dict(server_args or {})}
        self.launch_command = launch_command or "python -m sglang.launch_server"
        # -- record
        self.calls: list[tuple[str, Any]] = []
        self.events: list[dict[str, Any]] = []       # what happened (warnings, pushes, releases, ...)
        self.state_file: str | None = None         # process mode: state() written here after each event
        self.weights_released_unpushed = False        # weights released (or resumed) and not pushed since
        self.violations: list[dict[str, Any]] = []   # what the real server would do wrong or crash on
        self.generations: list[dict[str, Any]] = []  # one record per finished request
        # -- state
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.model_lock = threading.Lock()
        self.tm_paused = False          # tokenizer_manager.is_pause
        self.engine_paused = False      # scheduler._engine_paused
        self.pause_mode: str | None = None
        self.running: list[_Req] = []
        self.waiting: list[_Req] = []
        self.readers = 0                # model_update_lock readers (requests in flight)
        self.stepping = 0               # generation steps being computed right now
        self.writers = 0
        self.session: dict[str, Any] | None = None  # 0.5.23 weight-update session
        self.offload_tags: set = set()
        self.stash_garbage = False      # released weights will come back as garbage
        self.groups: dict[str, dict[str, Any]] = {}
        self.tm_weight_version = weight_version     # tokenizer manager's (meta_info, /model_info)
        self.sched_weight_version = weight_version  # scheduler's (weight_versions spans)
        self.epoch = 0                  # bumps at every change of the weights' content
        self.param_state = {name: "initial" for name in self.model.param_names()}
        self.tree_cache: list[tuple[tuple[int, ...], int]] = []  # (tokens, epoch) prefix-cache entries
        self.flush_pending = False
        self.httpd: ThreadingHTTPServer | None = None
        self._seed_counter = 0

    # -- lifecycle (thread mode) -------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        standin = self

        class Handler(_Handler):
            state = standin

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.server_args.update(host=host, port=self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://{host}:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        if self.httpd is not None:
            httpd, self.httpd = self.httpd, None
            httpd.shutdown()
            httpd.server_close()
        with self.cond:
            for req in self.running + self.waiting:
                req.finish = req.finish or _abort_reason()
            self.cond.notify_all()

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.calls]

    def payloads(self, path: str) -> list[Any]:
        with self.lock:
            return [payload for p, payload in self.calls if p == path]

    def state(self) -> dict[str, Any]:
        """A JSON snapshot of the state and the records (also GET /_standin/state)."""
        with self.lock:
            counts: dict[str, int] = {}
            for value in self.param_state.values():
                counts[value] = counts.get(value, 0) + 1
            return {"version": self.version, "behaves_as": self.behaves_as, "paused": self.tm_paused,
                    "pause_mode": self.pause_mode,
                    "running": len(self.running), "waiting": len(self.waiting),
                    "session_open": self.session is not None, "offload_tags": sorted(self.offload_tags),
                    "weight_version": self.tm_weight_version, "epoch": self.epoch, "param_states": counts,
                    "groups": sorted(self.groups), "events": list(self.events),
                    "violations": list(self.violations), "generations": list(self.generations)}

    def healthy(self) -> bool:
        return not self.never_healthy and time.monotonic() - self.started >= self.healthy_after_s

    # -- bookkeeping -------------------------------------------------------------------------------
    def _event(self, _name: str, **details: Any) -> None:
        self.events.append({"event": _name, "t": time.monotonic() - self.started, **details})
        if self.state_file:
            self._write_state()

    def _write_state(self) -> None:
        """Process mode (--state-file): the records, for a test to read after the server is gone."""
        with self.lock:
            record = {"version": self.version, "violations": list(self.violations),
                      "generations": list(self.generations), "weight_version": self.tm_weight_version,
                      "events": [e["event"] for e in self.events]}
        partial = self.state_file + ".partial"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(record, f, default=str)
        os.replace(partial, self.state_file)

    def _violation(self, kind: str, **details: Any) -> None:
        self.violations.append({"violation": kind, "t": time.monotonic() - self.started, **details})
        self._event("violation", kind=kind, **details)

    def _fully_idle(self, ignore_waiting: bool) -> bool:
        """scheduler.is_fully_idle: nothing running, and nothing waiting unless told to ignore it."""
        return not self.running and (ignore_waiting or not self.waiting)

    def _flush(self) -> bool:
        """scheduler.flush_cache: drop the prefix cache when idle (0.5.23 ignores waiting while paused)."""
        ignore = self.behaves_as != "0.5.20" and self.engine_paused
        if not self._fully_idle(ignore_waiting=ignore):
            self._event("flush_refused", running=len(self.running), waiting=len(self.waiting))
            return False
        self.tree_cache.clear()
        self._event("cache_flushed")
        return True

    def _memory_fault(self, what: str, tags: Sequence[str] = MEMORY_TAGS) -> HTTPAnswer | None:
        """Touching memory torch_memory_saver unmapped faults on the GPU; no saver, nothing is unmapped."""
        if not self.enable_memory_saver:
            return None
        hit = [t for t in tags if t in self.offload_tags and not (t == "cuda_graph" and self.disable_cuda_graph)]
        if not hit:
            return None
        self._violation("released_memory_touched", what=what, tags=hit)
        return _crash(f"{what} while {hit} memory is released (torch_memory_saver unmapped it; the GPU "
                      "faults): resume_memory_occupation first")

    def _record_version_change(self, new_version: str | None) -> None:
        """scheduler.record_weight_version_change: live requests with output get an event."""
        if new_version is None or new_version == self.sched_weight_version:
            return
        old = self.sched_weight_version
        self.sched_weight_version = new_version
        for req in self.running + self.waiting:
            if req.out:
                req.version_events.append((old, len(req.out)))
        self._event("weight_version", old=old, new=new_version)

    def _abort_all(self) -> None:
        for req in self.running + self.waiting:
            req.finish = req.finish or _abort_reason()
        self.running.clear()
        self.waiting.clear()
        self.cond.notify_all()

    # -- the model-update lock (tokenizer_manager model_update_lock + is_pause_cond) ----------------
    def _update_section(self, action: Callable[[], Any]) -> Any:
        """Paused: run at once (whoever paused holds the lock); else take the writer lock, which waits
        for in-flight generations (control_mixin update_weights_from_tensor and friends)."""
        with self.cond:
            if self.tm_paused:
                return action()
            self.writers += 1
            try:
                while self.readers:
                    self.cond.wait(0.05)
                return action()
            finally:
                self.writers -= 1
                self.cond.notify_all()

    # -- endpoints ---------------------------------------------------------------------------------
    def routes(self) -> dict[str, tuple[tuple[str, ...], Callable[..., Any]]]:
        routes = {
            "/health": (("GET",), self.ep_health), "/health_generate": (("GET",), self.ep_health),
            "/ready": (("GET",), self.ep_ready),
            "/model_info": (("GET",), self.ep_model_info), "/get_model_info": (("GET",), self.ep_model_info),
            "/server_info": (("GET",), self.ep_server_info), "/get_server_info": (("GET",), self.ep_server_info),
            "/generate": (("POST", "PUT"), self.ep_generate),
            "/flush_cache": (("GET", "POST"), self.ep_flush_cache),
            "/pause_generation": (("POST",), self.ep_pause), "/continue_generation": (("POST",), self.ep_continue),
            "/update_weights_from_tensor": (("POST",), self.ep_update_tensor),
            "/update_weights_from_distributed": (("POST",), self.ep_update_distributed),
            "/init_weights_update_group": (("POST",), self.ep_init_group),
            "/destroy_weights_update_group": (("POST",), self.ep_destroy_group),
            "/update_weight_version": (("POST",), self.ep_update_weight_version),
            "/get_weights_by_name": (("GET", "POST"), self.ep_get_weights),
            "/release_memory_occupation": (("GET", "POST"), self.ep_release),
            "/resume_memory_occupation": (("GET", "POST"), self.ep_resume),
            "/abort_request": (("POST",), self.ep_abort),
            "/_standin/state": (("GET",), lambda body, query: (200, self.state())),
        }
        if self.behaves_as == "0.5.20":
            routes["/get_weight_version"] = (("GET",), self.ep_weight_version_gone)
            routes["/weight_version"] = (("GET",), self.ep_weight_version_gone)
        else:
            routes["/begin_weight_update"] = (("POST",), self.ep_begin)
            routes["/end_weight_update"] = (("POST",), self.ep_end)
        return routes

    def _parse(self, path: str, body: Any, present: bool) -> dict[str, Any]:
        return validate_body(self.schemas[path], body, present)

    def injected_answer(self, path: str, body: Any, present: bool) -> tuple[int, Any]:
        """The `answers` knob: the body is parsed as the real server parses it, then the injected answer
        is sent (400 when it says success: false, as the update endpoints do)."""
        if path in self.schemas:
            self._parse(path, body, present)
        elif path == "/generate":
            validate_generate_dataclass(body, present)
            problem = generate_contract_error(body) if self.behaves_as != "0.5.20" else None
            if problem is not None:
                return 400, {"error": problem}
        answer = self.answers[path]
        return (400 if isinstance(answer, dict) and answer.get("success") is False else 200), answer

    def ep_health(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """http_server health_generate: 503 while starting; else (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION,
        default on) a one-token generation must get an answer within SGLANG_HEALTH_CHECK_TIMEOUT (20 s)."""
        if not self.healthy():
            return 503, None
        if os.environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "1").lower() in ("0", "false"):
            return 200, None
        deadline = time.monotonic() + self.health_check_timeout_s
        with self.cond:
            while self.tm_paused and time.monotonic() < deadline:
                self.cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            if self.tm_paused:
                return 503, None
            fault = self._memory_fault("a /health generation")
        if fault is not None:
            return 503, None
        return 200, None

    def ep_ready(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        return (200 if self.healthy() and not self.tm_paused else 503), None

    def ep_model_info(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """http_server model_info."""
        model = self.model
        info = {"model_path": self.model_path, "served_model_name": self.model_path,
                "tokenizer_path": self.model_path, "is_generation": True, "preferred_sampling_params": None,
                "weight_version": self.tm_weight_version, "load_format": "auto", "reasoning_parser": None,
                "tool_call_parser": None, "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": getattr(getattr(model, "config", None), "model_type", None),
                "architectures": [model.architecture] if model.architecture else None}
        if self.behaves_as != "0.5.20":
            info["disaggregation_mode"] = "null"
        return 200, info

    def ep_server_info(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """http_server server_info: the resolved launch flags, the scheduler info, `version`."""
        info = {**self.server_args, "launch_command": self.launch_command,
                "max_total_num_tokens": 4096, "max_req_input_len": self.model.context_len - 1,
                "startup_time": self.startup_time,
                "internal_states": [{"last_gen_throughput": 0.0, "memory_usage": {}}],
                "version": self.version, "kv_events": None}
        if self.behaves_as != "0.5.20":
            info["frontend"] = "python"
        return 200, info

    def ep_weight_version_gone(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """0.5.20 http_server weight_version: an HTTPException(404) through the ErrorResponse handler."""
        return 404, {"object": "error", "message": MSG_WEIGHT_VERSION_GONE, "type": "404", "param": None,
                     "code": 404}

    def ep_flush_cache(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """http_server flush_cache + scheduler_components/flush_wrapper.py (text answers)."""
        try:
            timeout = float(query.get("timeout", "0") or 0)
        except ValueError:
            raise _validation_error([{"type": "float_parsing", "loc": ("query", "timeout"),
                                      "msg": "Input should be a valid number",
                                      "input": query.get("timeout")}]) from None
        if timeout < 0:
            raise _validation_error([{"type": "greater_than_equal", "loc": ("query", "timeout"),
                                      "msg": "Input should be greater than or equal to 0", "input": timeout}])
        with self.cond:
            if self.flush_pending:
                return 400, ("text", "Another flush_cache is already in progress.")
            if timeout > 0:
                self.flush_pending = True
                deadline = time.monotonic() + timeout
                try:
                    while not self._fully_idle(self.behaves_as != "0.5.20" and self.engine_paused):
                        if time.monotonic() >= deadline:
                            return 400, ("text", "Timed out waiting for idle state.")
                        self.cond.wait(min(0.05, deadline - time.monotonic()))
                finally:
                    self.flush_pending = False
            ok = self._flush()
        return (200, ("text", MSG_FLUSH_OK)) if ok else (400, ("text", MSG_FLUSH_FAILED))

    def ep_pause(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """tokenizer_manager.pause_generation + scheduler.pause_generation."""
        obj = self._parse("/pause_generation", body, query["__present__"] == "1")
        with self.cond:
            self.tm_paused = True
            self.pause_mode = obj["mode"]
            if obj["mode"] == "abort":
                self._abort_all()
                while self.readers:
                    self.cond.wait(0.05)
            else:
                self.engine_paused = True
                while self.stepping:  # the step in flight completes first (its result is processed)
                    self.cond.wait(0.05)
                if obj["mode"] == "retract":
                    for req in list(self.running):
                        req.retractions += 1
                        self.waiting.append(req)
                    self.running.clear()
            self._event("paused", mode=obj["mode"])
            self.cond.notify_all()
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def ep_continue(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        self._parse("/continue_generation", body, query["__present__"] == "1")
        with self.cond:
            self.tm_paused = False
            self.engine_paused = False
            self.pause_mode = None
            self.running.extend(self.waiting)
            self.waiting.clear()
            self._event("continued")
            self.cond.notify_all()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def ep_begin(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """0.5.23 weight_updater.begin_weight_update."""
        obj = self._parse("/begin_weight_update", body, query["__present__"] == "1")

        def run() -> tuple[int, Any]:
            if self.session is not None:
                return 400, {"success": False, "message": MSG_SESSION_OPEN}
            self.session = {"selector": obj["selector"], "loaded_weights": False}
            self._event("session_begin")
            return 200, {"success": True, "message": "Success"}
        return self._update_section(run)

    def ep_end(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        self._parse("/end_weight_update", body, query["__present__"] == "1")

        def run() -> tuple[int, Any]:
            if self.session is None:
                return 400, {"success": False, "message": MSG_SESSION_NONE}
            self.session = None
            self._event("session_end")
            return 200, {"success": True, "message": "Success"}
        return self._update_section(run)

    def _after_push(self, obj: dict[str, Any], names: list[str], success_message: str) -> tuple[int, Any]:
        """What follows a successful load (weight_updater): the version, then the flush the request asks."""
        self.epoch += 1
        if self.session is not None:
            self.session["loaded_weights"] = True
        self._record_version_change(obj.get("weight_version"))
        success, message = True, success_message
        if obj.get("flush_cache"):
            if not self._flush():
                if self.behaves_as == "0.5.20":
                    raise _crash("AssertionError: Cache flush failed after updating weights")
                success, message = False, MSG_FLUSH_AFTER_UPDATE
        if success and obj.get("weight_version") is not None:
            self.tm_weight_version = obj["weight_version"]
            message += f" Weight version updated to {obj['weight_version']}."
        self._event("pushed", names=names, weight_version=obj.get("weight_version"), epoch=self.epoch)
        return (200 if success else 400), {"success": success, "message": message}

    def ep_update_tensor(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """control_mixin.update_weights_from_tensor + weight_updater.update_weights_from_tensor."""
        obj = self._parse("/update_weights_from_tensor", body, query["__present__"] == "1")
        if obj["abort_all_requests"]:
            with self.cond:
                self._abort_all()

        def run() -> tuple[int, Any]:
            if self.behaves_as != "0.5.20" and self.session is None:
                return 400, {"success": False, "message": MSG_SESSION_TENSOR}
            entries = obj["serialized_named_tensors"]
            if len(entries) < self.tp_size:
                raise _crash(f"IndexError: serialized_named_tensors has {len(entries)} entries for "
                             f"tp_size {self.tp_size} (entry i is TP rank i's)")
            fault = self._memory_fault("update_weights_from_tensor", ("weights",))
            if fault is not None:
                raise fault
            ranks = [decode_cpu_payload(entries[rank], obj["load_format"]) for rank in range(self.tp_size)]
            self._check_ranks_agree(ranks)
            return self._load(obj, ranks[0], "Success")
        return self._update_section(run)

    def _check_ranks_agree(self, ranks: list[list[tuple[str, Any]]]) -> None:
        import torch

        first = ranks[0]
        for rank, other in enumerate(ranks[1:], start=1):
            same = len(other) == len(first) and all(
                a[0] == b[0] and a[1].shape == b[1].shape and a[1].dtype == b[1].dtype and torch.equal(a[1], b[1])
                for a, b in zip(first, other))
            if not same:
                self._violation("tp_entries_differ", rank=rank,
                                detail="TP ranks would load different weights: an incoherent model")

    def _load(self, obj: dict[str, Any], named: list[tuple[str, Any]], message: str) -> tuple[int, Any]:
        with self.model_lock:
            skipped = self.model.load(named)
        for name in skipped:
            self._event("warning", message=f"Parameter {name} not found in params_dict")
        names = [n for n, _ in named if n not in skipped]
        for name in names:
            self.param_state[name] = "pushed"
        if names:
            self.weights_released_unpushed = False
        return self._after_push(obj, names, message)

    def ep_update_distributed(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """control_mixin.update_weights_from_distributed + weight_updater (receive, then load)."""
        obj = self._parse("/update_weights_from_distributed", body, query["__present__"] == "1")
        if obj["abort_all_requests"]:
            with self.cond:
                self._abort_all()

        def run() -> tuple[int, Any]:
            if self.behaves_as != "0.5.20" and self.session is None:
                return 400, {"success": False, "message": MSG_SESSION_DIST}
            group = obj["group_name"]
            if group not in self.groups:
                text = (f"Group {group} not in {list(self.groups)}. Please call `init_weights_update_group` "
                        "first.")
                if self.behaves_as == "0.5.20":
                    raise _crash(f"AssertionError: {text}")
                return 400, {"success": False, "message": f"Failed to receive weights: {text}"}
            import torch

            for dtype in obj["dtypes"]:
                if not isinstance(getattr(torch, dtype, None), torch.dtype):
                    prefix = ("Failed to update parameter online: " if self.behaves_as == "0.5.20"
                              else "Failed to receive weights: ")
                    return 400, {"success": False, "message": f"{prefix}module 'torch' has no attribute '{dtype}'"}
            fault = self._memory_fault("update_weights_from_distributed", ("weights",))
            if fault is not None:
                raise fault
            triples = list(zip(obj["names"], obj["dtypes"], obj["shapes"]))  # zip: extra entries dropped
            names = [n for n, _, _ in triples]
            if self.distributed_source is None:
                for name in names:
                    if name in self.param_state:
                        self.param_state[name] = "unreceived"
                self._event("unreceived", names=names, detail="no broadcast reaches the stand-in")
                return self._after_push(obj, names, "Succeeded to update parameter online.")
            tensors = self.distributed_source(names, [d for _, d, _ in triples], [s for _, _, s in triples])
            return self._load(obj, list(zip(names, tensors)), "Succeeded to update parameter online.")
        return self._update_section(run)

    def ep_init_group(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        obj = self._parse("/init_weights_update_group", body, query["__present__"] == "1")
        if obj["group_name"] == "":
            raise _crash("AssertionError: Group name cannot be empty")
        with self.cond:
            self.groups[obj["group_name"]] = obj
            self._event("group_init", group=obj["group_name"], rank_offset=obj["rank_offset"])
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def ep_destroy_group(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        obj = self._parse("/destroy_weights_update_group", body, query["__present__"] == "1")
        with self.cond:
            if self.groups.pop(obj["group_name"], None) is None:
                return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    def ep_update_weight_version(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """http_server update_weight_version (abort_all_requests defaults to True)."""
        obj = self._parse("/update_weight_version", body, query["__present__"] == "1")
        with self.cond:
            if obj["abort_all_requests"]:
                self._abort_all()
            self._record_version_change(obj["new_version"])
            self.tm_weight_version = obj["new_version"]
        return 200, {"success": True, "message": f"Weight version updated to {obj['new_version']}",
                     "new_version": obj["new_version"]}

    def ep_get_weights(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """http_server get_weights_by_name: the parameter's values, 400 "Get parameter by name failed"."""
        obj = self._parse("/get_weights_by_name", body, query["__present__"] == "1")
        with self.cond:
            fault = self._memory_fault("get_weights_by_name", ("weights",))
        if fault is not None:
            raise fault
        with self.model_lock:
            values = self.model.weights_by_name(obj["name"], obj["truncate_size"])
        if values is None:
            raise _error_response(400, "Get parameter by name failed")
        return 200, values

    def ep_release(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """weight_updater.release_memory_occupation (answer: null)."""
        obj = self._parse("/release_memory_occupation", body, query["__present__"] == "1")
        with self.cond:
            ignore = self.behaves_as != "0.5.20" and self.engine_paused
            if not self._fully_idle(ignore_waiting=ignore):
                self._violation("release_while_busy", running=len(self.running), waiting=len(self.waiting))
                raise _crash(f"AssertionError: {MSG_RELEASE_BUSY}")
            tags = obj["tags"] or list(MEMORY_TAGS)
            self.offload_tags.update(tags)
            if "kv_cache" in tags:
                self.tree_cache.clear()
            if "weights" in tags and self.enable_memory_saver and not self.enable_weights_cpu_backup:
                self.stash_garbage = True
            if "weights" in tags:
                self.weights_released_unpushed = True
            self._event("released", tags=list(tags))
        return 200, None

    def ep_resume(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        """weight_updater.resume_memory_occupation: resuming a tag not released is a KeyError."""
        obj = self._parse("/resume_memory_occupation", body, query["__present__"] == "1")
        with self.cond:
            tags = obj["tags"] or list(MEMORY_TAGS)
            for tag in tags:
                if tag not in self.offload_tags:
                    self._violation("resume_not_released", tag=tag)
                    raise _crash(f"KeyError: {tag!r} (offload_tags.remove: it was not released)")
                self.offload_tags.discard(tag)
            needs_push = self.enable_memory_saver and not self.enable_weights_cpu_backup
            if any(tag in tags for tag in ("kv_cache", "cuda_graph")) and self.weights_released_unpushed and needs_push:
                # Not a crash on a real server, but the memory plan it breaks: the KV pool comes back
                # while the weights (garbage until pushed) still wait for their push, and the trainer's
                # state is still resident.
                self._violation("kv_cache_resumed_before_the_push", tags=list(tags))
            if "weights" in tags and self.stash_garbage:
                self.stash_garbage = False
                with self.model_lock:
                    self.model.scramble()
                for name in self.param_state:
                    self.param_state[name] = "garbage"
                self.epoch += 1
                self._event("weights_garbage", detail="released without --enable-weights-cpu-backup")
            self._event("resumed", tags=list(tags))
        return 200, None

    def ep_abort(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        obj = self._parse("/abort_request", body, query["__present__"] == "1")
        with self.cond:
            if obj["abort_all"]:
                self._abort_all()
            elif obj["rid"]:
                for req in self.running + self.waiting:
                    if req.rid.startswith(obj["rid"]):
                        req.finish = req.finish or _abort_reason()
                self.running = [r for r in self.running if r.finish is None]
                self.waiting = [r for r in self.waiting if r.finish is None]
                self.cond.notify_all()
        return 200, ("text", "")

    # -- /generate -----------------------------------------------------------------------------------
    def ep_generate(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        present = query["__present__"] == "1"
        obj = validate_generate_dataclass(body, present)
        if self.behaves_as != "0.5.20":
            problem = generate_contract_error(body)
            if problem is not None:
                return 400, {"error": problem}
        if obj.get("stream"):
            return 501, {"detail": "stand-in: streaming /generate is not modelled"}
        single, prompts, params = self._normalize(obj)
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.cond:  # tokenizer_manager: wait while paused, then the model-update reader lock
            while self.tm_paused or self.writers:
                self.cond.wait(0.05)
            self.readers += 1
        try:
            reqs = self._admit(prompts, params, obj)
            self._run(reqs)
        finally:
            with self.cond:
                self.readers -= 1
                self.cond.notify_all()
        answers = [self._answer(req) for req in reqs]
        return 200, (answers[0] if single else answers)

    def _normalize(self, obj: dict[str, Any]) -> tuple[bool, list[list[int]], list[dict[str, Any]]]:
        """GenerateReqInput.normalize_batch_and_arguments and the tokenizer manager's checks."""
        if obj.get("text") is None and obj.get("input_ids") is None and obj.get("input_embeds") is None:
            raise _error_response(400, "Either text, input_ids or input_embeds should be provided.")
        if obj.get("input_ids") is None:  # --skip-tokenizer-init: no tokenizer
            raise _error_response(400, "The engine initialized with skip_tokenizer_init=True cannot accept text "
                                  "prompts. Please provide input_ids or re-initialize the engine with "
                                  "skip_tokenizer_init=False.")
        ids = obj["input_ids"]
        if len(ids) == 0:
            raise _error_response(400, "input_ids cannot be empty.")
        single = isinstance(ids[0], int)
        prompts = [list(ids)] if single else [list(p) for p in ids]
        raw = obj.get("sampling_params")
        raw_list = [raw or {}] * len(prompts) if not isinstance(raw, list) else list(raw)
        n = int((raw_list[0] if raw_list else {}).get("n", 1) or 1)
        if any(int(sp.get("n", 1) or 1) != n for sp in raw_list):
            raise _error_response(400, "The parallel_sample_num should be the same for all samples in sample "
                                  "params.")
        for name in ("return_logprob", "logprob_start_len", "top_logprobs_num"):
            if n > 1 and isinstance(obj.get(name), list):
                raise _error_response(400, f"Cannot use list {name} with parallel_sample_num > 1")
        for name, default in (("top_logprobs_num", 0), ("logprob_start_len", -1)):
            values = obj.get(name) if isinstance(obj.get(name), list) else [obj.get(name)]
            if any(v is not None and v != default for v in values) or obj.get("token_ids_logprob"):
                raise HTTPAnswer(501, {"detail": f"stand-in: {name} / token_ids_logprob are not modelled"})
        if len(raw_list) < len(prompts):
            raise HTTPAnswer(500, "Internal Server Error", text=True)  # an IndexError in __getitem__
        vocab = self.model.vocab_size
        normalized = [srt_sampling_params(sp, self.behaves_as, vocab) for sp in raw_list[:len(prompts)]]
        for prompt, sp in zip(prompts, normalized):
            if len(prompt) >= self.model.context_len:
                raise _error_response(400, f"The input ({len(prompt)} tokens) is longer than the model's context "
                                      f"length ({self.model.context_len} tokens).")
            if sp["max_new_tokens"] is not None and sp["max_new_tokens"] + len(prompt) > self.model.context_len:
                total = sp["max_new_tokens"] + len(prompt)
                raise _error_response(400, "Requested token count exceeds the model's maximum context length of "
                                      f"{self.model.context_len} tokens. You requested a total of {total} tokens: "
                                      f"{len(prompt)} tokens from the input messages and {sp['max_new_tokens']} "
                                      "tokens for the completion. Please reduce the number of tokens in the input "
                                      "messages or the completion to fit within the limit.")
            if vocab is not None and any(not 0 <= t < vocab for t in prompt):
                bad = next(t for t in prompt if not 0 <= t < vocab)
                with self.lock:
                    self._violation("input_id_out_of_vocabulary", token=bad, vocab_size=vocab)
                raise _crash(f"input id {bad} outside the vocabulary [0, {vocab}): the embedding lookup faults "
                             "(device-side assert)")
        if n > 1:  # parallel sampling: prompt-major expansion (tokenizer_manager _handle_batch_request)
            single = False
            prompts = [p for p in prompts for _ in range(n)]
            normalized = [sp for sp in normalized for _ in range(n)]
        return single, prompts, normalized

    def _admit(self, prompts: list[list[int]], params: list[dict[str, Any]], obj: dict[str, Any]) -> list[_Req]:
        import torch

        return_logprob = obj.get("return_logprob")
        flags = return_logprob if isinstance(return_logprob, list) else [bool(return_logprob)] * len(prompts)
        reqs = []
        with self.cond:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                seed = sp.get("sampling_seed")
                if seed is None:
                    self._seed_counter += 1
                    seed = self.random_seed * 1_000_003 + self._seed_counter
                generator = torch.Generator().manual_seed(int(seed) % (2**63))
                if sp["max_new_tokens"] is None:  # unset: up to the context length
                    sp = dict(sp, max_new_tokens=self.model.context_len - len(prompt))
                req = _Req(uuid.uuid4().hex, prompt, sp, bool(flags[i % len(flags)]) if flags else False, generator)
                req.cached_tokens = self._match_prefix(prompt)
                reqs.append(req)
                (self.waiting if self.engine_paused else self.running).append(req)
            self.cond.notify_all()
        return reqs

    def _match_prefix(self, prompt: list[int]) -> int:
        """The radix cache's longest cached prefix (at most len - 1 tokens); one cached under older weights
        is stale KV, which the real server would reuse silently."""
        best, best_epoch = 0, self.epoch
        for tokens, epoch in self.tree_cache:
            n = 0
            for a, b in zip(tokens, prompt[:-1]):
                if a != b:
                    break
                n += 1
            if n > best:
                best, best_epoch = n, epoch
        if best and best_epoch != self.epoch:
            self._violation("stale_prefix_cache", tokens=best, cached_epoch=best_epoch, epoch=self.epoch,
                            detail="KV computed with older weights reused (no flush after the push)")
        return best

    def _run(self, reqs: list[_Req]) -> None:
        """Step the requests of one /generate until each finishes (scheduler event loop, one step each)."""
        while True:
            with self.cond:
                while True:
                    pending = [r for r in reqs if r.finish is None]
                    runnable = [r for r in pending if r in self.running and not self.engine_paused]
                    if not pending or runnable:
                        break
                    self.cond.wait(0.05)
                if not pending:
                    break
                fault = self._memory_fault("a /generate forward")
                if fault is not None:
                    for req in pending:
                        req.finish = _abort_reason()
                    self._drop(reqs)
                    raise fault
                self.stepping += 1
            try:
                for req in runnable:
                    with self.model_lock:
                        token, logprob = self.model.next_token(req)
                    with self.cond:
                        if req.finish is not None:
                            continue
                        req.out.append(token)
                        req.logprobs.append(logprob)
                        self._update_finish(req)
                        if req.finish is not None:
                            self._finished(req)
            finally:
                with self.cond:
                    self.stepping -= 1
                    self.cond.notify_all()
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
        with self.cond:
            self._drop(reqs)

    def _drop(self, reqs: list[_Req]) -> None:
        self.running = [r for r in self.running if r not in reqs]
        self.waiting = [r for r in self.waiting if r not in reqs]
        self.cond.notify_all()

    def _update_finish(self, req: _Req) -> None:
        """schedule_batch Req.update_finish_state: vocabulary boundary, stop tokens, then the length."""
        sp, token = req.sp, req.out[-1]
        vocab = self.model.vocab_size
        if token < 0 or (vocab is not None and token >= vocab):
            if sp["stop_token_ids"]:
                req.out[-1] = sp["stop_token_ids"][0]
            if self.model.eos_token_ids:
                req.out[-1] = self.model.eos_token_ids[0]
            req.logprobs[-1] = None
            req.finish = {"type": "stop", "matched": "NaN happened"}
            return
        if not sp["ignore_eos"] and (token in (sp["stop_token_ids"] or ()) or token in self.model.eos_token_ids):
            req.finish = {"type": "stop", "matched": token}
            return
        if sp["max_new_tokens"] is not None and len(req.out) >= sp["max_new_tokens"]:
            req.finish = {"type": "length", "length": sp["max_new_tokens"]}

    def _finished(self, req: _Req) -> None:
        """Cache the sequence (cache_finished_req) and record what the generation ran on."""
        self.tree_cache.append((tuple(req.prompt + req.out), self.epoch))
        states = {self.param_state.get(n, "initial") for n in self.param_state}
        self.generations.append({
            "rid": req.rid, "weight_version": self.sched_weight_version, "epoch": self.epoch,
            "garbage_weights": "garbage" in states, "unreceived_weights": "unreceived" in states,
            "initial_weights": "initial" in states, "session_open": self.session is not None,
            "cached_tokens": req.cached_tokens, "num_retractions": req.retractions,
            "output_ids": list(req.out), "finish_reason": dict(req.finish or {})})
        if "garbage" in states:
            self._violation("generated_on_garbage_weights", rid=req.rid,
                            detail="weights released without --enable-weights-cpu-backup and not pushed since")

    def _answer(self, req: _Req) -> dict[str, Any]:
        """tokenizer_manager._handle_batch_output (BatchTokenIDOutput, non-streaming)."""
        finish = req.finish or _abort_reason()
        spans = _weight_version_spans(req.version_events, self.sched_weight_version, len(req.out))
        meta: dict[str, Any] = {"id": req.rid, "finish_reason": finish, "prompt_tokens": len(req.prompt),
                                "weight_version": self.tm_weight_version, "num_retractions": req.retractions}
        if req.return_logprob:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[_finite(lp), t, None] for lp, t in zip(req.logprobs, req.out)]
            meta["output_token_logprobs_length"] = len(req.out)
        meta.update({"reasoning_tokens": 0, "completion_tokens": len(req.out), "cached_tokens": req.cached_tokens})
        visible = [s for s in spans if s["start"] < len(req.out) or s["start"] == 0]
        meta["weight_versions"] = [{**s, "end": min(s["end"], len(req.out))} for s in visible]
        meta["weight_version"] = visible[-1]["version"]
        meta["e2e_latency"] = time.monotonic() - req.started
        return {"output_ids": list(req.out), "meta_info": meta}


def _abort_reason() -> dict[str, Any]:
    """schedule_batch FINISH_ABORT().to_json()."""
    return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None  # orjson writes NaN as null


def _weight_version_spans(events: list[tuple[str, int]], current: str, n: int) -> list[dict[str, Any]]:
    """sglang/srt/utils/weight_versions.py compute_weight_version_spans."""
    spans: list[dict[str, Any]] = []
    for version, end in events + [(current, n)]:
        end = min(end, n)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans


# ==================================================================================================
# HTTP
# ==================================================================================================
# Real endpoints (http_server routes) this model leaves out: they answer 501, not 404
_NOT_MODELLED_COMMON = (
    "/", "/add_external_corpus", "/api/chat", "/api/generate", "/api/show", "/api/tags", "/classify",
    "/close_session", "/configure_logging", "/detokenize", "/dump_expert_distribution_record", "/encode",
    "/freeze_gc", "/get_remote_instance_transfer_engine_info", "/hicache/storage-backend",
    "/hicache/storage-backend/clear", "/init_weights_send_group_for_remote_instance", "/invocations",
    "/list_external_corpora", "/load_lora_adapter", "/load_lora_adapter_from_tensors", "/open_session",
    "/parse_function_call", "/ping", "/remote_instance_transfer_engine_info", "/remove_external_corpus",
    "/send_weights_to_remote_instance", "/separate_reasoning", "/set_internal_state", "/set_trace_level",
    "/slow_down", "/start_expert_distribution_record", "/start_profile", "/stop_expert_distribution_record",
    "/stop_profile", "/tokenize", "/unload_lora_adapter", "/update_weights_from_disk", "/update_weights_from_ipc",
    "/v1/audio/transcriptions", "/v1/chat/completions", "/v1/classify", "/v1/completions", "/v1/detokenize",
    "/v1/embeddings", "/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/v1/realtime", "/v1/rerank",
    "/v1/responses", "/v1/score", "/v1/tokenize", "/vertex_generate", "/weights_checker")
NOT_MODELLED = {
    "0.5.20": frozenset(_NOT_MODELLED_COMMON + ("/clear_hicache_storage_backend", "/get_load")),
    "0.5.23": frozenset(_NOT_MODELLED_COMMON + ("/get_hicache_l3_cache_layout", "/pd_role_switch", "/v1/decisions",
                                                "/v1/systemone")),
}


class _Handler(BaseHTTPRequestHandler):
    state: StandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        state = self.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        present = bool(raw.strip())
        try:
            payload = json.loads(raw) if present else None
        except ValueError as exc:
            with state.lock:
                state.calls.append((path, raw.decode(errors="replace")))
            return self._send(400, {"object": "error", "message": f"JSON decode error: {exc}",
                                    "type": "Bad Request", "param": None, "code": 400})
        with state.lock:
            state.calls.append((path, payload))
        if path in ("/health", "/health_generate") and not state.healthy():
            return self._send(503, None)
        if state.die_on == path:
            return self._die()
        with state.lock:
            status, times = state.fail.get(path, (200, 0))
            if times > 0:
                state.fail[path] = (status, times - 1)
        if times > 0:
            return self._send(status, {"error": f"injected failure {status}"})
        routes = state.routes()
        if path not in routes:
            if path in NOT_MODELLED[state.behaves_as]:
                return self._send(501, {"detail": f"stand-in: {path} exists in SGLang {state.version} but is "
                                                  "not modelled"})
            return self._send(404, {"detail": "Not Found"})
        methods, handler = routes[path]
        if method not in methods:
            return self._send(405, {"detail": "Method Not Allowed"}, allow=", ".join(methods))
        query["__present__"] = "1" if present else "0"
        try:
            if path in state.answers:
                handler = lambda body, query: state.injected_answer(path, body, present)  # noqa: E731
            status, body = handler(payload, query)
        except HTTPAnswer as answer:
            status, body = answer.status, (("text", answer.body) if answer.text else answer.body)
        except Exception as exc:  # noqa: BLE001 - a bug of the stand-in: say so instead of hanging up
            import traceback

            traceback.print_exc()
            status, body = 500, {"error": {"message": f"stand-in internal error: {type(exc).__name__}: {exc}"}}
        self._send(status, body)

    def _send(self, status: int, body: Any, allow: str | None = None) -> None:
        if isinstance(body, tuple) and len(body) == 2 and body[0] == "text":
            data, kind = body[1].encode(), "text/plain; charset=utf-8"
        elif body is None and status in (200, 503) and self.path.split("?")[0] in (
                "/health", "/health_generate", "/ready"):
            data, kind = b"", None
        else:
            data, kind = json.dumps(body).encode(), "application/json"
        try:
            self.send_response(status)
            if kind:
                self.send_header("Content-Type", kind)
            if allow:
                self.send_header("Allow", allow)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its time limit)
            pass

    def _die(self) -> None:
        """Drop the connection without an answer, then stop serving (a crashed server)."""
        print(f"stand-in: dying during {self.path}", flush=True)
        if self.state.exit_code is not None:
            os._exit(self.state.exit_code)
        self.close_connection = True
        threading.Thread(target=self.state.stop, daemon=True).start()
        self.connection.close()


# ==================================================================================================
# Process mode
# ==================================================================================================
def _recorded_flags(argv: Sequence[str]) -> dict[str, Any]:
    """Every `--flag [value]` of the command line, as ServerArgs fields (dashes -> underscores)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
                out[key.replace("-", "_")] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[key.replace("-", "_")] = argv[i + 1]
                i += 1
            else:
                out[key.replace("-", "_")] = True
        i += 1
    for key, value in list(out.items()):
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    out[key] = cast(value)
                    break
                except ValueError:
                    continue
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="A stand-in for python -m sglang.launch_server (tests only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--sglang-version", default=DEFAULT_VERSION,
                        help=f"the version to model: {' or '.join(VERSIONS)} (others: see _behaviour_of)")
    parser.add_argument("--tp-size", "--tp", type=int, default=1)
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--weight-version", default="default")
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--enable-weights-cpu-backup", action="store_true")
    parser.add_argument("--disable-cuda-graph", action="store_true")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    parser.add_argument("--healthy-after", type=float, default=0.0)
    parser.add_argument("--never-healthy", action="store_true")
    parser.add_argument("--die-on", default=None)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--child-pid-file", default=None, help="spawn a child (like SGLang's schedulers)")
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--health-timeout", type=float, default=None)
    parser.add_argument("--state-file", default=None, help="write the records (violations, generations) here")
    args, _ = parser.parse_known_args(argv)
    if args.child_pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(args.child_pid_file, "w") as handle:
            handle.write(str(child.pid))
    if args.model_path and not os.path.isfile(os.path.join(args.model_path, "config.json")):
        print(f"stand-in: no config.json under {args.model_path}; serving without a model (fake tokens). "
              "The real server would exit here.", flush=True)
    if not args.skip_tokenizer_init:
        print("stand-in: always behaves as launched with --skip-tokenizer-init (it has no tokenizer)", flush=True)
    recorded = _recorded_flags(argv)
    for test_flag in ("healthy_after", "never_healthy", "die_on", "exit_code", "child_pid_file", "token_delay",
                      "health_timeout", "sglang_version", "state_file"):
        recorded.pop(test_flag, None)
    recorded.update(tp_size=args.tp_size, host=args.host, port=args.port)
    standin = StandIn(healthy_after_s=args.healthy_after, never_healthy=args.never_healthy, die_on=args.die_on,
                      exit_code=args.exit_code, version=args.sglang_version, tp_size=args.tp_size,
                      model_path=args.model_path, enable_memory_saver=args.enable_memory_saver,
                      enable_weights_cpu_backup=args.enable_weights_cpu_backup,
                      weight_version=args.weight_version, disable_cuda_graph=args.disable_cuda_graph,
                      random_seed=args.random_seed, dtype=args.dtype, context_length=args.context_length,
                      token_delay_s=args.token_delay, health_check_timeout_s=args.health_timeout,
                      server_args=recorded,
                      launch_command=" ".join(["python", "-m", "sglang.launch_server"] + argv))
    standin.state_file = args.state_file
    print(f"stand-in: SGLang {args.sglang_version} serving on {args.host}:{args.port}", flush=True)
    standin.start(args.host, args.port)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
