"""The torch.distributed side of the SGLang engine on two gloo processes, against a stand-in server.

These tests check OUR collectives (gathering serialized buckets to a server's leader, agreeing on
errors so that no rank is left waiting, gathering a replica's shares in member order); they do not run
SGLang. One launch covers every check: process start-up dominates the time.
"""

from types import SimpleNamespace

import torch

from liteppo_mcore.rollout.engine import SamplingParams
from liteppo_mcore.rollout.sglang.build import TorchGroupOps, gather_replica_fn
from liteppo_mcore.rollout.sglang.client import ServerClient, SGLangServerError
from liteppo_mcore.rollout.sglang.cpu_wire import deserialize_cpu_bucket, serialize_cpu_bucket
from liteppo_mcore.rollout.sglang.engine import SGLangEngine
from liteppo_mcore.rollout.sglang.weight_sync import TensorSyncer
from tests.distributed.spawn import run_gloo
from tests.sglang_standin import StandIn


def _describe(bucket):
    return serialize_cpu_bucket(bucket)  # the CPU wire format (cpu_wire.py), which the stand-in decodes


def _two_ranks(rank, world_size, good_url, bad_url):
    import torch.distributed as dist

    server_group = dist.new_group([0, 1], backend="gloo")
    out = {}
    bucket = [("model.norm.weight", torch.full((4,), float(rank + 1)))]
    # colocated tp=2: both ranks serialize, rank 0 (leader) sends the gathered list
    ops = TorchGroupOps(server_group, leader_rank=0, is_leader=rank == 0)
    client = ServerClient(good_url, timeout_s=5, max_retries=0) if rank == 0 else None
    TensorSyncer(client, ops, _describe).sync([bucket])
    # a failing server: every rank raises (nobody waits forever)
    bad = ServerClient(bad_url, timeout_s=5, max_retries=0) if rank == 0 else None
    try:
        TensorSyncer(bad, ops, _describe).sync([bucket])
        out["bad"] = "no error"
    except SGLangServerError as exc:
        out["bad"] = str(exc)
    # a replica of two TP ranks generating on the same server, one share each
    groups = SimpleNamespace(tp_group=dist.group.WORLD, tp_size=2, cp_group=None, cp_size=1,
                             pp_group=None, pp_size=1)
    engine = SGLangEngine(client=ServerClient(good_url, timeout_s=5, max_retries=0), syncer=None, ops=ops,
                          member=rank, members=2, gather_replica=gather_replica_fn(groups), eos_token_ids=(2,))
    results = engine.generate([[1], [2], [3]], SamplingParams(max_new_tokens=4, n=2))
    out["generated"] = [[g.token_ids for g in group] for group in results]
    return out


def test_two_rank_sync_errors_and_replica_gather():
    good, bad = StandIn(), StandIn(answers={"/update_weights_from_tensor": {"success": False, "message": "boom"}})
    try:
        good_url, bad_url = good.start(), bad.start()
        rank0, rank1 = run_gloo(_two_ranks, 2, good_url, bad_url, timeout=90)
    finally:
        good.stop()
        bad.stop()
    [update] = good.payloads("/update_weights_from_tensor")
    sums = [float(sum(t.sum() for _, t in deserialize_cpu_bucket(e))) for e in update["serialized_named_tensors"]]
    assert sums == [4.0, 8.0]  # rank order
    sync = [p for p in good.paths() if p not in ("/server_info", "/get_server_info")][:6]
    assert sync == ["/pause_generation", "/flush_cache", "/begin_weight_update", "/update_weights_from_tensor",
                    "/end_weight_update", "/continue_generation"]  # the stand-in is 0.5.23 by default
    assert "boom" in rank0["bad"] and "boom" in rank1["bad"]
    assert rank0["generated"] == rank1["generated"] and len(rank0["generated"]) == 3
    inputs = sorted(map(tuple, sum((p["input_ids"] for p in good.payloads("/generate")), [])))
    assert inputs == [(1,), (1,), (2,), (2,), (3,), (3,)]  # each prompt generated once, n=2
