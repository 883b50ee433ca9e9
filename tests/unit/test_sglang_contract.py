"""Contract tests: what OUR SGLang integration sends and reads, against SGLang's OWN source.

For the lowest and highest supported versions (pyproject: sglang>=0.5.20,<0.6), the released wheel is
downloaded (tests/sglang_wheels.py; cached, never imported: it pulls CUDA) and the modules defining
the HTTP contract are read with `ast`. Our side is not described by hand: the real code paths
(`build._build_colocated` / `build._build_disaggregated`, the engine, the syncers, the launcher) run
against a recording stand-in of `ServerClient`'s transport that answers like the server, and every
request, payload, launch command and answer field read is checked against that version's source:

* each endpoint we call exists there with the HTTP method we use, and is not deprecated;
* each payload key is a field of the request class the handler parses (`*ReqInput` of io_struct.py),
  the required fields are sent, and the values fit the annotations (str/int/float/bool/List/Optional/
  Literal); each sampling-params key is a `SamplingParams` field; on 0.5.23 every /generate body
  passes the server's own JSON contract (sglang/api/v1/api_types.py, run from the wheel);
* each launch command parses with the flags `ServerArgs` defines (arity, value types, required ones);
* each answer field we read (/generate items and meta_info, finish reasons, /server_info) is one the
  server writes; log-prob entries are (logprob, token_id, text);
* the facts our per-version table (`version.protocol_for`) encodes: the weight-update session of
  0.5.23 (/begin_weight_update, /end_weight_update, the scheduler's refusal outside it) and its
  absence in 0.5.20, /server_info vs the deprecated /get_server_info, weight_version, memory tags,
  the SGLang names our code imports and the arguments it passes them.

When the wheel cannot be downloaded the tests skip (fail with LITEPPO_REQUIRE_SGLANG_WHEELS=1, as CI
sets). A gap between our code and a version is listed in KNOWN_GAPS: its test is a strict xfail, so
fixing the code turns it into an error that asks for the entry to be removed.
"""

from __future__ import annotations

import ast
import copy
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
import torch

from liteppo_mcore.rollout.engine import SamplingParams
from liteppo_mcore.rollout.sglang import build, launcher, protocol
from liteppo_mcore.rollout.sglang import version as version_mod
from liteppo_mcore.rollout.sglang.client import ServerClient, SGLangServerError
from tests import sglang_wheels as sw

VERSIONS = sw.SUPPORTED_VERSIONS
PACKAGE_DIR = Path(build.__file__).parent

# test name -> {version: the gap between our code and that SGLang version}. Listed gaps run as strict
# xfails (an AssertionError is expected); remove the entry once the code is fixed.
KNOWN_GAPS: dict[str, dict[str, str]] = {}


def versions(test: str):
    gaps = KNOWN_GAPS.get(test, {})
    return [pytest.param(v, id=v, marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=gaps[v])]
                         if v in gaps else []) for v in VERSIONS]


@pytest.fixture
def sgl(version):
    return sw.source_for_test(version)


# ---- the recording transport ----------------------------------------------------------------------

class Call(NamedTuple):
    url: str
    method: str
    path: str
    payload: Any


class Reads(dict):
    """A JSON object that remembers which keys our code read from it."""

    def __init__(self, kind: str, log: dict[str, set], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._kind, self._log = kind, log

    def _note(self, key: Any) -> None:
        self._log.setdefault(self._kind, set()).add(key)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)


