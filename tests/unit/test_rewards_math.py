"""The `math` reward on a table of equivalent and non-equivalent answers."""

import threading

import pytest

from liteppo_mcore.rewards import RewardError, get_reward, math_reward

EQUIVALENT = [
    # (reference, response)
    ("\\frac{1}{2}", "The answer is \\boxed{0.5}"),  # fraction vs decimal
    ("1/2", "so the answer is $\\frac12$"),  # plain fraction vs LaTeX shorthand, no box
    ("0.5", "\\boxed{\\frac{1}{2}}"),
    ("\\dfrac{3}{4}", "\\boxed{\\frac34}"),
    ("50\\%", "\\boxed{50\\%}"),  # percentages
    ("0.5", "\\boxed{50\\%}"),
    ("\\frac{3}{4}", "\\boxed{75\\%}"),
    ("\\{1,2\\}", "\\boxed{\\{2, 1\\}}"),  # sets: order does not matter
    ("3", "the answer is 3"),  # plain vs plain
    ("\\boxed{3}", "3"),  # boxed reference vs plain response
    ("10", "Adding them up gives 10."),
    ("1,000", "\\boxed{1000}"),  # thousands separator
    ("\\sqrt{2}", "\\boxed{2^{1/2}}"),  # symbolic equality
    ("x^2", "\\boxed{x \\cdot x}"),
    ("\\pi", "\\boxed{\\pi}"),
    ("2", "First I got 3, but the final answer is \\boxed{2}"),  # the boxed answer wins
]

NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}"),
    ("\\frac{2}{3}", "\\boxed{0.667}"),  # a rounded decimal is not the fraction
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}"),
    ("\\{1,2\\}", "\\boxed{\\{1,2,3\\}}"),
    ("(1,2)", "\\boxed{(2,1)}"),  # an ordered pair (interval) is not a set
    ("50\\%", "\\boxed{5}"),
    ("-1", "\\boxed{1}"),
    ("3", "\\boxed{4}"),
    ("2", "I first wrote 2, but \\boxed{3}"),  # the boxed answer wins, and it is wrong
    ("\\pi", "\\boxed{3}"),
]

MALFORMED = [
    ("3", ""),
    ("3", "\\boxed{"),
    ("3", "\\frac{"),
    ("3", "no answer here"),
]


@pytest.mark.parametrize("reference,response", EQUIVALENT)
def test_equivalent_answers_score_one(reference, response):
    assert math_reward(response, reference) == 1.0


@pytest.mark.parametrize("reference,response", NOT_EQUIVALENT)
def test_different_answers_score_zero(reference, response):
    assert math_reward(response, reference) == 0.0


@pytest.mark.parametrize("reference,response", MALFORMED)
def test_malformed_responses_score_zero_without_raising(reference, response):
    assert math_reward(response, reference) == 0.0


@pytest.mark.parametrize("reference", ["", "   "])
def test_empty_reference_is_an_internal_error(reference):
    with pytest.raises(RewardError, match="reference answer is empty"):
        math_reward("\\boxed{3}", reference)


def test_non_string_inputs_raise():
    with pytest.raises(TypeError, match="two strings"):
        math_reward("\\boxed{3}", 3)


def test_registered_as_math():
    assert get_reward("math") is math_reward


def test_works_outside_the_main_thread():
    # math-verify's default time limits use signal.alarm and raise ValueError in a worker thread.
    results = {}

    def score():
        try:
            results["ok"] = [math_reward(resp, ref) for ref, resp in EQUIVALENT[:4] + NOT_EQUIVALENT[:2]]
        except Exception as e:  # recorded so the assertion below shows it
            results["error"] = e

    worker = threading.Thread(target=score)
    worker.start()
    worker.join(timeout=60)
    assert "error" not in results, results.get("error")
    assert results["ok"] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_declares_the_range_of_its_scores():
    from liteppo_mcore.rewards import reward_range

    assert reward_range("math") == math_reward.reward_range == (0.0, 1.0)
