"""The circuit breaker over consecutive bad steps, and the messages that stop a run (exit status 3)."""

import pytest

from liteppo_mcore.halt import NonFiniteParameter, nonfinite_weights_error
from liteppo_mcore.trainer.health import (
    BAD_STEP_KINDS,
    EXIT_HALTED,
    StepHealth,
    TrainingHalted,
    bad_step_kinds,
    step_ranges,
)

RESPONSES = 16
UPDATES = 2
NAN = float("nan")


def good(**extra):
    m = {"reward/errors": 0.0, "actor/skipped_updates": 0.0, "actor/grad_norm": 0.7, "critic/skipped_updates": 0.0,
         "critic/grad_norm": 0.3}
    m.update(extra)
    return m


def rewards_failed():
    return good(**{"reward/errors": float(RESPONSES)})


def actor_skipped():
    return good(**{"actor/skipped_updates": float(UPDATES), "actor/grad_norm": NAN})  # as update.py reports it


def critic_skipped():
    return good(**{"critic/skipped_updates": float(UPDATES), "critic/grad_norm": NAN})


def zero_gradient():
    return good(**{"actor/grad_norm": 0.0})


def feed(health, steps, first=1):
    for i, metrics in enumerate(steps):
        health.observe(first + i, metrics, num_responses=RESPONSES)


def kinds_of(metrics):
    return [k.key for k in bad_step_kinds(metrics, num_responses=RESPONSES, updates_per_step=UPDATES)]


def test_each_kind_is_recognized_and_good_steps_are_not():
    assert kinds_of(good()) == []
    assert kinds_of(rewards_failed()) == ["rewards_failed"]
    assert kinds_of(actor_skipped()) == ["actor_updates_skipped"]  # its NaN gradient norm is not "zero"
    assert kinds_of(critic_skipped()) == ["critic_updates_skipped"]
    assert kinds_of(zero_gradient()) == ["zero_gradient"]
    both = good(**{"reward/errors": float(RESPONSES), "actor/grad_norm": 0.0})
    assert kinds_of(both) == ["rewards_failed", "zero_gradient"]


def test_partial_failures_and_missing_metrics_are_good_steps():
    assert kinds_of(good(**{"reward/errors": RESPONSES - 1.0})) == []
    assert kinds_of(good(**{"actor/skipped_updates": UPDATES - 1.0})) == []
    assert kinds_of(good(**{"actor/grad_norm": 1e-30})) == []
    assert kinds_of({}) == []  # e.g. no critic, no reward errors counted
    assert kinds_of(good(**{"reward/errors": NAN, "actor/skipped_updates": NAN})) == []
    assert bad_step_kinds({"reward/errors": 0.0}, num_responses=0, updates_per_step=1) == ()


@pytest.mark.parametrize("make, key, hint", [
    (rewards_failed, "every reward of the step failed", "reward/errors"),
    (actor_skipped, "every actor update was skipped", "skip reasons"),
    (critic_skipped, "every critic update was skipped", "skip reasons"),
    (zero_gradient, "the actor's gradient norm was 0", "identical rewards"),
])
def test_the_limit_th_bad_step_in_a_row_halts_naming_kind_steps_limit_and_hint(make, key, hint):
    health = StepHealth(3, updates_per_step=UPDATES)
    feed(health, [make(), make()], first=5)
    assert health.consecutive_bad_steps == 2
    with pytest.raises(TrainingHalted) as info:
        health.observe(7, make(), num_responses=RESPONSES)
    e = info.value
    assert e.exit_code == EXIT_HALTED == 3 and e.step == 7 and isinstance(e, RuntimeError)
    message = str(e)
    for needle in (key, hint, "steps 5-7", "train.max_consecutive_bad_steps=3", "3 consecutive bad steps",
                   "resume from the last checkpoint"):
        assert needle in message, (needle, message)
    for other in BAD_STEP_KINDS:
        if other.what != key:
            assert other.what not in message


def test_a_good_step_resets_the_count():
    health = StepHealth(3, updates_per_step=UPDATES)
    feed(health, [rewards_failed(), rewards_failed(), good(), rewards_failed(), rewards_failed(), good()])
    assert health.consecutive_bad_steps == 0
    feed(health, [zero_gradient(), zero_gradient()], first=7)
    with pytest.raises(TrainingHalted, match="steps 7-9"):
        health.observe(9, zero_gradient(), num_responses=RESPONSES)