class FakeServers:
    """Servers of one SGLang version, by URL: what they were sent, and answers shaped like SGLang's
    (the shapes the tests below check against the wheel)."""

    def __init__(self, version: str, tp_sizes: dict[str, int] | None = None):
        self.version = version
        self.tp_sizes = dict(tp_sizes or {})
        self.calls: list[Call] = []
        self.commands: list[list[str]] = []
        self.reads: dict[str, set] = {}
        self.weight_version: dict[str, str | None] = {}

    def answer(self, url: str, method: str, path: str, payload: Any) -> Any:
        self.calls.append(Call(url, method, path, copy.deepcopy(payload)))
        if path == "/health":
            return None
        if path in ("/server_info", "/get_server_info"):
            return Reads("server_info", self.reads, version=self.version, tp_size=self.tp_sizes.get(url, 1),
                         dp_size=1, pp_size=1, skip_tokenizer_init=True)
        if path == "/generate":
            return [self._generation(url, sampling) for sampling in payload["sampling_params"]]
        if path.startswith("/update_weights_from_") and isinstance(payload, dict):
            if payload.get("weight_version") is not None:
                self.weight_version[url] = payload["weight_version"]
            return {"success": True, "message": "Succeeded to update model weights."}
        if path == "/flush_cache":
            return "Cache flushed.\n"
        if path in ("/pause_generation", "/continue_generation"):
            return {"message": "ok", "status": "ok"}
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return None
        return {"success": True, "message": "Success"}

    def _generation(self, url: str, sampling: dict[str, Any]) -> dict[str, Any]:
        count = max(1, min(3, int(sampling["max_new_tokens"])))
        tokens = [7 + i for i in range(count)]
        finish = Reads("finish_reason", self.reads, type="length", length=count)
        meta = Reads("meta_info", self.reads, id="rid", finish_reason=finish, prompt_tokens=2,
                     weight_version=self.weight_version.get(url, "default"), completion_tokens=count,
                     output_token_logprobs=[[-0.25, t, None] for t in tokens])
        return Reads("generation", self.reads, text="", output_ids=list(tokens), meta_info=meta)

    def paths(self, url: str | None = None) -> list[str]:
        return [c.path for c in self.calls if url is None or c.url == url]


class FakeProcess:
    def poll(self):
        return None

    def diagnostics(self) -> str:
        return "a recording stand-in"

    def shutdown(self, grace_s: float = 10.0) -> None:
        pass


def recording_client(fake: FakeServers):
    class RecordingClient(ServerClient):
        def _once(self, path, payload, method, timeout_s):
            return fake.answer(self.url, method, path, payload)

    return RecordingClient


def _buckets():
    return [[("model.norm.weight", torch.linspace(0.5, 1.5, 8)),
             ("model.embed_tokens.weight", torch.ones(4, 3, dtype=torch.bfloat16))],
            [("lm_head.weight", torch.zeros(4, 3, dtype=torch.bfloat16))]]


SAMPLING = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=4, n=2, seed=5)
SAMPLING_NO_TOP_K = SamplingParams(temperature=1.0, top_k=-1, max_new_tokens=3, n=1, seed=1)
GREEDY = SamplingParams(greedy=True, temperature=1.0, max_new_tokens=2, n=1)


def _common():
    return dict(member=0, members=1, gather_replica=lambda share: [share], stream=0, eos_token_ids=(2,))


def _patch_collectives(mp: pytest.MonkeyPatch) -> None:
    """A one-rank job: the collectives build.py runs directly on torch.distributed."""
    import torch.distributed as dist

    def all_gather_object(out, obj, group=None):
        out[:] = [obj] * len(out)

    mp.setattr(dist, "all_gather_object", all_gather_object)
    mp.setattr(dist, "get_world_size", lambda group=None: 1)


def run_colocated(fake: FakeServers, mp: pytest.MonkeyPatch, output_dir: str) -> None:
    from liteppo_mcore.config.schema import LitePPOConfig

    client_cls = recording_client(fake)

    def launch(command, url, *, start_timeout_s, request_timeout_s, max_retries, log_path=None, env=None,
               poll_s=1.0):
        fake.commands.append(list(command))
        client = client_cls(url, timeout_s=request_timeout_s, max_retries=max_retries, process=FakeProcess())
        client.wait_healthy(start_timeout_s)
        return client

    cfg = LitePPOConfig()
    cfg.model.hf_path = "/models/tiny-llama"
    cfg.output_dir = output_dir
    cfg.seed = 3
    cfg.rollout.mode = "colocated"
    _patch_collectives(mp)
    mp.setattr(build, "launch_server", launch)
    mp.setenv("LOCAL_WORLD_SIZE", "1")
    mp.setenv("LOCAL_RANK", "0")
    mp.delenv(launcher.EXTRA_ARGS_ENV, raising=False)
    engine = build._build_colocated(cfg, 0, 1, _common())
    engine.generate([[1, 2], [3]], SAMPLING)
    engine.generate([[4]], GREEDY)
    engine.sleep()
    engine.update_weights(_buckets(), "1")
    engine.generate([[5, 6]], SAMPLING_NO_TOP_K)
    engine.shutdown()


