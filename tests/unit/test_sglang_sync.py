"""Weight sync and the engine's collective behaviour against stand-in SGLang servers.

These tests check OUR side of the protocol: the order pause -> flush -> update -> continue, the payloads
of update_weights_from_tensor / init_weights_update_group / update_weights_from_distributed, the weight
check, memory release, and generation through `SGLangEngine`. They do not run SGLang: collectives are
replaced by single-process stand-ins and tensors are "serialized" as plain descriptions.
"""

import pytest
import torch

from liteppo_mcore.rollout.engine import SamplingParams
from liteppo_mcore.rollout.sglang.client import ServerClient, SGLangServerError
from liteppo_mcore.rollout.sglang.engine import SGLangEngine
from liteppo_mcore.rollout.sglang.weight_sync import (DistributedSyncer, TensorSyncer, WeightChecker,
                                                      init_weights_update_group, split_by_dtype)
from tests.sglang_standin import StandIn


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
    return {"names": [n for n, _ in bucket], "dtype": str(bucket[0][1].dtype)}, bucket


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


def test_split_by_dtype_keeps_first_seen_order():
    bucket, _ = _buckets()
    groups = split_by_dtype(bucket[0] + bucket[1])
    assert [[n for n, _ in g] for g in groups] == [["model.norm.weight"], ["model.embed_tokens.weight", "lm_head.weight"]]


def test_colocated_sync_order_and_payloads(servers):
    buckets, norm = _buckets()
    [(standin, client)] = servers(1, weights={"model.norm.weight": norm.tolist()})
    ops = FakeOps(group_size=2)
    TensorSyncer(client, ops, describe, WeightChecker(True)).sync(iter(buckets))
    assert standin.paths() == ["/pause_generation", "/flush_cache", "/update_weights_from_tensor",
                               "/update_weights_from_tensor", "/update_weights_from_tensor",
                               "/get_weights_by_name", "/continue_generation"]
    assert standin.payloads("/pause_generation") == [{"mode": "retract"}]
    updates = standin.payloads("/update_weights_from_tensor")
    assert all(u["load_format"] == "flattened_bucket" and u["flush_cache"] is False for u in updates)
    assert all(len(u["serialized_named_tensors"]) == 2 for u in updates)  # one entry per server TP rank
    assert [u["serialized_named_tensors"][0]["names"] for u in updates] == [
        ["model.norm.weight"], ["model.embed_tokens.weight"], ["lm_head.weight"]]
    assert standin.payloads("/get_weights_by_name")[0]["name"] == "model.norm.weight"
    assert all(error is None for error in ops.agreed)


def test_non_leader_sends_nothing_but_joins_every_collective(servers):
    buckets, _ = _buckets()
    ops = FakeOps()
    TensorSyncer(None, ops, describe).sync(buckets)
    assert ops.agreed == [None] * 6  # pause+flush, three dtype buckets, check, continue


def test_a_failed_update_is_agreed_and_raised_without_continuing(servers):
    [(standin, client)] = servers(1, answers={"/update_weights_from_tensor": {"success": False, "message": "no such weight"}})
    ops = FakeOps()
    with pytest.raises(SGLangServerError, match="no such weight"):
        TensorSyncer(client, ops, describe).sync(_buckets()[0])
    assert "/continue_generation" not in standin.paths()
    assert "no such weight" in ops.agreed[-1]


def test_weight_check_catches_a_mismatch(servers):
    buckets, norm = _buckets()
    [(_, client)] = servers(1, weights={"model.norm.weight": (norm + 1).tolist()})
    with pytest.raises(SGLangServerError, match="weight check failed.*model.norm.weight"):
        TensorSyncer(client, FakeOps(), describe, WeightChecker(True)).sync(buckets)


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


def test_disaggregated_sync_order_payloads_and_broadcasts(servers):
    buckets, _ = _buckets()
    pairs = servers(2)
    sent = []
    DistributedSyncer([c for _, c in pairs], FakeOps(), sent.append, "g").sync(buckets)
    for standin, _ in pairs:
        assert standin.paths() == ["/pause_generation", "/flush_cache", "/update_weights_from_distributed",
                                   "/update_weights_from_distributed", "/continue_generation"]
        first = standin.payloads("/update_weights_from_distributed")[0]
        assert first == {"names": ["model.norm.weight", "model.embed_tokens.weight"],
                         "dtypes": ["float32", "bfloat16"], "shapes": [[8], [4, 3]], "group_name": "g",
                         "flush_cache": False}
    assert [t.shape for t in sent] == [torch.Size([8]), torch.Size([4, 3]), torch.Size([4, 3])]


def test_disaggregated_non_source_ranks_only_agree():
    ops = FakeOps()
    DistributedSyncer([], ops, None, "g").sync(_buckets()[0])
    assert ops.agreed == [None] * 5


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


def test_engine_sleep_wake_and_update_while_asleep(servers):
    [(standin, client)] = servers(1)
    engine = _engine(client)
    engine.sleep()
    engine.sleep()  # idempotent
    engine.update_weights(_buckets()[0])  # wakes first: the weights' memory must be back
    assert standin.paths()[:3] == ["/release_memory_occupation", "/resume_memory_occupation", "/pause_generation"]
    assert standin.payloads("/release_memory_occupation") == [{"tags": None}]
    engine.shutdown()
    engine.shutdown()


def test_disaggregated_engine_never_releases_memory(servers):
    [(standin, client)] = servers(1)
    engine = _engine(client, manages_memory=False)
    engine.sleep()
    engine.wake()
    assert standin.paths() == []
