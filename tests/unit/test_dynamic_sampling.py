"""Dynamic sampling (filter_groups): which groups are informative, which are kept (the cap, the global
order, the N' rule), and the rollout selection/merging that moves kept groups between DP ranks."""

import itertools

import pytest
import torch

from liteppo_mcore.rollout.engine import Generation
from liteppo_mcore.trainer import dynamic_sampling as ds
from liteppo_mcore.trainer.experience import build_rollout, concat_rollouts, select_responses
from liteppo_mcore.update.batch import minibatch_indices, rank_share
from liteppo_mcore.utils.seeds import mix_seed


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _rollout(prompts, responses, tag=""):
    """`responses[k]`: the groups' token lists of prompt k; log-probs -(token / 10); answers name the prompt."""
    generations = [[Generation(list(r), [-t / 10 for t in r], "length" if len(r) == 3 else "stop") for r in group]
                   for group in responses]
    return build_rollout(prompts, [f"{tag}{k}" for k in range(len(prompts))], generations, _Tokenizer())


# ------------------------------------------------------------------ informative groups
def test_informative_groups_are_those_whose_raw_rewards_differ():
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    assert ds.informative_groups(scores, 4).tolist() == [True, True, False]
    assert ds.informative_groups(scores, 2).tolist() == [False, True, False, False, False, False]
    assert ds.informative_groups(scores, 1).tolist() == [False] * 12  # one response: nothing to compare


def test_informative_groups_of_float_rewards():
    uniform = torch.tensor([0.7, 0.7, 0.7, -1.25, -1.25, -1.25, 1e-9, 1e-9, 1e-9], dtype=torch.float64)
    assert ds.informative_groups(uniform, 3).tolist() == [False, False, False]
    near = torch.tensor([0.1 + 0.2, 0.3, 0.3, 0.7, 0.7, 0.7000001], dtype=torch.float64)  # 0.1 + 0.2 != 0.3
    assert ds.informative_groups(near, 3).tolist() == [True, True]
    assert ds.informative_groups(torch.tensor([2.0, 2.0, -2.0, -2.0]), 2).tolist() == [False, False]


def test_informative_groups_need_whole_groups():
    with pytest.raises(ValueError, match="whole groups of 4"):
        ds.informative_groups(torch.zeros(6), 4)


def test_group_rows():
    assert ds.group_rows([2, 0], 3).tolist() == [6, 7, 8, 0, 1, 2]
    assert ds.group_rows(torch.tensor([], dtype=torch.long), 3).tolist() == []


# ------------------------------------------------------------------ which groups are kept
def test_take_first_in_the_order_round_then_rank():
    counts = [[1, 3], [2, 0], [5, 5]]
    assert ds.take_first(counts, 5) == [[1, 3], [1, 0], [0, 0]]
    assert ds.take_first(counts, 4) == [[1, 3], [0, 0], [0, 0]]
    assert ds.take_first(counts, 1) == [[1, 0], [0, 0], [0, 0]]
    assert ds.take_first(counts, 0) == [[0, 0], [0, 0], [0, 0]]
    assert ds.take_first(counts, 16) == counts
    with pytest.raises(ValueError, match="cannot keep 17"):
        ds.take_first(counts, 17)


@pytest.mark.parametrize("informative, target, n, mbs, dp, kept", [
    (20, 8, 4, 8, 1, 8),   # more than enough: the target
    (8, 8, 4, 8, 2, 8),    # exactly enough
    (5, 8, 4, 8, 1, 4),    # 20 responses -> a multiple of lcm(8, 4) = 8: 16
    (5, 8, 4, 8, 2, 4),    # lcm(8, 8) = 8: 16
    (7, 8, 4, 16, 2, 4),   # 28 responses -> lcm(16, 8) = 16: 16
    (3, 8, 4, 16, 2, 2),   # 12 < 16: one mini-batch of 8 responses (2 groups, one per rank)
    (1, 8, 4, 8, 1, 1),    # one group: one mini-batch of 4
    (1, 8, 4, 8, 2, 0),    # one group cannot be spread over 2 ranks: no update
    (0, 8, 4, 8, 1, 0),
    (4, 12, 2, 6, 2, 2),   # 8 responses, lcm(6, 4) = 12 > 8: one mini-batch of at most 6 -> 4 responses
    (7, 12, 2, 6, 2, 6),   # 14 responses -> 12
    (3, 16, 3, 4, 1, 1),   # n = 3, mbs = 4: lcm 12 > 9 responses; one group of 3 fits a mini-batch
    (31, 32, 8, 256, 2, 30),  # tiny_cpu's shape: 248 responses < 256: one mini-batch of 30 groups (15 per rank)
])
def test_the_kept_count(informative, target, n, mbs, dp, kept):
    got = ds.kept_groups(informative, target=target, group_size=n, mini_batch_size=mbs, dp_size=dp)
    assert got == kept


