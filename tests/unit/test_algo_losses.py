"""policy_loss, value_loss and aggregate against plain float64 loops (semantics section 4)."""

import math
import random

import pytest
import torch

from liteppo_mcore.algo import aggregate, policy_loss, rollout_importance_weight, value_loss

B, T = 8, 9


def make_batch(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, T) for _ in range(B)]
    lengths[0], lengths[1] = 1, T
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4  # ratios well beyond 1 +- 0.2
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    return lengths, mask, logp, old, adv


def ref_policy(logp, old, adv, lengths, clip, dual, low=None, high=None):
    low = clip if low is None else low
    high = clip if high is None else high
    loss = [[0.0] * T for _ in lengths]
    clipfrac = dualfrac = kl = kl1 = frac_low = frac_high = 0.0
    ratio_max = 0.0
    for i, n in enumerate(lengths):
        for t in range(n):
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            plain = -rho * a
            clipped = -min(max(rho, 1 - low), 1 + high) * a
            value = max(plain, clipped)
            clipfrac += clipped > plain
            frac_low += clipped > plain and rho < 1 - low
            frac_high += clipped > plain and rho > 1 + high
            if dual is not None and a < 0 and -dual * a < value:
                value = -dual * a
                dualfrac += 1
            loss[i][t] = value
            kl += (rho - 1) - math.log(rho)
            kl1 -= math.log(rho)
            ratio_max = max(ratio_max, rho)
    return loss, dict(clipfrac_sum=clipfrac, clipfrac_low_sum=frac_low, clipfrac_high_sum=frac_high,
                      dual_clipfrac_sum=dualfrac, approx_kl_k3_sum=kl, approx_kl_k1_sum=kl1, ratio_max=ratio_max,
                      num_tokens=float(sum(lengths)))


@pytest.mark.parametrize("dual", [None, 3.0, 1.5])
def test_policy_loss_matches_reference(dual):
    lengths, mask, logp, old, adv = make_batch(1)
    loss, metrics = policy_loss(logp, old, adv, mask, clip=0.2, dual_clip_ratio=dual)
    ref_loss, ref_metrics = ref_policy(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, dual)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, torch.tensor(ref_loss, dtype=torch.float64), atol=1e-13, rtol=0)
    assert set(metrics) == set(ref_metrics)
    for key, value in ref_metrics.items():
        assert metrics[key].dim() == 0 and abs(metrics[key].item() - value) < 1e-11, key
    assert ref_metrics["clipfrac_sum"] > 0
    if dual == 1.5:
        assert ref_metrics["dual_clipfrac_sum"] > 0


def test_policy_loss_is_finite_with_garbage_at_padding_and_has_correct_gradient():
    lengths, mask, logp, old, adv = make_batch(2)
    logp = logp.clone()
    logp[~mask] = 1e4  # exp would overflow if padding entered the ratio
    old = torch.where(mask, old, float("nan"))
    leaf = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(leaf, old, adv, mask.float(), clip=0.2, dual_clip_ratio=3.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(leaf.grad).all()
    assert (loss[~mask] == 0).all() and (leaf.grad[~mask] == 0).all()
    # d l / d logp: -rho*A where the unclipped term is active (and dual clip is not), else 0
    for i, n in enumerate(lengths):
        for t in range(n):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            plain, clipped = -rho * a, -min(max(rho, 0.8), 1.2) * a
            active = plain >= clipped and not (a < 0 and -3.0 * a < max(plain, clipped))
            expected = -rho * a if active else 0.0
            assert abs(leaf.grad[i, t].item() - expected) < 1e-12


def test_policy_loss_ratio_one_is_minus_advantage_and_float32():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    adv = torch.tensor([[0.5, -2.0, 4.0]])
    loss, metrics = policy_loss(logp, logp.clone(), adv, mask, clip=0.2)
    assert loss.dtype == torch.float32 and loss.tolist() == [[-0.5, 2.0, 0.0]]
    assert metrics["clipfrac_sum"].item() == 0 and metrics["ratio_max"].item() == 1.0


def test_policy_loss_without_valid_tokens():
    zeros = torch.zeros(2, 3)
    loss, metrics = policy_loss(zeros, zeros, zeros, torch.zeros(2, 3, dtype=torch.bool), clip=0.2)
    assert (loss == 0).all() and metrics["ratio_max"].item() == 0.0 and metrics["num_tokens"].item() == 0
    loss, metrics = policy_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3),
                                torch.zeros(0, 3, dtype=torch.bool), clip=0.2)
    assert loss.shape == (0, 3) and metrics["ratio_max"].item() == 0.0


