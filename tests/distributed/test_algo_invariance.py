"""Every global statistic of ``algo`` is independent of how whole groups are spread over DP ranks.

Each rank gets a random share of whole groups (one rank may get none) and splits it into micro-batches;
normalized rewards, advantages, running moments and the summed loss shares (and their gradients) must
equal a single process holding the concatenated batch, to 1e-10 in float64.
"""

import random

import pytest
import torch
import torch.distributed as dist

from liteppo_mcore.algo import (
    AGG_MODES,
    RunningMoments,
    aggregate,
    compute_advantages,
    kl_estimate,
    mean_of_sequence_means,
    normalize_rewards,
    policy_loss,
    token_level_rewards,
    value_loss,
)
from liteppo_mcore.parallel import make_allreduce_sum
from tests.distributed.spawn import run_gloo

GROUP, NUM_GROUPS, WIDTH, TOL = 4, 7, 12, 1e-10
REWARD_SETTINGS = {
    "group_global_std": dict(reward_norm="group"),
    "group_local_std": dict(reward_norm="group", div_std_global=False),
    "batch": dict(reward_norm="batch"),
    "batch_shift": dict(reward_norm="batch", reward_shift=True),
    "batch_scale_clip": dict(reward_norm="batch", reward_scale=True, reward_clip=1.0),
    "none_clip": dict(reward_norm=None, reward_clip=0.5),
}


def make_batch(seed):
    """One step's global batch, groups contiguous; float64; one response has no valid tokens."""
    rng = random.Random(seed)
    n = NUM_GROUPS * GROUP
    lengths = [rng.randint(1, WIDTH) for _ in range(n)]
    lengths[5], lengths[9] = 0, WIDTH
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    old_logp = -torch.rand(n, WIDTH, generator=g, dtype=torch.float64) * 3
    return {
        "scores": torch.tensor([float(rng.random() < 0.5) + 0.1 * rng.random() for _ in range(n)],
                               dtype=torch.float64) + 100.0,  # an offset that a naive sumsq would not survive
        "mask": torch.tensor([[float(t < k) for t in range(WIDTH)] for k in lengths], dtype=torch.float64),
        "old_logp": old_logp,
        "logp": old_logp + rand(n, WIDTH, scale=0.3),
        "ref_logp": old_logp + rand(n, WIDTH, scale=0.2),
        "values": rand(n, WIDTH),
        "old_values": rand(n, WIDTH),
    }


def rows_of(groups):
    return [g * GROUP + k for g in groups for k in range(GROUP)]


def partition(seed, world_size, empty_rank=None):
    """Random whole-group shares; ``empty_rank`` gets none."""
    rng = random.Random(seed)
    order = list(range(NUM_GROUPS))
    rng.shuffle(order)
    ranks = [r for r in range(world_size) if r != empty_rank]
    cuts = sorted(rng.sample(range(1, NUM_GROUPS), len(ranks) - 1))
    pieces = [order[a:b] for a, b in zip([0] + cuts, cuts + [NUM_GROUPS])]
    shares = [[] for _ in range(world_size)]
    for rank, piece in zip(ranks, pieces):
        shares[rank] = piece
    return shares


def compute_everything(batch, allreduce_sum, num_micro_batches):
    """Per-row outputs (``rows/*``), loss shares to be summed over ranks (``share/*``, ``grad/*``),
    and global scalars (``global/*``) for this process's part of the batch."""
    out = {}
    mask, scores = batch["mask"], batch["scores"]
    for name, kwargs in REWARD_SETTINGS.items():
        out[f"rows/reward_{name}"] = normalize_rewards(scores, group_size=GROUP, allreduce_sum=allreduce_sum,
                                                       **kwargs)
    running = RunningMoments()
    for step in range(3):  # three steps, each a different global batch
        out[f"rows/running_{step}"] = normalize_rewards(scores * (step + 1) - step, group_size=GROUP,
                                                        reward_norm="running", running=running,
                                                        allreduce_sum=allreduce_sum)
    out["global/running_state"] = torch.tensor(list(running.state_dict().values()), dtype=torch.float64)

    kl = kl_estimate(batch["old_logp"], batch["ref_logp"], "kl")
    out["global/kl_step"] = mean_of_sequence_means(kl, mask, allreduce_sum=allreduce_sum)
    normalized = out["rows/reward_group_global_std"]
    token_rewards = token_level_rewards(normalized, mask, kl=kl, kl_coef=0.05)
    adv, returns = compute_advantages("gae", mask, token_rewards=token_rewards, values=batch["values"],
                                      gamma=1.0, lambd=0.95, whiten=True, advantage_clip=2.0,
                                      allreduce_sum=allreduce_sum)
    out["rows/adv_gae"], out["rows/returns_gae"] = adv, returns
    out["rows/adv_reinforce"], _ = compute_advantages("reinforce", mask, token_rewards=token_rewards, gamma=0.99,
                                                      whiten=True, allreduce_sum=allreduce_sum)
    out["rows/adv_rloo"], _ = compute_advantages("rloo", mask, token_rewards=token_rewards, group_size=GROUP,
                                                 whiten=True, allreduce_sum=allreduce_sum)
    out["rows/adv_reinforce_pp"], _ = compute_advantages("reinforce_plus_plus", mask, token_rewards=token_rewards,
                                                         gamma=0.99, advantage_clip=2.0, allreduce_sum=allreduce_sum)
    out["rows/adv_grpo"], _ = compute_advantages("grpo", mask, normalized_scores=normalized, whiten=True,
                                                 advantage_clip=1.5, allreduce_sum=allreduce_sum)
    out.update(_loss_shares(batch, adv, returns, allreduce_sum, num_micro_batches))
    return out