def _feasible(groups, n, mbs, dp):
    """Whether a step of `groups` groups splits into whole groups per rank and whole mini-batches."""
    responses = groups * n
    mini = min(mbs, responses)
    if groups == 0 or groups % dp or responses % mini:
        return False
    for indices in minibatch_indices(responses, mini, seed=0, step=0, epoch=0):
        rank_share(indices, 0, dp)  # raises when a mini-batch does not split over the ranks
    return True


def test_the_kept_count_is_the_largest_feasible_one():
    checked = 0
    for n, dp, target in itertools.product((2, 3, 4), (1, 2, 4), (4, 8, 12)):
        if target % dp:
            continue
        for mbs in range(dp, target * n + 1, dp):  # what validation admits: dp | mbs | target x n
            if (target * n) % mbs:
                continue
            for informative in range(0, 2 * target + 1):
                got = ds.kept_groups(informative, target=target, group_size=n, mini_batch_size=mbs, dp_size=dp)
                best = max((k for k in range(min(informative, target) + 1) if _feasible(k, n, mbs, dp)), default=0)
                assert got == best, (informative, target, n, mbs, dp)
                checked += 1
    assert checked > 500


def test_the_kept_count_checks_its_arguments():
    with pytest.raises(ValueError, match="dp_size"):
        ds.kept_groups(3, target=4, group_size=2, mini_batch_size=4, dp_size=0)
    with pytest.raises(ValueError, match="informative"):
        ds.kept_groups(-1, target=4, group_size=2, mini_batch_size=4, dp_size=1)


def test_the_updater_trains_a_short_step_as_one_mini_batch():
    from liteppo_mcore.config import load_config

    cfg = load_config("examples/tiny_cpu.yaml", ["ppo_epochs=2", "train.mini_batch_size=64", "filter_groups=true"],
                      world_size=2)
    assert cfg.step_mini_batch_size() == 64 and cfg.updates_per_step() == 8
    assert cfg.step_mini_batch_size(128) == 64 and cfg.updates_per_step(128) == 4
    assert cfg.step_mini_batch_size(16) == 16 and cfg.updates_per_step(16) == 2  # one mini-batch per epoch


# ------------------------------------------------------------------ seeds
def test_round_seeds():
    assert ds.round_seed(7, 3, 0, 1) == mix_seed(7, 2, 1)  # round 0: the seed of a step without filtering
    seeds = {ds.round_seed(7, step, r, rank) for step in (1, 2) for r in range(4) for rank in range(3)}
    assert len(seeds) == 2 * 4 * 3
    assert ds.round_seed(7, 2, 3, 1) == ds.round_seed(7, 2, 3, 1)


# ------------------------------------------------------------------ rollouts
def test_select_responses_keeps_every_field_with_its_response():
    rollout = _rollout([[1, 2], [3, 4, 5]], [[[11], [12, 13, 14]], [[15, 16], [17]]])
    assert rollout.batch.tokens.shape == (4, 5)
    picked = select_responses(rollout, [3, 0])
    assert picked.batch.tokens.tolist() == [[3, 4, 5, 17], [1, 2, 11, 0]]  # trimmed to the longest: 4
    assert picked.batch.prompt_lens.tolist() == [3, 2] and picked.batch.response_lens.tolist() == [1, 1]
    assert picked.rollout_logp.shape == (2, 1)
    assert picked.rollout_logp[:, 0].tolist() == pytest.approx([-1.7, -1.1])
    assert picked.response_texts == ["17", "11"] and picked.answers == ["1", "0"]
    assert picked.finish_reasons == ["stop", "stop"]
    assert picked.mask.tolist() == [[True], [True]]
    empty = select_responses(rollout, [])
    assert empty.batch.size == 0 and empty.response_texts == [] and empty.rollout_logp.shape[0] == 0


