"""Mini-batches, DP shares, micro-batch plans, coordinates and the LR schedule of train/."""

import math

import pytest
import torch

from liteppo_mcore.config import load_config
from liteppo_mcore.models.forward import SequenceBatch, to_response_coords, to_sequence_coords
from liteppo_mcore.update import (
    OptimSettings,
    TrainBatch,
    learning_rate,
    minibatch_indices,
    plan_micro_batches,
    rank_share,
)


def test_minibatches_are_a_seeded_permutation_and_shares_do_not_depend_on_dp():
    a = minibatch_indices(16, 4, seed=1, step=2, epoch=0)
    assert len(a) == 4 and sorted(torch.cat(a).tolist()) == list(range(16))
    again = minibatch_indices(16, 4, seed=1, step=2, epoch=0)
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    others = [minibatch_indices(16, 4, seed=s, step=t, epoch=e) for s, t, e in ((2, 2, 0), (1, 3, 0), (1, 2, 1))]
    assert all(not torch.equal(torch.cat(a), torch.cat(o)) for o in others)
    # the union of the DP shares of a mini-batch is the mini-batch, for every DP size
    for dp in (1, 2, 4):
        shares = [rank_share(a[0], r, dp) for r in range(dp)]
        assert torch.equal(torch.cat(shares), a[0])
    with pytest.raises(ValueError, match="does not split over dp=3"):
        rank_share(a[0], 0, 3)
    with pytest.raises(ValueError, match="mini_batch_size=5 must divide"):
        minibatch_indices(16, 5, seed=1, step=0, epoch=0)


def test_micro_batch_plans_cover_the_share_within_the_bounds():
    lens = torch.tensor([5, 20, 7, 20, 3, 11, 9])
    plans = plan_micro_batches(lens, micro_batch_size=3, max_tokens=None, pipeline=False, multiple=1)
    assert sorted(torch.cat([p.rows for p in plans]).tolist()) == list(range(7))
    assert [p.num_rows for p in plans] == [3, 3, 1]
    assert [p.seq_len for p in plans] == [20, 9, 3]  # longest first, each padded to its own longest
    bounded = plan_micro_batches(lens, micro_batch_size=3, max_tokens=30, pipeline=False, multiple=4)
    assert all(p.num_rows * p.seq_len <= 30 or p.num_rows == 1 for p in bounded)
    assert all(p.seq_len % 4 == 0 for p in bounded)
    assert sorted(torch.cat([p.rows for p in bounded]).tolist()) == list(range(7))
    # pipeline stages need one shape: same rows and length everywhere, the last filled with empty rows
    piped = plan_micro_batches(lens, micro_batch_size=3, max_tokens=45, pipeline=True, multiple=2)
    assert {(p.num_rows, p.seq_len) for p in piped} == {(2, 20)}
    assert [p.rows.numel() for p in piped] == [2, 2, 2, 1]


def test_sequence_coordinates_invert_response_coordinates():
    batch = SequenceBatch(tokens=torch.zeros(3, 9, dtype=torch.long), prompt_lens=torch.tensor([2, 4, 1]),
                          response_lens=torch.tensor([3, 5, 1]))
    resp = torch.arange(1, 16, dtype=torch.float32).reshape(3, 5)
    resp = torch.where(torch.arange(5)[None] < batch.response_lens[:, None], resp, torch.zeros(()))
    seq = to_sequence_coords(resp, batch, 10)
    assert seq.shape == (3, 10) and seq[0, 1:4].tolist() == [1.0, 2.0, 3.0] and seq[2, 0] == 11.0
    assert torch.equal(to_response_coords(seq, batch, 5), resp)
    assert seq.count_nonzero() == int(batch.response_lens.sum())


def test_train_batch_selects_trims_and_validates():
    tokens = torch.arange(40).reshape(4, 10)
    batch = TrainBatch(tokens=tokens, prompt_lens=torch.tensor([2, 3, 2, 4]), response_lens=torch.tensor([1, 6, 2, 3]),
                       advantages=torch.ones(4, 6))
    sub = batch.select(torch.tensor([2, 0]))
    assert sub.tokens.shape == (2, 4) and sub.advantages.shape == (2, 2) and sub.prompt_lens.tolist() == [2, 2]
    bad = TrainBatch(tokens=tokens[:, :5], prompt_lens=batch.prompt_lens, response_lens=batch.response_lens)
    with pytest.raises(ValueError, match="holds 5 positions, but a prompt plus response needs 9"):
        bad.validate()
    short = TrainBatch(tokens=tokens, prompt_lens=batch.prompt_lens, response_lens=batch.response_lens,
                       old_logp=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"TrainBatch.old_logp must be \[N, T>=6\]"):
        short.validate()


def _settings(**overrides):
    cfg = load_config(overrides=[f"train.{k}={v}" for k, v in overrides.items()] + [
        "max_steps=10", "rollout_batch_size=4", "num_return_sequences_in_group=2", "train.mini_batch_size=4"])
    return OptimSettings.from_config(cfg, "actor")


def test_learning_rate_schedule():
    s = _settings(lr=1.0, lr_warmup_steps=4, lr_schedule="constant")
    assert s.total_updates == 10 * 2  # max_steps x mini-batches per step x ppo_epochs
    assert [learning_rate(k, s) for k in (1, 2, 4, 5, 20)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    c = _settings(lr=1.0, min_lr=0.1, lr_warmup_steps=0, lr_schedule="cosine")
    assert learning_rate(1, c) < 1.0 and math.isclose(learning_rate(20, c), 0.1)
    assert math.isclose(learning_rate(10, c), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    values = [learning_rate(k, c) for k in range(1, 21)]
    assert values == sorted(values, reverse=True)
    critic = OptimSettings.from_config(load_config(overrides=["critic.lr=0.5", "adv_estimator=gae"]), "critic")
    assert critic.lr == 0.5
