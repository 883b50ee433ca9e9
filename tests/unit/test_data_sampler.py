"""Deterministic prompt order, save/restore of the position, and each data-parallel rank's share."""

import pytest

from liteppo_mcore.data import PromptSampler, epoch_permutation, shard_for_rank


def take(sampler, steps):
    return [sampler.next_batch() for _ in range(steps)]


def test_same_seed_same_order_other_seed_other_order():
    a = take(PromptSampler(50, 8, seed=3), 20)
    b = take(PromptSampler(50, 8, seed=3), 20)
    c = take(PromptSampler(50, 8, seed=4), 20)
    assert a == b
    assert a != c


def test_each_epoch_is_a_permutation_and_epochs_differ():
    n, batch = 30, 7
    flat = sum(take(PromptSampler(n, batch, seed=0), 30), [])  # 210 indices = 7 epochs
    epochs = [flat[i * n : (i + 1) * n] for i in range(7)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert len({tuple(order) for order in epochs}) == 7
    assert epochs[0] == epoch_permutation(n, 0, 0) and epochs[1] == epoch_permutation(n, 0, 1)


def test_batches_cross_epoch_boundaries_and_track_position():
    sampler = PromptSampler(10, 4, seed=1)
    batches = take(sampler, 3)  # 12 indices: one epoch of 10, then 2 of the next
    assert batches[2][:2] == epoch_permutation(10, 1, 0)[8:]
    assert batches[2][2:] == epoch_permutation(10, 1, 1)[:2]
    assert (sampler.epoch, sampler.offset) == (1, 2)


def test_without_shuffle_the_order_is_the_file_order():
    sampler = PromptSampler(5, 3, seed=9, shuffle=False)
    assert take(sampler, 3) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


@pytest.mark.parametrize("steps_before", [0, 1, 3, 5, 7])
def test_restore_continues_exactly(steps_before):
    reference = PromptSampler(23, 5, seed=11)
    expected = take(reference, steps_before + 6)[steps_before:]
    first = PromptSampler(23, 5, seed=11)
    take(first, steps_before)
    state = first.state_dict()
    resumed = PromptSampler(23, 5, seed=11)
    resumed.load_state_dict(dict(state))
    assert take(resumed, 6) == expected


def test_state_dict_contents():
    sampler = PromptSampler(23, 5, seed=11)
    take(sampler, 5)  # 25 indices: epoch 1, offset 2
    assert sampler.state_dict() == {"epoch": 1, "offset": 2, "num_prompts": 23, "seed": 11, "shuffle": True}


@pytest.mark.parametrize("key,value", [("num_prompts", 24), ("seed", 12), ("shuffle", False)])
def test_restore_refuses_a_different_stream(key, value):
    state = PromptSampler(23, 5, seed=11).state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=f"saved data position was taken with {key}="):
        PromptSampler(23, 5, seed=11).load_state_dict(state)


def test_restore_refuses_an_impossible_position():
    state = PromptSampler(23, 5, seed=11).state_dict()
    state["offset"] = 23
    with pytest.raises(ValueError, match="invalid data position"):
        PromptSampler(23, 5, seed=11).load_state_dict(state)


def test_invalid_sizes():
    with pytest.raises(ValueError):
        PromptSampler(0, 4, seed=0)
    with pytest.raises(ValueError):
        PromptSampler(4, 0, seed=0)


def test_shard_for_rank_gives_contiguous_whole_shares():
    batch = list("abcdefgh")
    assert [shard_for_rank(batch, r, 4) for r in range(4)] == [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
    assert shard_for_rank(batch, 0, 1) == batch
    with pytest.raises(ValueError, match="does not split evenly over 3"):
        shard_for_rank(batch, 0, 3)
    with pytest.raises(ValueError, match="dp_rank"):
        shard_for_rank(batch, 4, 4)