def _loss_shares(batch, adv, returns, allreduce_sum, num_micro_batches):
    mask = batch["mask"]
    counts = torch.stack([mask.sum(), (mask.sum(-1) > 0).sum().double()])
    num_tokens, num_seqs = (allreduce_sum(counts) if allreduce_sum else counts).unbind()
    logp = batch["logp"].clone().requires_grad_(True)
    out = {f"share/pg_{mode}": torch.zeros((), dtype=torch.float64) for mode in AGG_MODES}
    out.update({"share/value": torch.zeros((), dtype=torch.float64), "share/kl": torch.zeros((), dtype=torch.float64)})
    metric_sums = torch.zeros(4, dtype=torch.float64)
    total = 0.0
    for rows in torch.arange(mask.shape[0]).tensor_split(num_micro_batches):
        m = mask[rows]
        loss, metrics = policy_loss(logp[rows], batch["old_logp"][rows], adv[rows], m, clip=0.2, dual_clip_ratio=3.0)
        for mode in AGG_MODES:
            share = aggregate(loss, m, mode=mode, num_tokens=num_tokens, num_seqs=num_seqs, response_length=WIDTH)
            out[f"share/pg_{mode}"] = out[f"share/pg_{mode}"] + share.detach()
            total = total + share * (1.0 + AGG_MODES.index(mode))  # a weighted sum: every mode's gradient
        kl_loss = kl_estimate(logp[rows], batch["ref_logp"][rows], "k3")
        out["share/kl"] += aggregate(kl_loss, m, mode="token-mean", num_tokens=num_tokens, num_seqs=num_seqs).detach()
        vloss, vmetrics = value_loss(batch["values"][rows], batch["old_values"][rows], returns[rows], m, clip=0.2)
        out["share/value"] += 0.5 * aggregate(vloss, m, mode="seq-mean-token-mean", num_tokens=num_tokens,
                                              num_seqs=num_seqs)
        metric_sums += torch.stack([metrics["clipfrac_sum"], metrics["approx_kl_k3_sum"], metrics["approx_kl_k1_sum"],
                                    vmetrics["vf_clipfrac_sum"]])
    if torch.is_tensor(total):
        total.backward()
    out["rows/grad_logp"] = logp.grad if logp.grad is not None else torch.zeros_like(logp)
    out["share/metric_sums"] = metric_sums
    out["global/counts"] = torch.stack([num_tokens, num_seqs])
    return out


def _invariance_worker(rank, world_size, batch, shares):
    rows = rows_of(shares[rank])
    local = {k: v[rows] for k, v in batch.items()}
    result = compute_everything(local, make_allreduce_sum(dist.group.WORLD), num_micro_batches=2)
    return {k: v.detach() for k, v in result.items()}


def _max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("world_size, empty_rank, seed", [(2, None, 3), (4, 2, 4)])
def test_distributed_equals_single_process(world_size, empty_rank, seed):
    batch = make_batch(seed)
    shares = partition(seed, world_size, empty_rank)
    results = run_gloo(_invariance_worker, world_size, batch, shares, timeout=90)

    order = rows_of([g for share in shares for g in share])  # the concatenated batch
    single = compute_everything({k: v[order] for k, v in batch.items()}, None, num_micro_batches=1)
    assert single["rows/adv_gae"].abs().max() > 0.1 and single["share/pg_token-mean"].abs() > 1e-6
    for key, expected in single.items():
        kind = key.split("/")[0]
        if kind == "rows":
            got = torch.cat([r[key] for r in results])
            assert got.shape == expected.shape, key
            assert _max_diff(got, expected.detach()) <= TOL, key
        elif kind == "share":
            assert _max_diff(sum(r[key] for r in results), expected.detach()) <= TOL, key
        else:
            for r in results:
                assert _max_diff(r[key], expected) <= TOL * max(1.0, expected.abs().max().item()), key
    if empty_rank is not None:
        assert results[empty_rank]["rows/adv_gae"].shape == (0, WIDTH)
