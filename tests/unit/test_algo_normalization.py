"""normalize_rewards and RunningMoments against plain float64 loops (semantics section 1)."""

import math
import random

import pytest
import torch

from liteppo_mcore.algo import RunningMoments, normalize_rewards

EPS = 1e-6


# ---------------------------------------------------------------- independent reference (plain Python)
def ref_mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def ref_std(xs):
    if len(xs) < 2:
        return 0.0
    mu = ref_mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def ref_normalize(scores, group_size, norm, div_std_global=True, shift=False, scale=False, clip=None,
                  history=()):
    """``history``: earlier batches seen by the running statistics (the current one is appended)."""
    out = []
    for i, r in enumerate(scores):
        group = scores[(i // group_size) * group_size:(i // group_size + 1) * group_size]
        if norm is None:
            value = r
        else:
            if norm == "group":
                mu = ref_mean(group)
                sigma = ref_std(scores) if div_std_global else ref_std(group)
            elif norm == "batch":
                mu, sigma = ref_mean(scores), ref_std(scores)
            else:
                seen = [x for batch in history for x in batch] + list(scores)
                mu, sigma = ref_mean(seen), ref_std(seen)
            if shift:
                value = r - mu
            elif scale:
                value = r / (sigma + EPS)
            else:
                value = (r - mu) / (sigma + EPS)
        if clip is not None:
            value = min(max(value, -clip), clip)
        out.append(value)
    return out


def assert_close_list(actual, expected, tol=1e-12):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert abs(a - e) <= tol * max(1.0, abs(e)), (a, e)


def random_scores(seed, num_groups, group_size, kind="gauss"):
    rng = random.Random(seed)
    if kind == "binary":
        return [float(rng.random() < 0.4) for _ in range(num_groups * group_size)]
    return [rng.gauss(0.3, 1.7) for _ in range(num_groups * group_size)]


# ---------------------------------------------------------------- random inputs against the reference
@pytest.mark.parametrize("norm", ["group", "batch", None])
@pytest.mark.parametrize("div_std_global", [True, False])
@pytest.mark.parametrize("variant", ["default", "shift", "scale"])
@pytest.mark.parametrize("clip", [None, 0.8])
def test_matches_reference_on_random_scores(norm, div_std_global, variant, clip):
    for seed, kind in [(1, "gauss"), (2, "binary")]:
        scores = random_scores(seed, num_groups=5, group_size=4, kind=kind)
        got = normalize_rewards(
            torch.tensor(scores, dtype=torch.float64), group_size=4, reward_norm=norm,
            div_std_global=div_std_global, reward_shift=variant == "shift", reward_scale=variant == "scale",
            reward_clip=clip,
        )
        expected = ref_normalize(scores, 4, norm, div_std_global, variant == "shift", variant == "scale", clip)
        assert got.dtype == torch.float64
        assert_close_list(got.tolist(), expected)


def test_hand_computed_group_norm_with_global_std():
    # groups {1,2} {3,4}: means 1.5, 3.5; unbiased std of 1..4 = sqrt(5/3)
    got = normalize_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), group_size=2,
                            reward_norm="group")
    expected = 0.5 / (math.sqrt(5.0 / 3.0) + EPS)
    assert_close_list(got.tolist(), [-expected, expected, -expected, expected])


def test_hand_computed_group_norm_with_group_std():
    # group {0, 2}: mean 1, std sqrt(2); group {5, 5}: all equal -> 0
    got = normalize_rewards(torch.tensor([0.0, 2.0, 5.0, 5.0], dtype=torch.float64), group_size=2,
                            reward_norm="group", div_std_global=False)
    s = 1.0 / (math.sqrt(2.0) + EPS)
    assert_close_list(got.tolist(), [-s, s, 0.0, 0.0])


@pytest.mark.parametrize("div_std_global", [True, False])
def test_all_equal_group_is_zero(div_std_global):
    scores = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    got = normalize_rewards(torch.tensor(scores), group_size=3, reward_norm="group",
                            div_std_global=div_std_global)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert_close_list(got.tolist(), ref_normalize(scores, 3, "group", div_std_global), tol=1e-6)


@pytest.mark.parametrize("norm", ["group", "batch", "running"])
def test_whole_batch_equal_rewards_give_zeros_not_nan(norm):
    scores = torch.full((8,), 0.7, dtype=torch.float64)
    got = normalize_rewards(scores, group_size=4, reward_norm=norm, running=RunningMoments())
    assert torch.isfinite(got).all()
    assert got.abs().max().item() < 1e-9


