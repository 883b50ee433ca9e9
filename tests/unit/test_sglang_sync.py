"""Weight sync and the engine's collective behaviour against the stand-in SGLang server (a model of the
real server's state machine per version, tests/sglang_standin.py).

These tests check OUR side of the protocol: pause -> flush -> [begin_weight_update] -> one update per
bucket (every dtype in it, with the weight_version) -> [end_weight_update] -> continue, the payloads of
update_weights_from_tensor / init_weights_update_group / update_weights_from_distributed, memory
release and resume in the order weights -> push -> KV cache, the refusal to generate on released
weights, the weight-version check, and generation through `SGLangEngine`. Collectives are replaced by
single-process stand-ins; buckets travel in the CPU wire format (cpu_wire.py), which the stand-in decodes.
"""

import pytest
import torch

from liteppo_mcore.rollout.engine import SamplingParams
from liteppo_mcore.rollout.sglang.client import ServerClient, SGLangServerError
from liteppo_mcore.rollout.sglang.cpu_wire import deserialize_cpu_bucket, serialize_cpu_bucket
from liteppo_mcore.rollout.sglang.engine import SGLangEngine
from liteppo_mcore.rollout.sglang.weight_sync import DistributedSyncer, TensorSyncer, init_weights_update_group
from tests.sglang_standin import StandIn

VERSIONS = ("0.5.20", "0.5.23")
SESSION = {"0.5.20": [], "0.5.23": ["/begin_weight_update", "/end_weight_update"]}


def _updates(version, path, count):
    begin, end = (SESSION[version] + [None, None])[:2]
    return [p for p in ["/pause_generation", "/flush_cache", begin, *[path] * count, end, "/continue_generation"] if p]


def posted(standin):
    """The POSTs the server received (reading /server_info at connect is not part of a sync)."""
    return [p for p in standin.paths() if p not in ("/server_info", "/get_server_info", "/health")]


class FakeOps:
    """Collectives of one rank whose server group has `group_size` identical members."""

    def __init__(self, group_size=1):
        self.group_size = group_size
        self.agreed = []

    def gather_to_leader(self, obj):
        return [obj] * self.group_size

    def agree(self, error):
        self.agreed.append(error)
        return error


def describe(bucket):
    """The serializer the engine uses without CUDA (cpu_wire.py): what the stand-in decodes."""
    return serialize_cpu_bucket(bucket)


def names_of(update):
    """The tensor names of each TP rank's entry of one update_weights_from_tensor payload."""
    return [[n for n, _ in deserialize_cpu_bucket(entry)] for entry in update["serialized_named_tensors"]]


@pytest.fixture
def servers():
    made = []

    def make(n=1, **kwargs):
        out = []
        for _ in range(n):
            standin = StandIn(**kwargs)
            made.append(standin)
            out.append((standin, ServerClient(standin.start(), timeout_s=5, max_retries=1, retry_delay_s=0.01)))
        return out

    yield make
    for standin in made:
        standin.stop()


def _buckets():
    norm = torch.linspace(0.5, 1.5, 8)
    return [[("model.norm.weight", norm), ("model.embed_tokens.weight", torch.ones(4, 3, dtype=torch.bfloat16))],
            [("lm_head.weight", torch.zeros(4, 3, dtype=torch.bfloat16))]], norm


@pytest.mark.parametrize("version", VERSIONS)
def test_colocated_sync_order_and_payloads(servers, version):
    buckets, _ = _buckets()
    [(standin, client)] = servers(1, version=version)
    ops = FakeOps(group_size=2)
    TensorSyncer(client, ops, describe).sync(iter(buckets), weight_version="7")
    assert posted(standin) == _updates(version, "/update_weights_from_tensor", 2)
    assert standin.payloads("/pause_generation") == [{"mode": "retract"}]
    updates = standin.payloads("/update_weights_from_tensor")
    assert all(u["load_format"] == "flattened_bucket" and u["flush_cache"] is False for u in updates)
    assert all(u["weight_version"] == "7" for u in updates)
    assert all(len(u["serialized_named_tensors"]) == 2 for u in updates)  # one entry per server TP rank
    # one call per bucket, every dtype in it (FlattenedTensorBucket.supports_multi_dtypes)
    assert [names_of(u) for u in updates] == [[["model.norm.weight", "model.embed_tokens.weight"]] * 2,
                                             [["lm_head.weight"]] * 2]
    assert all(error is None for error in ops.agreed)


