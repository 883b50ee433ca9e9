"""GAE, returns, whitening and the advantage dispatcher against plain float64 loops (section 3)."""

import math
import random

import pytest
import torch

from liteppo_mcore.algo import compute_advantages, compute_gae, compute_returns, masked_whiten

B, T = 7, 10


def make_batch(seed, as_float=False):
    rng = random.Random(seed)
    lengths = [rng.randint(1, T) for _ in range(B)]
    lengths[0], lengths[1] = 1, T  # a response of length 1, a truncated one
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return lengths, (mask if as_float else mask.bool()), rewards, values


# ---------------------------------------------------------------- references
def ref_gae(rewards, values, lengths, gamma, lambd):
    adv = [[0.0] * T for _ in lengths]
    ret = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[i][t + 1] if t + 1 < n else 0.0
            delta = rewards[i][t] + gamma * next_value - values[i][t]
            running = delta + gamma * lambd * running
            adv[i][t] = running
            ret[i][t] = running + values[i][t]
    return adv, ret


def ref_returns(rewards, lengths, gamma):
    out = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        for t in range(n):
            out[i][t] = sum(gamma ** (k - t) * rewards[i][k] for k in range(t, n))
    return out


def ref_whiten(x, lengths, eps=1e-8):
    flat = [x[i][t] for i, n in enumerate(lengths) for t in range(n)]
    out = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        for t in range(n):
            out[i][t] = x[i][t]
    if len(flat) < 2:
        return out
    mu = sum(flat) / len(flat)
    var = sum((v - mu) ** 2 for v in flat) / (len(flat) - 1)
    for i, n in enumerate(lengths):
        for t in range(n):
            out[i][t] = (x[i][t] - mu) / math.sqrt(var + eps)
    return out


def as_tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- GAE
@pytest.mark.parametrize("gamma, lambd", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("as_float", [False, True])
def test_gae_matches_reference(gamma, lambd, as_float):
    lengths, mask, rewards, values = make_batch(11, as_float)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lambd=lambd)
    ref_adv, ref_ret = ref_gae(rewards.tolist(), values.tolist(), lengths, gamma, lambd)
    assert torch.allclose(adv, as_tensor(ref_adv), atol=1e-12, rtol=0)
    assert torch.allclose(ret, as_tensor(ref_ret), atol=1e-12, rtol=0)


def test_gae_values_and_rewards_at_padding_have_no_effect():
    lengths, mask, rewards, values = make_batch(12)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.97, lambd=0.9)
    g = torch.Generator().manual_seed(99)
    noisy_values = torch.where(mask, values, torch.randn(B, T, generator=g, dtype=torch.float64) * 100)
    noisy_rewards = torch.where(mask, rewards, torch.randn(B, T, generator=g, dtype=torch.float64) * 100)
    adv2, ret2 = compute_gae(noisy_rewards, noisy_values, mask, gamma=0.97, lambd=0.9)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    nan_values = torch.where(mask, values, float("nan"))
    adv3, _ = compute_gae(rewards, nan_values, mask, gamma=0.97, lambd=0.9)
    assert torch.equal(adv, adv3)


def test_gae_hand_computed_and_bootstrap_from_zero():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([[0.0, 1.0, 7.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 9.0], [0.25, 9.0, 9.0]], dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lambd=1.0)
    # row 0: delta1 = 1 - 0.2 = 0.8 (V[2] is padding -> 0); delta0 = 0 + 0.2 - 0.5 = -0.3; A0 = 0.5
    # row 1: length 1, A0 = R0 - V0 = 1.75 (no bootstrap from the padding value 9)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.0], [1.75, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64))


def test_gae_keeps_float32():
    lengths, mask, rewards, values = make_batch(13)
    adv, ret = compute_gae(rewards.float(), values.float(), mask, gamma=1.0, lambd=0.95)
    assert adv.dtype == ret.dtype == torch.float32
    ref_adv, _ = ref_gae(rewards.float().double().tolist(), values.float().double().tolist(), lengths, 1.0, 0.95)
    assert torch.allclose(adv.double(), as_tensor(ref_adv), atol=1e-5)


# ---------------------------------------------------------------- returns and whitening
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_returns_match_reference(gamma):
    lengths, mask, rewards, _ = make_batch(14, as_float=True)
    got = compute_returns(rewards, mask, gamma=gamma)
    assert torch.allclose(got, as_tensor(ref_returns(rewards.tolist(), lengths, gamma)), atol=1e-12, rtol=0)


def test_masked_whiten_matches_reference_and_ignores_padding():
    lengths, mask, x, _ = make_batch(15)
    x = torch.where(mask, x * 3 + 2, float("inf"))
    got = masked_whiten(x, mask)
    expected = ref_whiten(torch.where(mask, x, 0.0).tolist(), lengths)
    assert torch.allclose(got, as_tensor(expected), atol=1e-12, rtol=0)


def test_masked_whiten_skips_with_fewer_than_two_tokens():
    x = torch.tensor([[3.0, 8.0], [5.0, 1.0]])
    one = torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)
    assert masked_whiten(x, one).tolist() == [[0.0, 0.0], [5.0, 0.0]]
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert masked_whiten(x, none).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    two = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    got = masked_whiten(x, two)  # values 3 and 5: mean 4, unbiased var 2
    assert torch.allclose(got, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]) / math.sqrt(2.0 + 1e-8))
    assert got.dtype == torch.float32


