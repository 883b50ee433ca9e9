"""``math``: is the response's final answer equivalent to the reference? Decided by math-verify.

math-verify extracts the answer (``\\boxed{}`` first, then LaTeX or plain expressions) and compares
symbolically and numerically: ``\\frac{1}{2}`` = ``0.5`` = ``1/2``, ``50\\%`` = ``0.5``, ``\\{1,2\\}`` =
``\\{2,1\\}``, ``1,000`` = ``1000``. A response without a readable answer scores 0; a reference
that cannot be read at all raises (bad data, counted in ``reward/errors``).

Time limits: math-verify's own use ``signal.alarm``, which only works in a process's main thread
(``parse``/``verify`` raise ``ValueError`` elsewhere), so they are switched off here and the runner's
per-sample time limit (it kills the worker process) applies instead. Declared range: (0.0, 1.0).
"""

from __future__ import annotations

import functools
import logging

from .registry import RewardError

# Switching math-verify's alarms off makes it warn once that we must bound the time ourselves; the
# runner does, so that warning is noise.
_DISABLED_TIMEOUT_WARNING = "Timeout is disabled"


class _DropDisabledTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DISABLED_TIMEOUT_WARNING)


@functools.cache
def _math_verify():
    """math-verify's (parse, verify), imported at first use: the trainer imports this module for every
    run, also those (the built-in tasks) that never score with math-verify."""
    from math_verify import parse, verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
    return parse, verify


def parse_reference(reference: str) -> list:
    """math-verify's parse of a reference answer; a bare reference is read as if it were boxed."""
    parse, _ = _math_verify()
    text = reference.strip()
    # A bare "\{1,2\}" or "x^2" is not found by the unanchored extractors; inside \boxed{} it is.
    candidates = [text] if "\\boxed" in text else [f"\\boxed{{{text}}}", text]
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def math_reward(response_text: str, reference_answer: str) -> float:
    """1.0 when the response's final answer equals the reference mathematically, else 0.0."""
    if not isinstance(response_text, str) or not isinstance(reference_answer, str):
        raise TypeError(
            f"math reward takes two strings, got {type(response_text).__name__} and {type(reference_answer).__name__}"
        )
    if not reference_answer.strip():
        raise RewardError("the reference answer is empty; fix the dataset's answer field")
    parse, verify = _math_verify()
    gold = parse_reference(reference_answer)
    if not gold:
        raise RewardError(f"math-verify cannot read the reference answer {reference_answer!r}; fix the dataset")
    predicted = parse(response_text, parsing_timeout=None)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0


# a function attribute (registry.RANGE_ATTRIBUTE), which mypy does not model
math_reward.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]