def test_non_leader_sends_nothing_but_joins_every_collective(servers):
    buckets, _ = _buckets()
    ops = FakeOps()
    TensorSyncer(None, ops, describe).sync(buckets)
    assert ops.agreed == [None] * 5  # pause+flush+begin, two buckets, end, continue


def test_an_update_outside_the_session_is_what_the_server_refuses(servers):
    """The stand-in refuses updates outside a session on 0.5.21+, as the real scheduler does: our
    sync goes through only because it opens one."""
    [(standin, client)] = servers(1, version="0.5.23")
    with pytest.raises(SGLangServerError, match="HTTP 400.*must run between"):
        client.request("/update_weights_from_tensor", {"serialized_named_tensors": [], "flush_cache": False},
                       retries=0)


def test_a_failed_update_closes_the_session_and_stays_paused(servers):
    [(standin, client)] = servers(1, version="0.5.23",
                                  answers={"/update_weights_from_tensor": {"success": False,
                                                                           "message": "no such weight"}})
    ops = FakeOps()
    with pytest.raises(SGLangServerError, match="no such weight"):
        TensorSyncer(client, ops, describe).sync(_buckets()[0])
    assert posted(standin)[-2:] == ["/update_weights_from_tensor", "/end_weight_update"]
    assert "/continue_generation" not in standin.paths()
    assert "no such weight" in ops.agreed[-1]


def test_init_weights_update_group_payloads(servers):
    (a, ca), (b, cb) = servers(2)
    joined = []
    group = init_weights_update_group([ca, cb], [2, 1], master_address="10.0.0.1", master_port=29600,
                                      group_name="g", join=lambda *args: joined.append(args) or "group")
    assert group == "group" and joined == [("10.0.0.1", 29600, 4)]
    assert a.payloads("/init_weights_update_group") == [{"master_address": "10.0.0.1", "master_port": 29600,
                                                         "rank_offset": 1, "world_size": 4, "group_name": "g",
                                                         "backend": "nccl"}]
    assert b.payloads("/init_weights_update_group")[0]["rank_offset"] == 3


@pytest.mark.parametrize("version", VERSIONS)
def test_disaggregated_sync_order_payloads_and_broadcasts(servers, version):
    buckets, _ = _buckets()
    pairs = servers(2, version=version)
    clients = [c for _, c in pairs]
    init_weights_update_group(clients, [1, 1], master_address="127.0.0.1", master_port=29600, group_name="g",
                              join=lambda *args: "group")
    sent = []
    DistributedSyncer(clients, FakeOps(), sent.append, "g").sync(buckets, weight_version="3")
    for standin, _ in pairs:
        assert posted(standin)[1:] == _updates(version, "/update_weights_from_distributed", 2)
        first = standin.payloads("/update_weights_from_distributed")[0]
        assert first == {"names": ["model.norm.weight", "model.embed_tokens.weight"],
                         "dtypes": ["float32", "bfloat16"], "shapes": [[8], [4, 3]], "group_name": "g",
                         "flush_cache": False, "weight_version": "3"}
    assert [t.shape for t in sent] == [torch.Size([8]), torch.Size([4, 3]), torch.Size([4, 3])]


def test_disaggregated_non_source_ranks_only_agree():
    ops = FakeOps()
    DistributedSyncer([], ops, None, "g").sync(_buckets()[0])
    assert ops.agreed == [None] * 5  # start, two buckets, end, continue


def _engine(client, ops=None, **kwargs):
    ops = ops or FakeOps()
    kwargs.setdefault("gather_replica", lambda share: [share])
    kwargs.setdefault("member", 0)
    kwargs.setdefault("members", 1)
    return SGLangEngine(client=client, syncer=TensorSyncer(client, ops, describe), ops=ops,
                        admin_clients=[client], eos_token_ids=(2,), **kwargs)


