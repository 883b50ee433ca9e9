"""Reward functions chosen by name, and the runner that scores a batch in worker processes under a
per-sample time limit.

Names: ``math`` (math-verify equivalence of the final answer), one per built-in task (``max_digit``),
or ``module:function`` / ``path/to/file.py:function`` for a function of your own taking
``(response_text, reference_answer)`` and returning a float (optionally declaring its range as
``fn.reward_range = (lo, hi)``)::

    runner = build_reward_runner(cfg.reward)      # or RewardRunner.from_name(name, timeout_s=..., num_workers=...)
    scores, stats = runner(responses, answers)    # stats: reward/errors (failures, each scored 0), reward/timeouts
    runner.close()                                # ends the worker processes
"""

from .answer_match import answer_match_reward
from .math_reward import math_reward
from .registry import (
    RewardError,
    RewardFn,
    RewardRange,
    get_reward,
    load_reward_function,
    register_reward,
    reward_names,
    reward_range,
)
from .runner import (
    ERRORS_METRIC,
    TIMEOUTS_METRIC,
    RewardBatchCancelled,
    RewardFailure,
    RewardRunner,
    RewardWorkerError,
    build_reward_runner,
)

# Both declare their range, (0.0, 1.0), as a reward_range attribute.
register_reward("math", math_reward)
# One entry per built-in task of liteppo_mcore.data.builtin_tasks (a test keeps the two lists equal).
register_reward("max_digit", answer_match_reward)

__all__ = [
    "ERRORS_METRIC",
    "TIMEOUTS_METRIC",
    "RewardBatchCancelled",
    "RewardError",
    "RewardFailure",
    "RewardFn",
    "RewardRange",
    "RewardRunner",
    "RewardWorkerError",
    "answer_match_reward",
    "build_reward_runner",
    "get_reward",
    "load_reward_function",
    "math_reward",
    "register_reward",
    "reward_names",
    "reward_range",
]