def run_disaggregated(fake: FakeServers, mp: pytest.MonkeyPatch) -> None:
    from liteppo_mcore.config.schema import LitePPOConfig

    cfg = LitePPOConfig()
    cfg.rollout.mode = "disaggregated"
    cfg.rollout.server_urls = list(fake.tp_sizes)
    _patch_collectives(mp)
    mp.setattr(build, "ServerClient", recording_client(fake))
    mp.setattr(build, "_join_weight_group", lambda timeout_s: (lambda address, port, world_size: "group"))
    mp.setattr(build, "_broadcast_fn", lambda group: (lambda tensor: None))
    mp.setenv(build.MASTER_ADDR_ENV, "127.0.0.1")
    groups = SimpleNamespace(dp_rank=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, cp_rank=0, cp_size=1)
    engine = build._build_disaggregated(cfg, groups, 0, _common())
    engine.generate([[1, 2, 3]], SAMPLING)
    engine.update_weights(_buckets(), "2")
    engine.generate([[4]], GREEDY)
    engine.shutdown()


_TRAFFIC: dict[str, FakeServers] = {}


@pytest.fixture
def traffic(version, tmp_path_factory) -> FakeServers:
    """Everything our code sent to servers of `version` in a colocated and a disaggregated run."""
    if version not in _TRAFFIC:
        fake = FakeServers(version, {"http://10.0.0.1:30000": 1, "http://10.0.0.2:30000": 2})
        with pytest.MonkeyPatch.context() as mp:
            run_colocated(fake, mp, str(tmp_path_factory.mktemp(f"sglang-{version}")))
        with pytest.MonkeyPatch.context() as mp:
            run_disaggregated(fake, mp)
        _TRAFFIC[version] = fake
    return _TRAFFIC[version]


def launch_commands(traffic: FakeServers) -> list[list[str]]:
    """The command build.py launched, and build_server_command's other shapes."""
    extra = launcher.extra_args_from_env({launcher.EXTRA_ARGS_ENV: "--attention-backend fa3 "
                                                                  "--enable-deterministic-inference"})
    return traffic.commands + [
        launcher.build_server_command("/models/m", port=31000, tp=4, base_gpu_id=4, mem_fraction_static=0.7,
                                      seed=11, host="0.0.0.0", enable_memory_saver=False),
        launcher.build_server_command("/models/m", port=31001, extra_args=extra),
    ]


# ---- the wheel ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", versions("test_the_wheel_is_that_version_and_has_the_files_we_read"))
def test_the_wheel_is_that_version_and_has_the_files_we_read(sgl, version):
    assert sgl.metadata_version() == version
    for path in (sw.HTTP_SERVER, sw.IO_STRUCT, sw.SAMPLING_PARAMS, sw.SERVER_ARGS, sw.ARG_UTILS,
                 sw.TOKENIZER_MANAGER, sw.SCHEDULE_BATCH, sw.LAUNCH_SERVER):
        assert sgl.has(path), sgl.where(path)
    # the request classes: the /generate body is a dataclass, the others msgspec structs on BaseReq
    assert sgl.request_class_kind("GenerateReqInput") == "dataclass"
    assert sgl.request_class_kind("PauseGenerationReqInput") == "msgspec"
    assert {"rid", "http_worker_ipc"} <= set(sgl.req_inputs["PauseGenerationReqInput"])


# ---- endpoints -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", versions("test_every_endpoint_we_call_exists_with_the_method_we_use"))
def test_every_endpoint_we_call_exists_with_the_method_we_use(sgl, traffic, version):
    used = {(c.method, c.path) for c in traffic.calls}
    core = {"/health", "/generate", "/pause_generation", "/flush_cache", "/continue_generation",
            "/update_weights_from_tensor", "/init_weights_update_group", "/update_weights_from_distributed",
            "/destroy_weights_update_group", "/release_memory_occupation", "/resume_memory_occupation"}
    assert core <= {path for _, path in used}, "the scenarios no longer exercise every part of the client"
    missing = [f"{method} {path} (the server has: {sorted(sgl.methods(path)) or 'no such path'})"
               for method, path in sorted(used) if sgl.route_for(method, path) is None]
    assert not missing, f"SGLang {version} ({sgl.where(sw.HTTP_SERVER)}) does not serve: {missing}"


@pytest.mark.parametrize("version", versions("test_we_call_no_deprecated_endpoint"))
def test_we_call_no_deprecated_endpoint(sgl, traffic, version):
    deprecated = sorted({c.path for c in traffic.calls
                         if (r := sgl.route_for(c.method, c.path)) is not None and r.deprecated})
    assert not deprecated, f"SGLang {version} marks these as deprecated: {deprecated}"