def test_concat_rollouts_pads_to_the_longest():
    a = _rollout([[1]], [[[21], [22]]], tag="a")
    b = _rollout([[4, 5, 6]], [[[23, 24, 25], [26]]], tag="b")
    joined = concat_rollouts([a, select_responses(b, []), b])
    assert joined.batch.tokens.tolist() == [[1, 21, 0, 0, 0, 0], [1, 22, 0, 0, 0, 0], [4, 5, 6, 23, 24, 25],
                                            [4, 5, 6, 26, 0, 0]]
    assert joined.batch.prompt_lens.tolist() == [1, 1, 3, 3]
    assert joined.batch.response_lens.tolist() == [1, 1, 3, 1]
    assert torch.allclose(joined.rollout_logp, torch.tensor([[-2.1, 0, 0], [-2.2, 0, 0], [-2.3, -2.4, -2.5],
                                                             [-2.6, 0, 0]]))
    assert joined.answers == ["a0", "a0", "b0", "b0"]
    assert joined.finish_reasons == ["stop", "stop", "length", "stop"]
    assert joined.response_texts == ["21", "22", "23 24 25", "26"]
    joined.batch.validate()
    with pytest.raises(ValueError):
        concat_rollouts([])


def test_spread_kept_gives_each_rank_an_equal_share_in_global_order():
    n = 2

    def kept(tag, groups):  # `groups` groups of 2 responses, scores naming them
        rollout = _rollout([[9]] * groups, [[[1], [2, 3]]] * groups, tag=tag)
        scores = torch.tensor([float(f"{len(tag)}{k}") for k in range(groups * n)], dtype=torch.float64)
        return rollout, scores

    # round 0: rank 0 keeps 1 group, rank 1 keeps 2; round 1: rank 0 keeps 0, rank 1 keeps 1 -> 4 groups
    by_rank = [[kept("r0d0-", 1), kept("r1d0-", 0)], [kept("r0d1-", 2), kept("r1d1-", 1)]]
    order = []
    for rank in range(2):
        rollout, scores = ds.spread_kept(by_rank, rank, 2, n)
        assert rollout.batch.size == 4 and scores.shape == (4,)
        order += rollout.answers
    assert order == ["r0d0-0"] * 2 + ["r0d1-0"] * 2 + ["r0d1-1"] * 2 + ["r1d1-0"] * 2
    rollout, _ = ds.spread_kept(by_rank, 1, 2, n)
    assert rollout.batch.response_lens.tolist() == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="whole groups"):
        ds.spread_kept([[kept("a", 3)], [kept("b", 0)]], 0, 2, n)  # 3 groups over 2 ranks
    with pytest.raises(ValueError, match="every DP rank"):
        ds.spread_kept([[kept("a", 2)]], 0, 2, n)


def test_spread_kept_scores_follow_their_responses():
    rollout = _rollout([[9], [8]], [[[1], [2]], [[3], [4]]])
    scores = torch.tensor([0.0, 1.0, 0.25, 0.5], dtype=torch.float64)
    got, got_scores = ds.spread_kept([[(rollout, scores)]], 0, 1, 2)
    assert got.response_texts == ["1", "2", "3", "4"] and got_scores.tolist() == [0.0, 1.0, 0.25, 0.5]
    second, second_scores = ds.spread_kept([[(select_responses(rollout, [2, 3]), scores[2:])]], 0, 1, 2)
    assert second.response_texts == ["3", "4"] and second_scores.tolist() == [0.25, 0.5]
