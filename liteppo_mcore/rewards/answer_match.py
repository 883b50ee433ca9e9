"""The built-in tasks' reward: exact answer match, with partial credit that gives signal from step one.

The response is read up to its first special token (``<|end|>`` closes the turn; ``<|`` starts every
special token of the built-in tokenizer), so the score is the same whether the trainer decodes with
or without ``skip_special_tokens``. Surrounding whitespace is ignored.

- 1.0  the response is exactly the answer (then the turn ends, or nothing follows): *right*;
- 0.5  it starts with the answer but goes on (the rule is learned, the stop is not);
- 0.2  a wrong answer of the right form: as many characters, digits where the answer has digits,
       then the turn ends (the stop is learned, the rule is not);
- 0.0  anything else.

Declared range: (0.0, 1.0); the runner counts any other value as a failure.

Why two partial credits: the first token alone decides whether a random response scores above zero,
so there is signal from the first step; and the small credit for a well-formed wrong answer teaches
the model to close its turn on every prompt, not only on those it already gets right. Without it,
a policy that has learned the digit is also rewarded for repeating it, and in some runs settles on
never stopping. A constant well-formed answer earns about 0.2 + 0.8 / 10 = 0.28 on average, far
below the 1.0 of the rule, so no shortcut wins.
"""

from __future__ import annotations

SPECIAL_TOKEN_PREFIX = "<|"
RIGHT = 1.0
RIGHT_THEN_MORE = 0.5
WELL_FORMED = 0.2


def response_answer(response_text: str) -> str:
    """The answer part of a response: the text before its first special token, stripped."""
    return response_text.split(SPECIAL_TOKEN_PREFIX, 1)[0].strip()


def _same_form(given: str, answer: str) -> bool:
    return len(given) == len(answer) and all(g.isdigit() == a.isdigit() for g, a in zip(given, answer))


def answer_match_reward(response_text: str, reference_answer: str) -> float:
    """1.0 right, 0.5 right then more text, 0.2 wrong but of the answer's form, else 0.0."""
    if not isinstance(response_text, str) or not isinstance(reference_answer, str):
        raise TypeError(
            f"answer_match takes two strings, got {type(response_text).__name__} and {type(reference_answer).__name__}"
        )
    answer = reference_answer.strip()
    if not answer:
        raise ValueError("the reference answer is empty")
    given = response_answer(response_text)
    if given == answer:
        return RIGHT
    if given.startswith(answer):
        return RIGHT_THEN_MORE
    if _same_form(given, answer):
        return WELL_FORMED
    return 0.0


# a function attribute (registry.RANGE_ATTRIBUTE), which mypy does not model
answer_match_reward.reward_range = (0.0, RIGHT)  # type: ignore[attr-defined]