@pytest.mark.parametrize("version", versions("test_server_info_and_its_deprecated_alias"))
def test_server_info_and_its_deprecated_alias(sgl, version):
    current, alias = sgl.route_for("GET", "/server_info"), sgl.route_for("GET", "/get_server_info")
    assert current is not None and not current.deprecated
    assert alias is not None and alias.deprecated
    path = version_mod.protocol_for(version).server_info_path
    assert sgl.route_for("GET", path) is not None and not sgl.route_for("GET", path).deprecated


# ---- request bodies ------------------------------------------------------------------------------------

def _type_errors(fields, payload) -> list[str]:
    errors = []
    for key, value in payload.items():
        if key in fields and sw.value_matches(fields[key].annotation, value) is False:
            errors.append(f"{key}={value!r:.80} does not fit {fields[key].annotation}")
    return errors


@pytest.mark.parametrize("version", versions("test_every_payload_key_is_a_field_of_the_request_class"))
def test_every_payload_key_is_a_field_of_the_request_class(sgl, traffic, version):
    problems = []
    for call in traffic.calls:
        route = sgl.route_for(call.method, call.path)
        if route is None:
            continue  # reported by test_every_endpoint_we_call_exists_with_the_method_we_use
        if route.body is None:
            if call.payload not in (None, {}):
                problems.append(f"{call.path} takes no body, but we send {call.payload!r:.80}")
            continue
        fields = sgl.req_inputs.get(route.body)
        assert fields is not None, f"{route.body} (the body of {call.path}) is not in {sw.IO_STRUCT}"
        if not isinstance(call.payload, dict):
            problems.append(f"{call.path} parses a {route.body} body, but we send {call.payload!r:.80}")
            continue
        unknown = sorted(set(call.payload) - set(fields))
        missing = sorted(k for k, f in fields.items() if f.required and k not in call.payload)
        if unknown:  # the server's pydantic schema ignores unknown keys: a typo would be silently dropped
            problems.append(f"{call.path}: {unknown} are not fields of {route.body}")
        if missing:
            problems.append(f"{call.path}: required {missing} of {route.body} not sent")
        problems += [f"{call.path}: {e}" for e in _type_errors(fields, call.payload)]
    assert not problems, f"SGLang {version} ({sgl.where(sw.IO_STRUCT)}): " + "; ".join(problems)


@pytest.mark.parametrize("version", versions("test_sampling_params_we_send_are_sampling_params_fields"))
def test_sampling_params_we_send_are_sampling_params_fields(sgl, traffic, version):
    api = sgl.sampling_params_api
    sent = [s for c in traffic.calls if c.path == "/generate" for s in c.payload["sampling_params"]]
    assert sent and any(s.get("temperature") == 0.0 for s in sent) and any("top_k" in s for s in sent)
    problems = []
    for sampling in sent:
        unknown = sorted(set(sampling) - set(api))
        if unknown:
            problems.append(f"{unknown} are not SamplingParams fields (internal ones: "
                            f"{sorted(set(sgl.sampling_params) - set(api))})")
        problems += _type_errors(api, sampling)
    assert not problems, f"SGLang {version} ({sgl.where(sw.SAMPLING_PARAMS)}): " + "; ".join(sorted(set(problems)))


JSON_CONTRACT = {"0.5.20": False, "0.5.23": True}  # sglang/api/v1/api_types.py gates /generate


@pytest.mark.parametrize("version", versions("test_generate_bodies_pass_the_servers_json_contract"))
def test_generate_bodies_pass_the_servers_json_contract(sgl, traffic, version):
    assert sgl.has_api_types == JSON_CONTRACT[version]
    assert sgl.generate_contract_gate() == JSON_CONTRACT[version]
    if not JSON_CONTRACT[version]:
        return  # 0.5.20: the body is only parsed into GenerateReqInput (checked above)
    api = sgl.api_types_module
    assert sgl.api_rejects_unknown_keys("SamplingParams")  # a stray sampling key is a 400 here
    for call in traffic.calls:
        if call.path == "/generate":
            try:
                request = api.GenerateRequest.from_json_value(call.payload)
            except api.JsonContractError as exc:
                pytest.fail(f"SGLang {version} refuses our /generate body: {exc} "
                            f"({sgl.where(sw.API_TYPES)})")
            assert len(request.sampling_params) == len(call.payload["input_ids"])


# ---- the launch command --------------------------------------------------------------------------------