@pytest.mark.parametrize("kwargs, message", [(dict(clip=0.0), "pg_clip"), (dict(clip=0.2, dual_clip_ratio=1.0),
                                                                          "dual_clip_ratio")])
def test_policy_loss_validation(kwargs, message):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=message):
        policy_loss(x, x, x, torch.ones(1, 2), **kwargs)


# ---------------------------------------------------------------- value loss
@pytest.mark.parametrize("clip", [None, 0.3])
def test_value_loss_matches_reference(clip):
    lengths, mask, values, old_values, returns = make_batch(3)
    loss, metrics = value_loss(values, old_values, returns, mask, clip=clip)
    ref = [[0.0] * T for _ in lengths]
    clipfrac = vsum = 0.0
    for i, n in enumerate(lengths):
        for t in range(n):
            v, vo, g = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
            e = (v - g) ** 2
            if clip is not None:
                vc = vo + min(max(v - vo, -clip), clip)
                clipfrac += (vc - g) ** 2 > e
                e = max(e, (vc - g) ** 2)
            ref[i][t] = 0.5 * e
            vsum += v
    assert torch.allclose(loss, torch.tensor(ref, dtype=torch.float64), atol=1e-13, rtol=0)
    assert metrics["vf_clipfrac_sum"].item() == clipfrac
    assert abs(metrics["values_sum"].item() - vsum) < 1e-12
    assert metrics["num_tokens"].item() == sum(lengths)
    if clip is not None:
        assert clipfrac > 0


def test_value_loss_gradient_reaches_values_only_on_valid_tokens():
    lengths, mask, values, old_values, returns = make_batch(4)
    leaf = values.clone().requires_grad_(True)
    loss, _ = value_loss(leaf, old_values, torch.where(mask, returns, float("nan")), mask, clip=None)
    loss.sum().backward()
    assert torch.allclose(leaf.grad, torch.where(mask, values - returns, 0.0), atol=1e-14)


# ---------------------------------------------------------------- aggregation
def ref_aggregate(x, lengths, mode, response_length=None):
    seqs = [sum(x[i][t] for t in range(n)) for i, n in enumerate(lengths)]
    n_tok, n_seq = sum(lengths), sum(1 for n in lengths if n > 0)
    if mode == "token-mean":
        return sum(seqs) / n_tok
    if mode == "seq-mean-token-sum":
        return sum(seqs) / n_seq
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(seqs, lengths) if n > 0) / n_seq
    return sum(seqs) / (n_seq * response_length)


MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_micro_batches_sum_to_the_formula(mode):
    lengths, mask, x, _, _ = make_batch(5)
    lengths[3] = 0  # a response without valid tokens contributes 0 and is not counted
    mask[3] = False
    x = torch.where(mask, x, float("nan"))
    n_tok, n_seq = int(mask.sum()), int((mask.sum(-1) > 0).sum())
    expected = ref_aggregate(torch.where(mask, x, 0.0).tolist(), lengths, mode, response_length=T)
    whole = aggregate(x, mask, mode=mode, num_tokens=n_tok, num_seqs=n_seq, response_length=T)
    assert whole.dim() == 0 and abs(whole.item() - expected) < 1e-13
    parts = [aggregate(x[rows], mask[rows].float(), mode=mode, num_tokens=torch.tensor(n_tok),
                       num_seqs=torch.tensor(float(n_seq)), response_length=T)
             for rows in (slice(0, 3), slice(3, 4), slice(4, B))]
    assert abs(sum(p.item() for p in parts) - expected) < 1e-13


