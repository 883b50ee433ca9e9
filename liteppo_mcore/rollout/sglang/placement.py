"""Which SGLang server each trainer rank talks to. Pure arithmetic, no I/O, so it is tested on CPU.

Colocated: servers run on the training GPUs; the `rollout.tp` consecutive local ranks of a node share
one server, which the first of them (the leader) launches and feeds during weight syncs.
Disaggregated: servers run elsewhere (`rollout.server_urls`); generation slots are spread over them.

Within one model replica (the TP x PP x CP ranks of a DP rank, which receive identical prompts) each
member generates a contiguous share of the prompts on its own server, and the shares are then gathered
so that every member returns the same results (the engine protocol's collective contract).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ColocatedSlot:
    """This rank's place among the colocated servers."""

    server_index: int               # global index of the server (node-major)
    leader_rank: int                # global rank that launches and feeds the server
    is_leader: bool
    base_gpu_id: int                # first local GPU of the server (SGLang's --base-gpu-id)
    group_ranks: tuple[int, ...]    # global ranks sharing the server, leader first


def colocated_slot(rank: int, local_rank: int, local_world_size: int, rollout_tp: int) -> ColocatedSlot:
    """The server of `rank` when `rollout_tp` consecutive local ranks share one server.

    Assumes torchrun's layout: the ranks of a node are contiguous and local rank i drives local GPU i.
    """
    if rollout_tp < 1:
        raise ValueError(f"rollout.tp must be >= 1, got {rollout_tp}")
    if local_world_size % rollout_tp:
        raise ValueError(
            f"rollout.tp={rollout_tp} must divide the ranks per node ({local_world_size}) in colocated "
            f"mode: a server uses consecutive GPUs of one node. Pick a divisor, or use "
            f"rollout.mode=disaggregated for servers larger than a node.")
    if not 0 <= local_rank < local_world_size or local_rank > rank:
        raise ValueError(f"inconsistent ranks: rank={rank} local_rank={local_rank} "
                         f"local_world_size={local_world_size}")
    node = (rank - local_rank) // local_world_size
    offset = local_rank % rollout_tp
    leader = rank - offset
    server_index = node * (local_world_size // rollout_tp) + local_rank // rollout_tp
    return ColocatedSlot(server_index=server_index, leader_rank=leader, is_leader=offset == 0,
                         base_gpu_id=local_rank - offset,
                         group_ranks=tuple(range(leader, leader + rollout_tp)))


def colocated_server_groups(world_size: int, local_world_size: int, rollout_tp: int) -> list[tuple[int, ...]]:
    """Every server's ranks, in server order (each rank must create the same groups in the same order)."""
    if world_size % local_world_size:
        raise ValueError(f"world size {world_size} is not a multiple of the ranks per node {local_world_size}")
    if local_world_size % rollout_tp:
        colocated_slot(0, 0, local_world_size, rollout_tp)  # raises the explanatory error
    return [tuple(range(first, first + rollout_tp)) for first in range(0, world_size, rollout_tp)]


def replica_member(tp_rank: int, tp_size: int, pp_rank: int, cp_rank: int, cp_size: int) -> int:
    """Index of this rank among its replica's members, ordered pp-major, then cp, then tp (the order in
    which `gather_replica` concatenates shares)."""
    return (pp_rank * cp_size + cp_rank) * tp_size + tp_rank


def share_bounds(num_items: int, member: int, members: int) -> tuple[int, int]:
    """[start, end) of member `member`'s contiguous share of `num_items` (sizes differ by at most one)."""
    if not 0 <= member < members:
        raise ValueError(f"member {member} out of range for {members} members")
    base, extra = divmod(num_items, members)
    start = member * base + min(member, extra)
    return start, start + base + (1 if member < extra else 0)


def disaggregated_url(urls: Sequence[str], dp_rank: int, member: int, members: int) -> str:
    """Server for one generation slot: slots (dp_rank, member) are dealt round-robin over the URLs, so
    DP ranks spread evenly and a replica's members use different servers when there are enough."""
    if not urls:
        raise ValueError("rollout.mode=disaggregated needs rollout.server_urls (or LITEPPO_SGLANG_URLS)")
    return urls[(dp_rank * members + member) % len(urls)]


def weight_group_offsets(server_tp_sizes: Sequence[int]) -> tuple[list[int], int]:
    """Rank offsets of the servers in the weights-update group (rank 0 is the trainer's source rank)
    and the group's world size."""
    offsets, next_rank = [], 1
    for size in server_tp_sizes:
        offsets.append(next_rank)
        next_rank += int(size)
    return offsets, next_rank