@pytest.mark.parametrize("version", versions("test_launch_commands_parse_as_sglang_server_arguments"))
def test_launch_commands_parse_as_sglang_server_arguments(sgl, traffic, version):
    parser = sgl.cli_parser()
    commands = launch_commands(traffic)
    assert traffic.commands, "build.py launched no server"
    module = "sglang.launch_server"
    assert sgl.has(module.replace(".", "/") + ".py") and "prepare_server_args" in sgl.read(sw.LAUNCH_SERVER)
    for command in commands:
        assert command[:3] == [sys.executable, "-m", module]
        try:
            args = parser.parse_args(command[3:])
        except ValueError as exc:
            pytest.fail(f"SGLang {version} would refuse {' '.join(command[3:])}: {exc} "
                        f"(flags from {sgl.where(sw.SERVER_ARGS)} and its arg_groups/fields)")
        assert args.skip_tokenizer_init is True and args.trust_remote_code is True
        assert isinstance(args.port, int) and isinstance(args.tp_size, int)
        assert isinstance(args.mem_fraction_static, float) and isinstance(args.random_seed, int)
    first = parser.parse_args(commands[0][3:])
    assert first.model_path == "/models/tiny-llama" and first.random_seed == 3 and first.enable_memory_saver
    other = parser.parse_args(commands[1][3:])
    assert (other.tp_size, other.base_gpu_id, other.port, other.host) == (4, 4, 31000, "0.0.0.0")
    assert not other.enable_memory_saver
    documented = parser.parse_args(commands[2][3:])  # docs/sglang.md's LITEPPO_SGLANG_EXTRA_ARGS examples
    assert documented.attention_backend == "fa3" and documented.enable_deterministic_inference


@pytest.mark.parametrize("version", versions("test_the_flag_rule_we_read_is_sglangs"))
def test_the_flag_rule_we_read_is_sglangs(sgl, version):
    """tests/sglang_wheels.py derives flags as add_cli_args_from_dataclass does; check that rule there."""
    rule = sgl.function_source(sw.ARG_UTILS, "_field_to_cli_name")
    assert rule is not None and 'return "--" + name.replace("_", "-")' in rule
    derive = sgl.function_source(sw.ARG_UTILS, "add_cli_args_from_dataclass")
    for piece in ("arg_meta.no_cli", "arg_meta.cli_name", "arg_meta.aliases", '"store_true"',
                  'nargs = arg_meta.nargs or "+"'):
        assert piece in derive, piece
    assert "add_cli_args_from_dataclass(parser, ServerArgs)" in sgl.function_source(sw.SERVER_ARGS,
                                                                                     "ServerArgs.add_cli_args")
    flags = sgl.cli_flags
    assert flags["--model-path"] is flags["--model"] and flags["--model-path"].required
    assert flags["--tp-size"].dest == "tp_size" and flags["--skip-tokenizer-init"].kind == "store_true"


# ---- answers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", versions("test_answer_fields_we_read_are_written_by_the_server"))
def test_answer_fields_we_read_are_written_by_the_server(sgl, traffic, version):
    reads = traffic.reads
    assert reads.get("generation") and reads.get("meta_info") and reads.get("server_info")
    where = sgl.where(sw.TOKENIZER_MANAGER)
    assert reads["generation"] <= sgl.response_keys, f"{reads['generation'] - sgl.response_keys} ({where})"
    assert reads["meta_info"] <= sgl.meta_info_keys, f"{reads['meta_info'] - sgl.meta_info_keys} ({where})"
    finish_keys = set().union(*sgl.finish_reasons.values())
    assert reads.get("finish_reason", set()) <= finish_keys, sgl.where(sw.SCHEDULE_BATCH)
    keys, spreads_args = sgl.server_info_keys()
    unknown = {k for k in reads["server_info"] if k not in keys and not (spreads_args and k in sgl.server_args_fields)}
    assert not unknown, f"/server_info of SGLang {version} has no {sorted(unknown)} ({sgl.where(sw.HTTP_SERVER)})"


@pytest.mark.parametrize("version", versions("test_finish_reasons_and_log_prob_entries_are_what_we_parse"))
def test_finish_reasons_and_log_prob_entries_are_what_we_parse(sgl, version):
    assert sgl.finish_reason_types == {"stop", "length", "abort"}
    order = sgl.logprob_entry_order()  # --skip-tokenizer-init: entries are (logprob, token_id, None)
    assert order[0].endswith("_val") and order[1].endswith("_idx") and order[2] == "None", order
    if sgl.has_api_types:
        assert list(sgl.api_struct_fields("LogprobEntry")) == ["logprob", "token_id", "text"]
    params = SamplingParams(max_new_tokens=2)
    for kind in ("stop", "length"):
        item = {"output_ids": [9], "meta_info": {"finish_reason": {"type": kind},
                                                 "output_token_logprobs": [[-0.5, 9, None]]}}
        generation = protocol.parse_generation(item, params)
        assert generation.token_ids == [9] and generation.logprobs == [-0.5] and generation.finish_reason == kind
    with pytest.raises(SGLangServerError, match="aborted"):
        protocol.parse_generation({"meta_info": {"finish_reason": {"type": "abort", "message": "x"}}}, params)