def test_seq_mean_token_mean_with_context_parallel_token_split():
    lengths, mask, x, _, _ = make_batch(6)
    n_seq = B
    expected = ref_aggregate(torch.where(mask, x, 0.0).tolist(), lengths, "seq-mean-token-mean")
    full_counts = mask.sum(-1)
    halves = [(x[:, :4], mask[:, :4]), (x[:, 4:], mask[:, 4:])]  # two CP ranks, each a slice of tokens
    shares = [aggregate(xh, mh, mode="seq-mean-token-mean", num_tokens=int(mask.sum()), num_seqs=n_seq,
                        seq_token_counts=full_counts) for xh, mh in halves]
    assert abs(sum(s.item() for s in shares) - expected) < 1e-13
    wrong = [aggregate(xh, mh, mode="seq-mean-token-mean", num_tokens=int(mask.sum()), num_seqs=n_seq)
             for xh, mh in halves]
    assert abs(sum(s.item() for s in wrong) - expected) > 1e-6  # local counts would be wrong under CP


def test_aggregate_gradient_and_dtype():
    lengths, mask, x, _, _ = make_batch(7)
    leaf = x.float().requires_grad_(True)
    out = aggregate(leaf, mask, mode="token-mean", num_tokens=int(mask.sum()), num_seqs=B)
    assert out.dtype == torch.float32
    out.backward()
    assert torch.allclose(leaf.grad, mask.float() / mask.sum())


def test_aggregate_empty_micro_batch_is_zero_not_nan():
    for mode in MODES:
        out = aggregate(torch.full((2, 3), float("nan")), torch.zeros(2, 3), mode=mode, num_tokens=0, num_seqs=0,
                        response_length=3)
        assert out.item() == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="seq-mean"), "unknown loss_agg_mode"),
    (dict(mode="seq-mean-token-sum-norm"), "response_length"),
    (dict(mode="seq-mean-token-mean", seq_token_counts=torch.ones(3)), "seq_token_counts"),
])
def test_aggregate_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), num_tokens=6, num_seqs=2, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_a_huge_log_ratio_gives_finite_loss_and_gradients(dtype, dual):
    """|log rho| = 100: exp overflows in float32 and bfloat16 (past 88.7); the clamp keeps the loss and
    every gradient finite, with the dual clip on and off, for both signs of the advantage."""
    from liteppo_mcore.algo.losses import LOG_RATIO_BOUND

    old = torch.zeros(4, 3, dtype=dtype)
    logp = torch.tensor([[100.0, 0.1, -100.0]] * 4, dtype=dtype, requires_grad=True)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3, [2.0] * 3, [-0.5] * 3], dtype=dtype)
    mask = torch.ones(4, 3, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, adv, mask, clip=0.2, dual_clip_ratio=dual)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert metrics["ratio_max"] == pytest.approx(math.exp(LOG_RATIO_BOUND), rel=1e-2)
    # a moderate token keeps its exact gradient: rho = e^0.1 = 1.105 lies inside the clip range,
    # so d l / d logp = -rho * A
    rho = math.exp(0.1)
    assert float(logp.grad[0, 1]) == pytest.approx(-rho * 1.0, rel=1e-2)


def test_the_log_ratio_clamp_leaves_realistic_ratios_alone():
    lengths, mask, logp, old, adv = make_batch(3)
    loss, _ = policy_loss(logp, old, adv, mask, clip=0.2)
    ref_loss, _ = ref_policy(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, None)
    assert torch.allclose(loss, torch.tensor(ref_loss, dtype=torch.float64), atol=1e-13, rtol=0)
    far = old + 25.0  # beyond the bound: the ratio is e^20, not e^25
    _, metrics = policy_loss(far, old, -adv.abs(), mask, clip=0.2)
    assert metrics["ratio_max"] == pytest.approx(math.exp(20.0))


