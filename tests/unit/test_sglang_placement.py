"""Placement arithmetic of the SGLang engine: which server each trainer rank uses (pure, no I/O)."""

import pytest

from liteppo_mcore.rollout.sglang.placement import (
    colocated_server_groups,
    colocated_slot,
    disaggregated_url,
    replica_member,
    share_bounds,
    weight_group_offsets,
)


@pytest.mark.parametrize("tp, expected_servers", [
    (1, list(range(16))),
    (2, [r // 2 for r in range(16)]),
    (4, [r // 4 for r in range(16)]),
])
def test_colocated_server_of_each_rank_two_nodes_of_eight(tp, expected_servers):
    slots = [colocated_slot(rank, rank % 8, 8, tp) for rank in range(16)]
    assert [s.server_index for s in slots] == expected_servers
    assert [s.is_leader for s in slots] == [rank % tp == 0 for rank in range(16)]
    assert [s.leader_rank for s in slots] == [rank - rank % tp for rank in range(16)]
    assert [s.base_gpu_id for s in slots] == [(rank % 8) - (rank % 8) % tp for rank in range(16)]
    assert slots[11].group_ranks == tuple(range(11 - 11 % tp, 11 - 11 % tp + tp))


def test_colocated_server_groups_match_the_slots():
    groups = colocated_server_groups(8, 4, 2)
    assert groups == [(0, 1), (2, 3), (4, 5), (6, 7)]
    for rank in range(8):
        slot = colocated_slot(rank, rank % 4, 4, 2)
        assert groups[slot.server_index] == slot.group_ranks


def test_colocated_tp_must_divide_the_node():
    with pytest.raises(ValueError, match="must divide the ranks per node.*disaggregated"):
        colocated_slot(0, 0, 6, 4)
    with pytest.raises(ValueError, match="must divide"):
        colocated_server_groups(12, 6, 4)
    with pytest.raises(ValueError, match="inconsistent"):
        colocated_slot(1, 5, 4, 1)


def test_disaggregated_spreads_dp_ranks_over_servers():
    urls = ["http://a", "http://b", "http://c"]
    assert [disaggregated_url(urls, dp, 0, 1) for dp in range(6)] == urls * 2
    # two members per replica: the slots (dp, member) are dealt round-robin
    assert [disaggregated_url(urls, dp, m, 2) for dp in range(2) for m in range(2)] == [
        "http://a", "http://b", "http://c", "http://a"]
    with pytest.raises(ValueError, match="server_urls"):
        disaggregated_url([], 0, 0, 1)


def test_replica_member_order_and_shares_cover_every_prompt():
    members = [replica_member(tp, 2, pp, cp, 2) for pp in range(2) for cp in range(2) for tp in range(2)]
    assert members == list(range(8))
    for n in (0, 1, 5, 8, 13):
        bounds = [share_bounds(n, m, 4) for m in range(4)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_weight_update_group_offsets():
    assert weight_group_offsets([2, 4, 1]) == ([1, 3, 7], 8)
    assert weight_group_offsets([]) == ([], 1)
