"""KL estimators, token-level rewards and KL controllers against plain float64 loops (section 2)."""

import math
import random

import pytest
import torch

from liteppo_mcore.algo import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    make_kl_controller,
    mean_of_sequence_means,
    token_level_rewards,
)


def random_lengths_mask(rng, batch, width, min_len=1, as_float=False):
    lengths = [rng.randint(min_len, width) for _ in range(batch)]
    mask = torch.tensor([[1 if t < n else 0 for t in range(width)] for n in lengths])
    return lengths, (mask.double() if as_float else mask.bool())


def ref_kl(a, b, kind):
    d = a - b
    return {"kl": d, "abs": abs(d), "mse": d * d / 2, "k3": math.exp(-d) + d - 1}[kind]


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "k3"])
def test_kl_estimate_matches_formula_elementwise(kind):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    got = kl_estimate(logp, ref, kind)
    assert got.shape == logp.shape and got.dtype == torch.float64
    for i in range(4):
        for t in range(7):
            expected = ref_kl(logp[i, t].item(), ref[i, t].item(), kind)
            assert abs(got[i, t].item() - expected) < 1e-12


def test_k3_is_nonnegative_and_accurate_for_tiny_differences():
    logp = torch.tensor([-1.0, -1.0, -2.0], dtype=torch.float64)
    ref = logp - torch.tensor([1e-9, -1e-9, 0.0], dtype=torch.float64)
    got = kl_estimate(logp, ref, "k3")
    assert (got >= 0).all()
    assert abs(got[0].item() - 0.5e-18) < 1e-24  # ~d^2/2, far below float64 rounding of exp(-d) - 1
    assert got[2].item() == 0.0


@pytest.mark.parametrize("kind", ["full", "KL", "k2"])
def test_unknown_kl_kind_raises(kind):
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(torch.zeros(2), torch.zeros(2), kind)


def ref_token_rewards(scores, lengths, width, kl=None, coef=0.0):
    out = [[0.0] * width for _ in scores]
    for i, (score, n) in enumerate(zip(scores, lengths)):
        for t in range(n):
            value = score if t == n - 1 else 0.0
            if kl is not None:
                value -= coef * kl[i][t]
            out[i][t] = value
    return out


@pytest.mark.parametrize("as_float", [False, True])
def test_token_level_rewards_random(as_float):
    rng = random.Random(1)
    lengths, mask = random_lengths_mask(rng, 6, 9, as_float=as_float)
    lengths[2] = 1  # a response of length 1
    lengths[3] = 9  # truncated: no padding at all
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(9)] for n in lengths])
    mask = mask if as_float else mask.bool()
    scores = torch.tensor([rng.gauss(0, 1) for _ in range(6)], dtype=torch.float64)
    kl = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = token_level_rewards(scores, mask, kl=kl, kl_coef=0.05)
    expected = ref_token_rewards(scores.tolist(), lengths, 9, kl.tolist(), 0.05)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-14, rtol=0)
    without_kl = token_level_rewards(scores, mask)
    assert torch.allclose(without_kl, torch.tensor(ref_token_rewards(scores.tolist(), lengths, 9),
                                                   dtype=torch.float64), atol=0, rtol=0)


def test_token_level_rewards_row_without_tokens_and_dtype():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    got = token_level_rewards(torch.tensor([2.0, 5.0]), mask)
    assert got.dtype == torch.float32
    assert got.tolist() == [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]


def test_token_level_rewards_shape_errors():
    with pytest.raises(ValueError, match="expected normalized_scores"):
        token_level_rewards(torch.zeros(3), torch.ones(2, 4))


def test_mean_of_sequence_means_matches_loop():
    rng = random.Random(3)
    lengths, mask = random_lengths_mask(rng, 5, 6)
    mask[4] = False  # a response without tokens does not count
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x[~mask] = float("nan")  # padding never enters
    per_seq = [sum(x[i, t].item() for t in range(lengths[i])) / lengths[i] for i in range(4)]
    assert abs(mean_of_sequence_means(x, mask).item() - sum(per_seq) / 4) < 1e-14
    assert mean_of_sequence_means(x, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- controllers
def test_fixed_controller_never_moves():
    ctl = make_kl_controller(0.2, None, 10000)
    assert isinstance(ctl, FixedKLController) and not isinstance(ctl, AdaptiveKLController)
    for kl in (0.0, 5.0, 100.0):
        ctl.update(kl, 4096)
    assert ctl.value == 0.2
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.2


def test_adaptive_controller_several_updates_closed_form():
    init, target, horizon, n = 0.2, 0.1, 10000, 1024
    ctl = make_kl_controller(init, target, horizon)
    assert isinstance(ctl, AdaptiveKLController)
    kls = [0.5, 0.01, 0.1, 0.11, 0.09, torch.tensor(0.3)]
    expected = init
    for kl in kls:
        ctl.update(kl, n)
        error = float(kl) / target - 1
        error = 0.2 if error > 0.2 else (-0.2 if error < -0.2 else error)
        expected = expected * (1 + error * n / horizon)
        assert abs(ctl.value - expected) < 1e-15
    # hand-computed first step: KL = 5 x target -> error clipped at 0.2 -> 1 + 0.2 * 1024 / 10000
    first = AdaptiveKLController(init, target, horizon)
    first.update(0.5, n)
    assert abs(first.value - 0.2 * 1.02048) < 1e-15


def test_adaptive_controller_state_round_trip():
    a = AdaptiveKLController(0.2, 0.05, 1000)
    for kl in (0.2, 0.0, 0.07):
        a.update(kl, 256)
    b = AdaptiveKLController(0.2, 0.05, 1000)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value != 0.2
    a.update(0.01, 256)
    b.update(0.01, 256)
    assert a.value == b.value


@pytest.mark.parametrize("args, message", [((0.2, 0.0, 100), "target_kl"), ((0.2, 0.1, 0), "horizon"),
                                            ((-1.0, 0.1, 100), "init_kl_coef")])
def test_controller_validation(args, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveKLController(*args)
    with pytest.raises(ValueError, match="value"):
        FixedKLController(0.1).load_state_dict({})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k3_is_bounded_at_both_ends_with_finite_gradients(dtype):
    """d = -100: exp(-d) overflows unclamped (an infinite KL loss); the bounds give at most 10 and a
    finite gradient; d = +100: the estimate d - 1 would be 99, clamped to 10 too."""
    from liteppo_mcore.algo.kl import K3_MAX

    logp = torch.tensor([-100.0, 100.0, -3.0, 1e-4], dtype=dtype, requires_grad=True)
    ref = torch.zeros(4, dtype=dtype)
    k3 = kl_estimate(logp, ref, "k3")
    k3.sum().backward()
    assert torch.isfinite(k3).all() and torch.isfinite(logp.grad).all()
    assert float(k3[0]) == K3_MAX and float(k3[1]) == K3_MAX
    assert float(logp.grad[0]) == 0 and float(logp.grad[1]) == 0  # outside the bounds: no gradient
    # inside, exact: d = -3 -> e^3 - 3 - 1 = 16.1 > 10 is clamped; d = 1e-4 keeps expm1's accuracy
    assert float(k3[2]) == K3_MAX
    if dtype == torch.float32:
        assert float(k3[3]) == pytest.approx(0.5e-8, rel=1e-3)