@pytest.mark.parametrize("low,high,dual", [(0.2, 0.28, None), (0.1, 0.4, 3.0), (0.3, 0.1, 1.5)])
def test_clip_higher_matches_reference_in_loss_metrics_and_gradient(low, high, dual):
    """pg_clip_low / pg_clip_high: the ratio clipped to [1 - low, 1 + high], against float64 loops; the
    gradient d l / d logp is -rho * A where the unclipped term is active, else 0."""
    lengths, mask, logp, old, adv = make_batch(4)
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(leaf, old, adv, mask, clip=0.2, clip_low=low, clip_high=high, dual_clip_ratio=dual)
    ref_loss, ref_metrics = ref_policy(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, dual, low, high)
    assert torch.allclose(loss, torch.tensor(ref_loss, dtype=torch.float64), atol=1e-13, rtol=0)
    for key, value in ref_metrics.items():
        assert abs(metrics[key].item() - value) < 1e-11, key
    assert ref_metrics["clipfrac_low_sum"] > 0 and ref_metrics["clipfrac_high_sum"] > 0
    assert ref_metrics["clipfrac_low_sum"] + ref_metrics["clipfrac_high_sum"] == ref_metrics["clipfrac_sum"]
    loss.sum().backward()
    for i, n in enumerate(lengths):
        for t in range(n):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            plain, clipped = -rho * a, -min(max(rho, 1 - low), 1 + high) * a
            active = plain >= clipped and not (dual is not None and a < 0 and -dual * a < max(plain, clipped))
            assert leaf.grad[i, t].item() == pytest.approx(-rho * a if active else 0.0, abs=1e-12)
    # the symmetric default is the special case low = high = pg_clip
    same, _ = policy_loss(logp, old, adv, mask, clip=0.2, clip_low=0.2, clip_high=0.2)
    plain, _ = policy_loss(logp, old, adv, mask, clip=0.2)
    assert torch.equal(same, plain)


def test_clip_range_is_checked():
    lengths, mask, logp, old, adv = make_batch(5)
    with pytest.raises(ValueError, match="0 < pg_clip_low < 1"):
        policy_loss(logp, old, adv, mask, clip=0.2, clip_low=1.0)
    with pytest.raises(ValueError, match="pg_clip_high > 0"):
        policy_loss(logp, old, adv, mask, clip=0.2, clip_high=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rollout_importance_weight_is_the_truncated_ratio(dtype):
    g = torch.Generator().manual_seed(7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    log_w = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    log_w[0, 0], log_w[2, 3] = 500.0, -500.0  # beyond exp's range in float32 at both ends
    log_w[1, 3] = float("nan")  # padding: never reaches the output
    log_w.requires_grad_(True)
    weight, metrics = rollout_importance_weight(log_w, mask, threshold=1.5)
    raw = [[math.exp(min(v, 50.0)) for v in row] for row in log_w.detach().double().tolist()]
    want = [[min(r, 1.5) if m else 0.0 for r, m in zip(rr, mm)] for rr, mm in zip(raw, mask.tolist())]
    assert torch.allclose(weight.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-30)
    assert weight.dtype == dtype and not weight.requires_grad  # detached: no gradient through the weight
    valid = [w for row, mm in zip(want, mask.tolist()) for w, m in zip(row, mm) if m]
    truncated = sum(r >= 1.5 for rr, mm in zip(raw, mask.tolist()) for r, m in zip(rr, mm) if m)
    assert metrics["is_weight_sum"].item() == pytest.approx(sum(valid), rel=1e-6)
    assert metrics["is_truncated_sum"].item() == truncated >= 1
    assert metrics["is_weight_max"].item() == 1.5 and torch.isfinite(weight).all()


def test_rollout_importance_weight_checks_the_threshold():
    with pytest.raises(ValueError, match="rollout_is_threshold must be >= 1"):
        rollout_importance_weight(torch.zeros(1, 1), torch.ones(1, 1), threshold=0.9)