# ---------------------------------------------------------------- dispatcher
def test_grpo_equals_reinforce_with_gamma_one_and_no_kl():
    lengths, mask, _, _ = make_batch(16)
    scores = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rewards = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        rewards[i, n - 1] = scores[i]
    a_grpo, g_grpo = compute_advantages("grpo", mask, normalized_scores=scores, whiten=True)
    a_rf, g_rf = compute_advantages("reinforce", mask, token_rewards=rewards, gamma=1.0, whiten=True)
    assert torch.allclose(a_grpo, a_rf, atol=1e-12) and torch.allclose(g_grpo, g_rf, atol=1e-12)
    for i, n in enumerate(lengths):
        assert g_grpo[i, :n].tolist() == [scores[i].item()] * n


def ref_rloo(rewards, lengths, group):
    totals = [sum(rewards[i][t] for t in range(n)) for i, n in enumerate(lengths)]
    out = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        start = i - i % group
        others = [totals[j] for j in range(start, start + group) if j != i]
        for t in range(n):
            out[i][t] = totals[i] - sum(others) / len(others)
    return out


@pytest.mark.parametrize("group", [2, 4])
def test_rloo_matches_reference(group):
    lengths, mask, rewards, _ = make_batch(18)
    lengths, mask, rewards = lengths[:4], mask[:4], rewards[:4]  # whole groups of 2 and of 4
    adv, ret = compute_advantages("rloo", mask, token_rewards=rewards, group_size=group)
    assert torch.allclose(adv, as_tensor(ref_rloo(rewards.tolist(), lengths, group)), atol=1e-12, rtol=0)
    assert torch.equal(adv, ret)
    # the n / (n - 1) form: leave-one-out equals the group-centred sum scaled
    totals = (rewards * mask).sum(1).reshape(-1, group)
    centred = (totals - totals.mean(1, keepdim=True)) * group / (group - 1)
    assert torch.allclose(adv[:, 0], centred.reshape(-1), atol=1e-12)
    # whitening and the clip apply on top
    white, _ = compute_advantages("rloo", mask, token_rewards=rewards, group_size=group, whiten=True,
                                  advantage_clip=0.7)
    ref = [[min(max(v, -0.7), 0.7) for v in row] for row in ref_whiten(ref_rloo(rewards.tolist(), lengths, group),
                                                                        lengths)]
    assert torch.allclose(white, as_tensor(ref), atol=1e-12, rtol=0)


def test_rloo_needs_whole_groups_of_two():
    mask = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs group_size"):
        compute_advantages("rloo", mask, token_rewards=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at least 2"):
        compute_advantages("rloo", mask, token_rewards=torch.zeros(3, 2), group_size=1)
    with pytest.raises(ValueError, match="does not divide the 3 responses"):
        compute_advantages("rloo", mask, token_rewards=torch.zeros(3, 2), group_size=2)


@pytest.mark.parametrize("whiten", [False, True])
def test_reinforce_plus_plus_is_whitened_discounted_returns(whiten):
    lengths, mask, rewards, _ = make_batch(19)
    adv, ret = compute_advantages("reinforce_plus_plus", mask, token_rewards=rewards, gamma=0.9, whiten=whiten,
                                  advantage_clip=1.2)
    returns = ref_returns(rewards.tolist(), lengths, 0.9)
    assert torch.allclose(ret, as_tensor(returns), atol=1e-12, rtol=0)
    want = [[min(max(v, -1.2), 1.2) for v in row] for row in ref_whiten(returns, lengths)]
    assert torch.allclose(adv, as_tensor(want), atol=1e-12, rtol=0)  # whitened once, whiten or not
    assert (adv.abs() == 1.2).any()


def test_dispatcher_gae_whiten_and_clip_match_reference():
    lengths, mask, rewards, values = make_batch(17)
    adv, ret = compute_advantages("gae", mask, token_rewards=rewards, values=values, gamma=1.0, lambd=0.95,
                                  whiten=True, advantage_clip=0.5)
    ref_adv, ref_ret = ref_gae(rewards.tolist(), values.tolist(), lengths, 1.0, 0.95)
    white = ref_whiten(ref_adv, lengths)
    clipped = [[min(max(v, -0.5), 0.5) for v in row] for row in white]
    assert torch.allclose(adv, as_tensor(clipped), atol=1e-12, rtol=0)
    assert torch.allclose(ret, as_tensor(ref_ret), atol=1e-12, rtol=0)
    assert (adv.abs() == 0.5).any()


@pytest.mark.parametrize(
    "estimator, kwargs, message",
    [
        ("vtrace", {}, "unknown adv_estimator"),
        ("gae", {"token_rewards": torch.zeros(2, 3)}, "needs values"),
        ("reinforce", {}, "needs token_rewards"),
        ("rloo", {}, "needs token_rewards"),
        ("reinforce_plus_plus", {}, "needs token_rewards"),
        ("grpo", {}, "needs normalized_scores"),
        ("grpo", {"normalized_scores": torch.zeros(2), "advantage_clip": -1.0}, "advantage_clip"),
        ("grpo", {"normalized_scores": torch.zeros(3)}, "normalized_scores must be"),
    ],
)
def test_dispatcher_validation(estimator, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_advantages(estimator, torch.ones(2, 3, dtype=torch.bool), **kwargs)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), gamma=1.0, lambd=1.0)
