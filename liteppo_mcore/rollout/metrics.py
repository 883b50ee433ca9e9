"""Checks of the rollout engines against the trainer: log-prob mismatch and weight-sync equality.

The PPO ratio assumes the engine sampled from the policy the trainer recomputes; a drift between the
two (a stale or wrongly converted weight, a kernel difference) shows as a gap between the engine's
per-token log-probs and the trainer's. `logprob_abs_diff` is that gap, averaged over every valid token
of the global batch; `check_weights_equal` finds a broken weight sync directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from liteppo_mcore.parallel.device import collective_device
from liteppo_mcore.parallel.mcore import ParallelGroups

AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over the data-parallel ranks, returns the sum


class WeightSyncError(RuntimeError):
    """The engine's weights differ from the trainer's after a sync."""


def _dp_sum(x: Tensor, groups: ParallelGroups | None, allreduce: AllReduce | None) -> Tensor:
    if allreduce is not None:
        return allreduce(x)
    if groups is not None and groups.dp_size > 1:
        buffer = x.to(collective_device(groups.dp_group))
        dist.all_reduce(buffer, group=groups.dp_group)
        return buffer.to(x.device)
    return x


def logprob_abs_diff(rollout_logp: Tensor, trainer_logp: Tensor, mask: Tensor, *,
                     groups: ParallelGroups | None = None, allreduce: AllReduce | None = None) -> float:
    """Mean of |rollout - trainer| log-prob over every valid token of the GLOBAL batch.

    Each rank passes its DP share `[B, T]`; numerator and token count are summed over DP (the ranks of
    one replica hold the same share, so the DP group counts each token once), either with `allreduce`
    or over `groups.dp_group`. Returns 0.0 when the batch holds no valid token. Collective."""
    m = mask.bool()
    diff = (rollout_logp.double() - trainer_logp.double()).abs()
    stats = torch.stack([torch.where(m, diff, torch.zeros((), dtype=diff.dtype)).sum(), m.sum().double()])
    stats = _dp_sum(stats, groups, allreduce)
    total, count = stats.tolist()
    return total / count if count > 0 else 0.0


def check_weights_equal(engine, exporter, *, atol: float = 0.0) -> int:
    """After a sync, compare every tensor the exporter streams with the engine's copy; returns how many
    tensors were compared on this rank. Collective over the whole job (the stream is), and every rank
    raises the same `WeightSyncError`, naming the first differing tensor and its max difference.

    The engine reports its tensor through `get_weight(name)` (None where this rank holds no copy);
    engines without a copy of the weights (`needs_weight_sync=False`) have nothing to check."""
    if not engine.needs_weight_sync:
        for _ in exporter.buckets():  # keep the collectives of the other ranks matched
            pass
        return 0
    get_weight = getattr(engine, "get_weight", None)
    if get_weight is None:
        raise WeightSyncError(f"rollout.check_weight_sync=true, but the {engine.name} engine cannot report its "
                              "weights (no get_weight). Set rollout.check_weight_sync: false for this engine.")
    first: str | None = None
    compared = 0
    for bucket in exporter.buckets():
        for name, want in bucket:
            got = get_weight(name)
            if got is None:
                continue
            compared += 1
            if first is not None:
                continue
            if got.shape != want.shape:
                first = f"{name}: shape {list(got.shape)} in the engine, {list(want.shape)} in the trainer"
                continue
            diff = (got.detach().to(want.device).double() - want.double()).abs().max().item()
            if not diff <= atol:
                first = f"{name}: max abs difference {diff:.3e} (allowed {atol:g})"
    _raise_everywhere(first, engine.name)
    return compared


def _raise_everywhere(problem: str | None, engine_name: str) -> None:
    """Raise on every rank when any rank found a problem (with the first rank's message)."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p is not None]
    if found:
        raise WeightSyncError(f"the {engine_name} engine's weights differ from the trainer's after the sync: "
                              f"{found[0]}. The weight sync is broken (names or layouts of the exporter and the "
                              "engine disagree); rollouts would not come from the trained policy.")


# A weight-sync check for engines that cannot show their weights (SGLang: its Qwen2/Qwen3 models have no
# get_weights_by_name): the log-probs the engine reports for greedy answers to a fixed probe must match
# the trainer's recomputation of the same tokens. A wrong name, layout or stale push moves them by far
# more than the rounding of two implementations.
PROBE_PROMPTS = 4
PROBE_TOKENS = 8


def probe_tolerance(dtype: torch.dtype) -> float:
    """Largest |engine - trainer| log-prob of a probe token allowed: fp32 kernels differ by ~1e-5; in
    bf16/fp16 each op rounds to 2^-8 relative, which the vocabulary-wide softmax amplifies."""
    return 1e-3 if dtype == torch.float32 else 0.25


def check_probe_logprobs(engine_logp: Tensor, trainer_logp: Tensor, mask: Tensor, *, engine: str,
                         atol: float) -> float:
    """Raise `WeightSyncError` unless the two `[B, T]` log-prob tensors agree within `atol` on every
    valid token; returns the largest difference. Every rank holds the same probe (no collective)."""
    m = mask.bool()
    if not bool(m.any()):
        raise WeightSyncError(f"the {engine} engine answered the weight-check probe with no tokens")
    diff = (engine_logp.double() - trainer_logp.double()).abs()
    worst = float(torch.where(m, diff.nan_to_num(float("inf")), torch.zeros((), dtype=diff.dtype)).max())
    if not worst <= atol:
        raise WeightSyncError(
            f"the {engine} engine's log-probs of the weight-check probe differ from the trainer's by up to "
            f"{worst:.3e} (allowed {atol:g}): the weight sync is broken (names, layouts or a push that did not "
            "arrive); rollouts would not come from the trained policy.")
    return worst