def test_engine_generate_n_samples_with_default_stop_tokens(servers):
    [(standin, client)] = servers(1)
    engine = _engine(client, stream=1)
    params = SamplingParams(temperature=0.8, max_new_tokens=6, n=2, seed=3)
    results = engine.generate([[1, 2], [3], [4, 5, 6]], params)
    assert [len(group) for group in results] == [2, 2, 2]
    generation = results[0][0]
    assert generation.finish_reason == "stop" and generation.token_ids[-1] == 2
    assert len(generation.logprobs) == len(generation.token_ids) and generation.logprobs[0] == -0.25
    [payload] = standin.payloads("/generate")
    assert len(payload["input_ids"]) == 6 and payload["sampling_params"][0]["stop_token_ids"] == [2]
    short = engine.generate([[1]], SamplingParams(max_new_tokens=2, n=1))
    assert short[0][0].finish_reason == "length" and len(short[0][0].token_ids) == 2


def test_engine_member_sends_only_its_share_and_returns_the_gathered_whole(servers):
    [(standin, client)] = servers(1)
    other = [["from member 0"]] * 2
    engine = _engine(client, member=1, members=2, gather_replica=lambda share: [other, share])
    results = engine.generate([[1], [2], [3], [4]], SamplingParams(max_new_tokens=4))
    assert results[:2] == other and len(results) == 4
    [payload] = standin.payloads("/generate")
    assert payload["input_ids"] == [[3], [4]]


def test_engine_generation_error_is_agreed_by_all_ranks(servers):
    [(_, client)] = servers(1, fail={"/generate": (400, 100)})
    ops = FakeOps()
    with pytest.raises(SGLangServerError, match="generation failed.*HTTP 400"):
        _engine(client, ops).generate([[1]], SamplingParams())
    assert "HTTP 400" in ops.agreed[-1]


def test_memory_comes_back_as_weights_then_push_then_kv_cache(servers):
    [(standin, client)] = servers(1, version="0.5.23")
    engine = _engine(client)
    engine.update_weights(_buckets()[0], weight_version="0")
    engine.sleep()
    engine.sleep()  # idempotent
    assert standin.payloads("/release_memory_occupation") == [{"tags": ["kv_cache", "weights"]}]
    engine.wake()  # the trainer wakes before pushing: only the weights come back
    engine.update_weights(_buckets()[0], weight_version="1")
    memory = [p for p in posted(standin) if "memory" in p or p in ("/begin_weight_update", "/end_weight_update")]
    assert memory[-5:] == ["/release_memory_occupation", "/resume_memory_occupation", "/begin_weight_update",
                           "/end_weight_update", "/resume_memory_occupation"]
    assert standin.payloads("/resume_memory_occupation") == [{"tags": ["weights"]}, {"tags": ["kv_cache"]}]
    assert not engine.asleep
    engine.shutdown()
    engine.shutdown()


def test_generating_on_released_weights_is_impossible(servers):
    [(standin, client)] = servers(1, version="0.5.23")
    engine = _engine(client)
    engine.update_weights(_buckets()[0], weight_version="0")
    engine.sleep()
    for attempt in (lambda: engine.generate([[1]], SamplingParams()),
                    lambda: (engine.wake(), engine.generate([[1]], SamplingParams()))):
        with pytest.raises(SGLangServerError, match="weights were released and not pushed again"):
            attempt()
    assert "/generate" not in standin.paths()
    engine.update_weights(_buckets()[0], weight_version="1")
    assert engine.generate([[1]], SamplingParams(max_new_tokens=2))[0][0].token_ids


def test_a_generation_on_other_weights_is_an_error_naming_both_versions(servers):
    [(standin, client)] = servers(1, version="0.5.23")
    engine = _engine(client)
    engine.update_weights(_buckets()[0], weight_version="4")
    client.request("/update_weight_version", {"new_version": "3"})  # e.g. another trainer's push
    with pytest.raises(SGLangServerError, match="weight_version '3', but the trainer last pushed '4'"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))


def test_disaggregated_engine_never_releases_memory(servers):
    [(standin, client)] = servers(1)
    engine = _engine(client, manages_memory=False)
    engine.sleep()
    engine.wake()
    assert standin.paths() == []
