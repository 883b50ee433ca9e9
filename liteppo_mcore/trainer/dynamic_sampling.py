"""Dynamic sampling (DAPO; `filter_groups`, `filter_groups_max_rounds`): a step trains only on groups
whose raw rewards are not all equal, topped up from further rollout rounds.

One step with `filter_groups: true` (trainer/loop.py `Trainer._sampled_rollout`):

1. round r = 0, 1, ...: the sampler's next `rollout_batch_size` prompts, sharded over DP as without
   filtering, sampled with the seed `round_seed(seed, step, r, dp_rank)` (round 0: the seed of a step
   without filtering), then scored (raw scores, before any normalization);
2. a group (the n consecutive responses of one prompt) is informative when its raw rewards are not all
   equal (`informative_groups`); the rounds stop once all DP ranks together hold `rollout_batch_size`
   informative groups, or after `filter_groups_max_rounds` rounds;
3. the step keeps `kept_groups(...)` of them (the N' rule), the first ones in the global order round,
   DP rank, position (`take_first`);
4. the kept groups are spread evenly over the DP ranks, rank d holding the d-th of dp equal contiguous
   slices of that order (`spread_kept`, after the ranks exchange their kept groups).

Everything here is pure (no collective) but `gather_objects`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from liteppo_mcore.parallel.reducer import group_world_size
from liteppo_mcore.trainer.experience import Rollout, concat_rollouts, select_responses
from liteppo_mcore.utils.seeds import mix_seed


def round_seed(seed: int, step: int, round_index: int, dp_rank: int) -> int:
    """The sampling seed of rollout round `round_index` (0-based) of step `step` (1-based) on DP rank
    `dp_rank`: round 0 has the seed of a step without filtering, `mix_seed(seed, step - 1, dp_rank)`;
    round r > 0 has `mix_seed(seed, step - 1, dp_rank, r)`."""
    if round_index == 0:
        return mix_seed(seed, step - 1, dp_rank)
    return mix_seed(seed, step - 1, dp_rank, round_index)


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """[G] bool: whether the raw scores of each group of `group_size` consecutive responses are not all
    exactly equal (all equal: every normalized reward of the group is the same, no learning signal)."""
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not form whole groups of {group_size}")
    groups = scores.reshape(-1, group_size)
    return groups.amax(dim=1) != groups.amin(dim=1)


def group_rows(groups: Sequence[int] | Tensor, group_size: int) -> Tensor:
    """The response rows of the groups `groups`, group by group: g*n .. g*n + n - 1."""
    index = torch.as_tensor(groups, dtype=torch.long).reshape(-1, 1)
    return (index * group_size + torch.arange(group_size)).reshape(-1)


def kept_groups(informative: int, *, target: int, group_size: int, mini_batch_size: int, dp_size: int) -> int:
    """How many of `informative` informative groups (over all DP ranks) a step trains on, at most
    `target` (rollout_batch_size).

    The step's N' = kept x group_size responses must split into whole groups per DP rank and into whole
    mini-batches of min(mini_batch_size, N'): N' is the largest such count within the informative
    responses. That is the informative responses (at most target's) rounded down to a multiple of
    lcm(mini_batch_size, group_size x dp_size) when that is > 0 (the target itself, which the
    configuration's validation makes such a multiple, when there are enough); otherwise one mini-batch
    smaller than mini_batch_size: the most groups, a multiple of dp_size, within both the informative
    groups and mini_batch_size responses (0 when fewer than dp_size groups fit: the step makes no update).
    """
    for name, value in (("target", target), ("group_size", group_size), ("mini_batch_size", mini_batch_size),
                        ("dp_size", dp_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if informative < 0:
        raise ValueError(f"informative must be >= 0, got {informative}")
    responses = min(informative, target) * group_size
    whole = math.lcm(mini_batch_size, group_size * dp_size)
    if responses >= whole:
        return responses // whole * whole // group_size
    per_rank_round = group_size * dp_size  # one group on every rank
    return min(responses, mini_batch_size) // per_rank_round * dp_size


def take_first(counts: Sequence[Sequence[int]], total: int) -> list[list[int]]:
    """`counts[r][d]`: informative groups of round r on DP rank d. How many of each to keep (the first
    ones of that round on that rank) so that `total` are kept, taken in the order round, DP rank."""
    left = total
    out = []
    for per_rank in counts:
        row = []
        for count in per_rank:
            take = min(int(count), max(left, 0))
            row.append(take)
            left -= take
        out.append(row)
    if left > 0:
        raise ValueError(f"cannot keep {total} groups out of {sum(map(sum, counts))}")
    return out


def spread_kept(by_rank: Sequence[Sequence[tuple[Rollout, Tensor]]], dp_rank: int, dp_size: int,
                group_size: int) -> tuple[Rollout, Tensor]:
    """`by_rank[d][r]`: the kept (rollout, raw scores) of round r on DP rank d. Their concatenation in the
    order round, DP rank, position, and of it the share of `dp_rank`: the dp_rank-th of `dp_size` equal
    contiguous slices of whole groups."""
    if len(by_rank) != dp_size or len({len(rounds) for rounds in by_rank}) != 1:
        raise ValueError("every DP rank must hand over its kept groups of every round")
    ordered = [by_rank[d][r] for r in range(len(by_rank[0])) for d in range(dp_size)]
    rollout = concat_rollouts([part for part, _ in ordered])
    scores = torch.cat([s for _, s in ordered])
    num_groups = rollout.batch.size // group_size
    if rollout.batch.size % group_size or num_groups % dp_size or num_groups == 0:
        raise ValueError(f"{rollout.batch.size} responses do not make whole groups of {group_size} on each of "
                         f"{dp_size} DP ranks")
    share = num_groups // dp_size
    rows = group_rows(range(dp_rank * share, (dp_rank + 1) * share), group_size)
    return select_responses(rollout, rows), scores[rows]


def gather_objects(obj, group: dist.ProcessGroup | None) -> list:
    """`obj` of every rank of `group`, in rank order (pickled: keep it to plain data and CPU tensors);
    `[obj]` without a collective for a group of one rank."""
    size = group_world_size(group)
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out