def test_mixed_kinds_count_as_consecutive_bad_steps_and_each_is_named():
    health = StepHealth(4, updates_per_step=UPDATES)
    feed(health, [rewards_failed(), actor_skipped(), zero_gradient()], first=10)
    with pytest.raises(TrainingHalted) as info:
        health.observe(13, rewards_failed(), num_responses=RESPONSES)
    message = str(info.value)
    assert "4 consecutive bad steps (steps 10-13)" in message
    assert "every reward of the step failed (steps 10, 13)" in message
    assert "every actor update was skipped (step 11)" in message
    assert "the actor's gradient norm was 0 (step 12)" in message
    assert "critic" not in message


def test_zero_disables_and_one_halts_on_the_first_bad_step():
    never = StepHealth(0, updates_per_step=UPDATES)
    feed(never, [rewards_failed()] * 50)
    assert never.consecutive_bad_steps == 0
    once = StepHealth(1, updates_per_step=UPDATES)
    feed(once, [good(), good()])
    with pytest.raises(TrainingHalted) as info:
        once.observe(3, critic_skipped(), num_responses=RESPONSES)
    assert "1 consecutive bad step (step 3) reached the limit train.max_consecutive_bad_steps=1" in str(info.value)
    assert "every critic update was skipped (step 3)" in str(info.value)


def test_halting_starts_a_new_count():
    health = StepHealth(2, updates_per_step=UPDATES)
    feed(health, [zero_gradient()])
    with pytest.raises(TrainingHalted):
        health.observe(2, zero_gradient(), num_responses=RESPONSES)
    assert health.consecutive_bad_steps == 0


def test_from_config_counts_the_updates_a_step_makes():
    from liteppo_mcore.config import load_config

    cfg = load_config("examples/tiny_cpu.yaml", ["ppo_epochs=2", "train.mini_batch_size=128",
                                                 "train.max_consecutive_bad_steps=4"], world_size=2)
    health = StepHealth.from_config(cfg)
    assert health.limit == 4 and health.updates_per_step == 2 * cfg.num_responses_per_step // 128 == 4
    three_of_four = good(**{"actor/skipped_updates": 3.0})
    assert bad_step_kinds(three_of_four, num_responses=cfg.num_responses_per_step, updates_per_step=4) == ()
    # a step that made room for fewer updates (filter_groups, short of informative groups): all of its 3 skipped
    health.observe(1, three_of_four, num_responses=cfg.num_responses_per_step)
    assert health.consecutive_bad_steps == 0
    health.observe(2, three_of_four, num_responses=cfg.num_responses_per_step, updates_per_step=3)
    assert health.consecutive_bad_steps == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        StepHealth(-1, updates_per_step=1)
    with pytest.raises(ValueError):
        StepHealth(1, updates_per_step=0)


def test_step_ranges():
    assert step_ranges([]) == ""
    assert step_ranges([4]) == "4"
    assert step_ranges([8, 3, 4, 5, 5]) == "3-5, 8"


def test_nonfinite_weights_message():
    first = NonFiniteParameter(rank=3, name="decoder.layers.0.self_attention.linear_qkv.weight",
                               where="tp 1, pp 1, cp 0, dp 0")
    e = nonfinite_weights_error("critic", step=12, update=40, first=first, bad_ranks=[3], world_size=4)
    assert isinstance(e, TrainingHalted) and e.exit_code == 3 and e.step == 12
    message = str(e)
    for needle in ("critic weights are not finite", "optimizer update 40", "in step 12",
                   "'decoder.layers.0.self_attention.linear_qkv.weight' on rank 3 (tp 1, pp 1, cp 0, dp 0)",
                   "rank 3 of 4 holds", "Lower critic.lr", "check the data of step 12",
                   "resume from the last checkpoint"):
        assert needle in message, (needle, message)
    actor = str(nonfinite_weights_error("actor", step=1, update=1, first=None, bad_ranks=[0, 1, 2], world_size=4))
    assert "ranks 0-2 of 4 hold" in actor and "Lower train.lr" in actor and "critic.lr" not in actor


def test_the_streak_survives_a_checkpoint():
    from liteppo_mcore.trainer.health import StepHealth, TrainingHalted

    bad = {"reward/errors": 8.0, "actor/skipped_updates": 0.0, "actor/grad_norm": 0.5}
    first = StepHealth(3, updates_per_step=1)
    first.observe(1, bad, num_responses=8)
    first.observe(2, bad, num_responses=8)
    resumed = StepHealth(3, updates_per_step=1)
    resumed.load_state_dict(first.state_dict())
    assert resumed.consecutive_bad_steps == 2
    with pytest.raises(TrainingHalted, match=r"3 consecutive bad steps \(steps 1-3\)"):
        resumed.observe(3, bad, num_responses=8)