# ---- weight updates ----------------------------------------------------------------------------------------

SESSION = {"0.5.20": False, "0.5.23": True}
UPDATES = ("/update_weights_from_tensor", "/update_weights_from_distributed")


@pytest.mark.parametrize("version", versions("test_the_weight_update_session_of_each_version"))
def test_the_weight_update_session_of_each_version(sgl, version):
    expected = SESSION[version]
    for path in ("/begin_weight_update", "/end_weight_update"):
        assert (sgl.route_for("POST", path) is not None) == expected, f"{path} ({sgl.where(sw.HTTP_SERVER)})"
    guards = sgl.session_guards()
    assert ({"update_weights_from_tensor", "update_weights_from_distributed"} <= set(guards)) == expected, (
        sgl.where(sw.SCHEDULER_WEIGHT_UPDATER))
    if expected:
        begin = sgl.req_inputs["BeginWeightUpdateReqInput"]
        assert [sw.value_matches(begin["selector"].annotation, v) for v in ("all", "target", "draft", "x")] == [
            True, True, True, False]
        assert ast.literal_eval(begin["selector"].default) == "all"
        assert all(f.owner == "BaseReq" for f in sgl.req_inputs["EndWeightUpdateReqInput"].values())
        assert "must run between begin_weight_update() and end_weight_update()" in guards["update_weights_from_tensor"]
    else:
        assert "BeginWeightUpdateReqInput" not in sgl.req_inputs
    assert version_mod.protocol_for(version).weight_update_session == expected  # our table


@pytest.mark.parametrize("version", versions("test_our_syncs_open_a_session_exactly_where_the_server_needs_one"))
def test_our_syncs_open_a_session_exactly_where_the_server_needs_one(sgl, traffic, version):
    needed = sgl.route_for("POST", "/begin_weight_update") is not None and bool(sgl.session_guards())
    for url in sorted({c.url for c in traffic.calls if c.path in UPDATES}):
        steps = [p for p in traffic.paths(url)
                 if p in UPDATES + ("/begin_weight_update", "/end_weight_update", "/continue_generation")]
        if not needed:
            assert "/begin_weight_update" not in steps and "/end_weight_update" not in steps, (url, steps)
            continue
        inside = False
        for step in steps:
            if step == "/begin_weight_update":
                assert not inside, f"{url}: a session opened twice: {steps}"
                inside = True
            elif step == "/end_weight_update":
                assert inside, f"{url}: a session closed that was not open: {steps}"
                inside = False
            elif step in UPDATES:
                assert inside, f"{url}: {step} outside a weight-update session, which SGLang {version} refuses: {steps}"
            else:
                assert not inside, f"{url}: generation continued inside the session: {steps}"
        assert not inside, f"{url}: the session is left open: {steps}"


@pytest.mark.parametrize("version", versions("test_updates_carry_the_weight_version_the_server_reports"))
def test_updates_carry_the_weight_version_the_server_reports(sgl, traffic, version):
    for name in ("UpdateWeightsFromTensorReqInput", "UpdateWeightsFromDistributedReqInput"):
        field = sgl.req_inputs[name]["weight_version"]
        assert (field.annotation, field.default) == ("Optional[str]", "None"), name
    assert {"update_weights_from_tensor", "update_weights_from_distributed"} <= sgl.weight_version_recorders()
    assert "weight_version" in sgl.meta_info_keys
    sent = {c.payload.get("weight_version") for c in traffic.calls if c.path in UPDATES}
    assert sent == {"1", "2"}, sent


@pytest.mark.parametrize("version", versions("test_memory_tags_we_release_are_sglangs"))
def test_memory_tags_we_release_are_sglangs(sgl, traffic, version):
    constants = sgl.constants("sglang/srt/constants.py")
    known = {v for k, v in constants.items() if k.startswith("GPU_MEMORY_TYPE_")}
    assert {version_mod.TAG_WEIGHTS, version_mod.TAG_KV_CACHE, version_mod.TAG_CUDA_GRAPH} <= known
    sent = [t for c in traffic.calls if c.path.endswith("_memory_occupation")
            for t in (c.payload or {}).get("tags") or []]
    assert sent and set(sent) <= known, (sent, known)