def test_float32_in_float32_out_and_large_offset_is_accurate():
    scores = [1.0e6 + x for x in random_scores(3, num_groups=4, group_size=4)]
    got64 = normalize_rewards(torch.tensor(scores, dtype=torch.float64), group_size=4, reward_norm="batch")
    assert_close_list(got64.tolist(), ref_normalize(scores, 4, "batch"), tol=1e-9)
    got32 = normalize_rewards(torch.tensor(scores, dtype=torch.float32), group_size=4, reward_norm="group")
    assert got32.dtype == torch.float32


def test_reward_norm_none_ignores_shift_and_scale_but_clips():
    scores = [-3.0, 0.5, 2.5, 1.0]
    got = normalize_rewards(torch.tensor(scores, dtype=torch.float64), group_size=2, reward_norm=None,
                            reward_scale=True, reward_clip=2.0)
    assert got.tolist() == [-2.0, 0.5, 2.0, 1.0]


def test_empty_rank_returns_empty():
    got = normalize_rewards(torch.zeros(0), group_size=4, reward_norm="group")
    assert got.shape == (0,)


# ---------------------------------------------------------------- running moments
def test_running_moments_several_updates_match_closed_form():
    rng = random.Random(7)
    batches = [[rng.gauss(5.0, 3.0) for _ in range(n)] for n in (1, 6, 9, 4)]
    running = RunningMoments()
    seen = []
    for k, batch in enumerate(batches):
        tensor = torch.tensor(batch, dtype=torch.float32 if k == 2 else torch.float64)  # any float dtype
        running.update(tensor)
        seen.extend(tensor.tolist())
        assert running.count == len(seen)
        assert abs(running.mean - ref_mean(seen)) < 1e-12
        assert abs(running.std - ref_std(seen)) < 1e-12


def test_running_moments_of_one_value_has_zero_std():
    running = RunningMoments()
    running.update(torch.tensor([3.0]))
    assert (running.count, running.mean, running.std) == (1, 3.0, 0.0)
    running.update(torch.zeros(0))
    assert running.count == 1


def test_running_normalization_uses_stats_after_this_batch():
    batches = [random_scores(s, num_groups=2, group_size=3) for s in (10, 11, 12)]
    running = RunningMoments()
    for k, batch in enumerate(batches):
        got = normalize_rewards(torch.tensor(batch, dtype=torch.float64), group_size=3,
                                reward_norm="running", running=running)
        assert_close_list(got.tolist(), ref_normalize(batch, 3, "running", history=batches[:k]))


def test_running_state_round_trip_continues_identically():
    batches = [random_scores(s, num_groups=3, group_size=2) for s in (20, 21, 22, 23)]
    a = RunningMoments()
    for batch in batches[:2]:
        a.update(torch.tensor(batch, dtype=torch.float64))
    state = a.state_dict()
    b = RunningMoments()
    b.load_state_dict(dict(state))
    assert b.state_dict() == state
    for batch in batches[2:]:
        out_a = normalize_rewards(torch.tensor(batch, dtype=torch.float64), group_size=2, reward_norm="running",
                                  running=a)
        out_b = normalize_rewards(torch.tensor(batch, dtype=torch.float64), group_size=2, reward_norm="running",
                                  running=b)
        assert torch.equal(out_a, out_b)
    assert a.state_dict() == b.state_dict()
    assert b.count == sum(len(x) for x in batches)
    with pytest.raises(ValueError, match="missing"):
        RunningMoments().load_state_dict({"count": 1.0})


# ---------------------------------------------------------------- impossible calls
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(group_size=4, reward_norm="group"), "does not divide"),
        (dict(group_size=3, reward_norm="groups"), "unknown reward_norm"),
        (dict(group_size=1, reward_norm="group"), "group_size >= 2"),
        (dict(group_size=2, reward_norm="batch", reward_shift=True, reward_scale=True), "cannot both"),
        (dict(group_size=2, reward_norm="running"), "RunningMoments"),
        (dict(group_size=0, reward_norm="batch"), "positive integer"),
        (dict(group_size=2, reward_norm="batch", reward_clip=0.0), "reward_clip"),
    ],
)
def test_impossible_calls_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        normalize_rewards(torch.arange(6, dtype=torch.float64), **kwargs)


def test_two_dimensional_scores_are_rejected():
    with pytest.raises(ValueError, match="1-D"):
        normalize_rewards(torch.zeros(2, 3), group_size=3, reward_norm="batch")
