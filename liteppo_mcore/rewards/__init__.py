"""Reward functions chosen by name, and the runner that scores a batch under a time limit.

Names: ``math`` (math-verify equivalence of the final answer), one per built-in task (``max_digit``),
or ``module:function`` / ``path/to/file.py:function`` for a function of your own taking
``(response_text, reference_answer)`` and returning a float::

    runner = build_reward_runner(cfg.reward)      # or RewardRunner(get_reward(name), timeout_s=..., num_workers=...)
    scores, stats = runner(responses, answers)    # stats["reward/errors"]: errors and time-outs, each scored 0
"""

from .answer_match import answer_match_reward
from .math_reward import math_reward
from .registry import RewardError, RewardFn, get_reward, load_reward_function, register_reward, reward_names
from .runner import ERRORS_METRIC, RewardFailure, RewardRunner, build_reward_runner

register_reward("math", math_reward)
# One entry per built-in task of liteppo_mcore.data.builtin_tasks (a test keeps the two lists equal).
register_reward("max_digit", answer_match_reward)

__all__ = [
    "ERRORS_METRIC",
    "RewardError",
    "RewardFailure",
    "RewardFn",
    "RewardRunner",
    "answer_match_reward",
    "build_reward_runner",
    "get_reward",
    "load_reward_function",
    "math_reward",
    "register_reward",
    "reward_names",
]