# ---- the SGLang names our code uses ------------------------------------------------------------------------

def _sglang_import_groups():
    """(file, line, alternatives): each `from sglang... import` of our package, the alternatives of a
    try/except ImportError together; each alternative is [(module, name, bound as)]."""
    groups = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        in_try = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers):
                blocks = [node.body] + [h.body for h in node.handlers]
                alternatives = [[(s.module, a.name, a.asname or a.name) for s in block
                                 if isinstance(s, ast.ImportFrom) and (s.module or "").startswith("sglang")
                                 for a in s.names] for block in blocks]
                alternatives = [a for a in alternatives if a]
                if alternatives:
                    groups.append((path.name, node.lineno, alternatives))
                    in_try.update(id(s) for block in blocks for s in block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sglang") and id(node) not in in_try:
                groups.append((path.name, node.lineno,
                               [[(node.module, a.name, a.asname or a.name) for a in node.names]]))
    return groups


@pytest.mark.parametrize("version", versions("test_the_sglang_names_our_code_imports_exist"))
def test_the_sglang_names_our_code_imports_exist(sgl, version):
    groups = _sglang_import_groups()
    assert groups, "no SGLang imports found in our package"
    for file, line, alternatives in groups:
        resolved = [alt for alt in alternatives if all(sgl.defines(m, n) for m, n, _ in alt)]
        assert resolved, f"{file}:{line}: none of {alternatives} exists in SGLang {version}"


@pytest.mark.parametrize("version", versions("test_the_arguments_we_pass_sglangs_functions_exist"))
def test_the_arguments_we_pass_sglangs_functions_exist(sgl, version):
    checked = 0
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            bound: dict[str, tuple] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sglang"):
                    for a in node.names:
                        if sgl.defines(node.module, a.name):
                            bound.setdefault(a.asname or a.name, (node.module, a.name))
            for call in ast.walk(fn):
                if not isinstance(call, ast.Call):
                    continue
                func = call.func
                if isinstance(func, ast.Name) and func.id in bound:
                    module, qualname = bound[func.id][0], bound[func.id][1]
                elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in bound:
                    module, qualname = bound[func.value.id][0], f"{bound[func.value.id][1]}.{func.attr}"
                else:
                    continue
                found = sgl.parameters(module, qualname)
                assert found is not None, (f"{path.name}:{call.lineno}: {module}.{qualname} "
                                           f"not found in SGLang {version}")
                names, takes_kwargs = found
                unknown = [kw.arg for kw in call.keywords if kw.arg and kw.arg not in names and not takes_kwargs]
                assert not unknown, f"{path.name}:{call.lineno}: {qualname} of SGLang {version} has no {unknown}"
                assert len(call.args) <= len(names) or takes_kwargs
                checked += 1
    # FlattenedTensorBucket(...), MultiprocessingSerializer.serialize(...), init_custom_process_group(...)
    assert checked >= 3


@pytest.mark.parametrize("version", versions("test_weights_travel_as_the_servers_bucket_format"))
def test_weights_travel_as_the_servers_bucket_format(sgl, traffic, version):
    bucket_file = "sglang/srt/weight_sync/tensor_bucket.py"
    assert sgl.class_attribute(bucket_file, "FlattenedTensorBucket", "supports_multi_dtypes") is True
    assert version_mod.protocol_for(version).multi_dtype_buckets is True  # our table
    for method in ("get_flattened_tensor", "get_metadata"):
        assert sgl.function_source(bucket_file, f"FlattenedTensorBucket.{method}") is not None, method
    # over HTTP, serialized_named_tensors are base64 strings (pydantic decodes them: Base64Bytes) ...
    annotation = sgl.req_inputs["UpdateWeightsFromTensorReqInput"]["serialized_named_tensors"].annotation
    assert annotation == "Annotated[List[bytes], Base64Bytes()]", annotation
    # ... which is what MultiprocessingSerializer.serialize(..., output_str=True) makes, as we call it
    serialize = sgl.function_source("sglang/srt/utils/common.py", "MultiprocessingSerializer.serialize")
    assert "output_str" in serialize and "b64encode" in serialize
    ours = inspect.getsource(build.sglang_serialize)
    assert "MultiprocessingSerializer.serialize(" in ours and "output_str=True" in ours
    entries = [e for c in traffic.calls if c.path == "/update_weights_from_tensor"
               for e in c.payload["serialized_named_tensors"]]
    assert entries and all(sw.value_matches(annotation, [e]) for e in entries)
    # the tensor-parallel rank i of the server opens entry i (what TensorSyncer gathers)
    worker = sgl.read("sglang/srt/managers/tp_worker.py")
    assert "serialized_named_tensors[" in worker and "tp_rank]" in worker


@pytest.mark.parametrize("version", versions("test_sampling_seeds_need_deterministic_inference"))
def test_sampling_seeds_need_deterministic_inference(sgl, version):
    """docs/sglang.md: the per-request sampling_seed is honoured under --enable-deterministic-inference."""
    assert sgl.sampling_seed_needs_deterministic() is True, sgl.where(sw.SAMPLING_BATCH_INFO)
    assert sgl.cli_flags["--enable-deterministic-inference"].kind == "store_true"


# ---- the wheel reader itself (no download) -------------------------------------------------------------

def test_annotations_are_checked_for_simple_types_and_unknown_ones_are_not_guessed():
    ok = [("Optional[str]", None), ("Optional[str]", "7"), ("int", 3), ("float", 3), ("bool", False),
          ("List[List[int]]", [[1], [2, 3]]), ("Optional[Union[List[int], int]]", [1]),
          ('Literal["abort", "retract", "in_place"]', "retract"), ("Dict[str, Any]", {"a": 1}),
          ("Annotated[List[bytes], Base64Bytes()]", ["aGk="]), ("Set[int]", [2])]
    bad = [("int", True), ("int", 1.5), ("bool", 1), ("str", None), ("List[int]", [1, "2"]),
           ('Literal["abort", "retract"]', "retracted"), ("Annotated[List[bytes], Base64Bytes()]", ["not base64!"]),
           ("Optional[List[str]]", "kv_cache")]
    assert [sw.value_matches(a, v) for a, v in ok] == [True] * len(ok)
    assert [sw.value_matches(a, v) for a, v in bad] == [False] * len(bad)
    assert sw.value_matches("MultimodalDataInputFormat", [1]) is None  # an alias: not judged


def _fake_wheel(path: Path, version: str) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"sglang-{version}.dist-info/METADATA", f"Name: sglang\nVersion: {version}\n")
        zf.writestr(sw.HTTP_SERVER, '@app.get("/health")\nasync def health():\n    """Liveness."""\n')


