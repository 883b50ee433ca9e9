"""The reward runner: per-sample time limit, error counting, logging, and no deadlock on stuck calls."""

import logging
import threading
import time

import pytest

from liteppo_mcore.rewards import ERRORS_METRIC, RewardRunner, build_reward_runner, get_reward


def scripted(response, answer):
    """A reward whose behaviour the response text chooses."""
    if response == "raise":
        raise RuntimeError("scripted failure")
    if response.startswith("sleep"):
        time.sleep(float(response.split()[1]))
        return 1.0
    if response == "nan":
        return float("nan")
    if response == "text":
        return "1.0"
    return 1.0 if response == answer else 0.0


def test_scores_in_order_without_errors():
    with RewardRunner(scripted, timeout_s=5, num_workers=3) as runner:
        scores, stats = runner(["a", "b", "c", "d", "e"], ["a", "x", "c", "x", "e"])
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert stats == {ERRORS_METRIC: 0.0}


def test_errors_and_bad_values_score_zero_and_are_counted():
    with RewardRunner(scripted, timeout_s=5, num_workers=2) as runner:
        scores, stats = runner(["a", "raise", "nan", "text", "b"], ["a", "a", "a", "a", "b"])
    assert scores == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert stats[ERRORS_METRIC] == 3.0
    assert [(f.index, f.kind) for f in runner.last_failures] == [(1, "error"), (2, "bad_value"), (3, "bad_value")]
    assert "RuntimeError: scripted failure" in runner.last_failures[0].message


def test_timeout_scores_zero_counts_and_bounds_the_wait():
    with RewardRunner(scripted, timeout_s=0.3, num_workers=2) as runner:
        start = time.monotonic()
        scores, stats = runner(["sleep 30", "a", "sleep 0.01", "b"], ["a", "a", "a", "x"])
        elapsed = time.monotonic() - start
    assert scores == [0.0, 1.0, 1.0, 0.0]
    assert stats[ERRORS_METRIC] == 1.0
    assert [(f.index, f.kind) for f in runner.last_failures] == [(0, "timeout")]
    assert elapsed < 3.0, f"a batch with one stuck sample took {elapsed:.1f} s (time limit 0.3 s)"
    assert runner.total_timeouts == 1


def test_stuck_workers_are_replaced_so_the_pool_never_deadlocks():
    # More stuck samples than workers, then ordinary ones: every stuck sample times out once its own
    # clock runs out, the rest are still scored, and the next batch runs normally.
    with RewardRunner(scripted, timeout_s=0.25, num_workers=2) as runner:
        start = time.monotonic()
        scores, stats = runner(["sleep 30"] * 4 + ["a", "b"], ["a"] * 4 + ["a", "x"])
        elapsed = time.monotonic() - start
        assert scores == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert stats[ERRORS_METRIC] == 4.0
        # two waves of two stuck samples at 0.25 s each, plus scheduling slack
        assert elapsed < 2.5, elapsed
        assert runner.num_abandoned_threads == 4
        scores, stats = runner(["a", "b", "c"], ["a", "b", "x"])
        assert scores == [1.0, 1.0, 0.0]
        assert stats[ERRORS_METRIC] == 0.0


def test_each_sample_gets_its_own_time_limit():
    # Four samples of 0.2 s on one worker take 0.8 s in all: none may time out at a 0.5 s limit,
    # because the clock of a sample starts when a worker picks it up, not when the batch starts.
    with RewardRunner(scripted, timeout_s=0.5, num_workers=1) as runner:
        scores, stats = runner(["sleep 0.2"] * 4, ["a"] * 4)
    assert scores == [1.0] * 4
    assert stats[ERRORS_METRIC] == 0.0


def test_failures_are_logged_with_the_sample(caplog):
    with caplog.at_level(logging.WARNING, logger="liteppo_mcore.rewards.runner"):
        with RewardRunner(scripted, timeout_s=5, num_workers=2, max_logged_failures=2) as runner:
            runner(["raise", "raise", "raise", "ok"], ["ans-0", "ans-1", "ans-2", "ok"])
    text = caplog.text
    assert "sample 0" in text and "ans-0" in text and "scripted failure" in text
    assert "sample 1" in text
    assert "sample 2" not in text  # beyond max_logged_failures: summarized
    assert "1 more failures in this batch (3 in all" in text


def test_mismatched_lengths_are_a_caller_error():
    with RewardRunner(scripted, timeout_s=1, num_workers=1) as runner:
        with pytest.raises(ValueError, match="2 responses but 1 answers"):
            runner(["a", "b"], ["a"])


def test_closed_runner_refuses_work():
    runner = RewardRunner(scripted, timeout_s=1, num_workers=1)
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner(["a"], ["a"])


@pytest.mark.parametrize("kwargs", [{"timeout_s": 0, "num_workers": 1}, {"timeout_s": 1, "num_workers": 0}])
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        RewardRunner(scripted, **kwargs)


def test_math_reward_in_the_runner_threads():
    class Cfg:
        name, timeout_s, num_workers = "math", 30.0, 3

    with build_reward_runner(Cfg()) as runner:
        scores, stats = runner(
            ["\\boxed{0.5}", "\\boxed{\\{2,1\\}}", "\\boxed{7}", "nothing"] * 3,
            ["\\frac{1}{2}", "\\{1,2\\}", "8", "3"] * 3,
        )
    assert stats[ERRORS_METRIC] == 0.0
    assert scores == [1.0, 1.0, 0.0, 0.0] * 3


def test_concurrent_calls_are_serialized():
    runner = RewardRunner(get_reward("max_digit"), timeout_s=5, num_workers=2)
    results = []

    def call(answer):
        results.append(runner([answer] * 20, [answer] * 20))

    threads = [threading.Thread(target=call, args=(str(d),)) for d in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    runner.close()
    assert len(results) == 4
    assert all(scores == [1.0] * 20 and stats[ERRORS_METRIC] == 0.0 for scores, stats in results)