def test_the_wheel_is_downloaded_once_then_reused(tmp_path, monkeypatch):
    runs = []

    def pip(version, dest, extra, timeout_s):
        runs.append(extra)
        _fake_wheel(Path(dest) / f"sglang-{version}-py3-none-any.whl", version)
        return 0, "Saved"

    monkeypatch.setattr(sw, "_pip_download", pip)
    first = sw.download_wheel("9.9.9", tmp_path)
    assert first.parent == tmp_path and sw.download_wheel("9.9.9", tmp_path) == first and len(runs) == 1
    source = sw.SGLangSource("9.9.9", first)
    assert [(r.path, sorted(r.methods)) for r in source.routes] == [("/health", ["GET"])]
    with pytest.raises(sw.SGLangSourceError, match="not SGLang 9.9.8"):
        sw.SGLangSource("9.9.8", first)
    monkeypatch.setenv(sw.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert sw.cache_dir() == tmp_path / "elsewhere"


def test_an_unreachable_registry_skips_or_fails_as_configured(tmp_path, monkeypatch):
    calls = []

    def pip(version, dest, extra, timeout_s):
        calls.append(version)
        return 1, ("WARNING: Retrying after connection broken by 'NewConnectionError(... Connection refused)'\n"
                   "ERROR: No matching distribution found for sglang==" + version)

    monkeypatch.setattr(sw, "_pip_download", pip)
    monkeypatch.setattr(sw, "_SOURCES", {})
    monkeypatch.setattr(sw, "_FAILURES", {})
    monkeypatch.setenv(sw.CACHE_ENV, str(tmp_path))
    with pytest.raises(sw.SGLangWheelUnavailable, match="No matching distribution") as info:
        sw.source("9.9.1")
    assert info.value.unreachable and calls == ["9.9.1"]  # no second try with other tags: no network
    with pytest.raises(sw.SGLangWheelUnavailable, match="not trying again"):
        sw.source("9.9.2")  # the registry is down: the next version fails at once
    assert calls == ["9.9.1"]
    monkeypatch.delenv(sw.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="wheel unavailable"):
        sw.source_for_test("9.9.1")
    monkeypatch.setenv(sw.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{sw.REQUIRE_ENV}=1 but"):
        sw.source_for_test("9.9.1")
