"""Choosing a reward by name, and plugging in a user's function as module:function."""

import textwrap

import pytest

from liteppo_mcore.rewards import (
    answer_match_reward,
    get_reward,
    math_reward,
    register_reward,
    reward_names,
    reward_range,
)


def test_registered_names():
    assert reward_names() == ["math", "max_digit"]
    assert get_reward("math") is math_reward
    assert get_reward("max_digit") is answer_match_reward


def test_unknown_name_lists_valid_names_and_the_module_form():
    with pytest.raises(ValueError) as info:
        get_reward("maths")
    message = str(info.value)
    assert "'maths'" in message
    assert "math, max_digit" in message
    assert "module:function" in message


def _write_module(directory, name, body):
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_module_function_is_imported(tmp_path, monkeypatch):
    _write_module(tmp_path, "user_rewards_ok", """
        def length_bonus(response, answer):
            return 1.0 if response.strip() == answer else 0.25
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("user_rewards_ok:length_bonus")
    assert fn("7", "7") == 1.0
    assert fn("8", "7") == 0.25


def test_file_path_function_is_loaded(tmp_path):
    path = _write_module(tmp_path, "from_file", """
        def score(response, answer):
            return float(len(response))
    """)
    assert get_reward(f"{path}:score")("abc", "x") == 3.0


def test_failing_import_names_the_module_and_the_error(tmp_path, monkeypatch):
    _write_module(tmp_path, "user_rewards_broken", """
        import a_module_that_does_not_exist_anywhere
        def score(response, answer):
            return 0.0
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as info:
        get_reward("user_rewards_broken:score")
    message = str(info.value)
    assert "'user_rewards_broken'" in message
    assert "ModuleNotFoundError" in message and "a_module_that_does_not_exist_anywhere" in message


def test_missing_module_names_it():
    with pytest.raises(ValueError, match="cannot import module 'no_such_reward_module_xyz'"):
        get_reward("no_such_reward_module_xyz:score")


def test_missing_function_lists_the_module_callables(tmp_path, monkeypatch):
    _write_module(tmp_path, "user_rewards_names", """
        def exact(response, answer):
            return 1.0
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"has no attribute 'exakt' \(its callables: exact\)"):
        get_reward("user_rewards_names:exakt")


def test_function_with_wrong_arity_is_rejected(tmp_path, monkeypatch):
    _write_module(tmp_path, "user_rewards_arity", """
        def one_arg(response):
            return 1.0
        NOT_CALLABLE = 3
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"must accept \(response_text, reference_answer\)"):
        get_reward("user_rewards_arity:one_arg")
    with pytest.raises(ValueError, match=r"is not callable \(it is of type int\)"):
        get_reward("user_rewards_arity:NOT_CALLABLE")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        get_reward(f"{tmp_path / 'absent.py'}:score")


def test_register_rejects_duplicates_and_colons():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math", lambda r, a: 0.0)
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("a:b", lambda r, a: 0.0)


# --- declared ranges ---------------------------------------------------------------------------
@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by the test are undone afterwards."""
    from liteppo_mcore.rewards import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_RANGES", dict(registry._RANGES))
    return registry


def test_builtin_rewards_declare_their_range():
    assert reward_range("math") == (0.0, 1.0)
    assert reward_range("max_digit") == (0.0, 1.0)
    assert math_reward.reward_range == (0.0, 1.0) and answer_match_reward.reward_range == (0.0, 1.0)


def test_register_with_a_range_or_by_the_attribute(scratch_registry):
    def plain(response, answer):
        return 0.0

    def declared(response, answer):
        return 0.0

    declared.reward_range = (-1, 1)
    register_reward("t_plain", plain)
    register_reward("t_declared", declared)
    register_reward("t_given", lambda r, a: 0.0, range=(0, 5))
    assert reward_range("t_plain") is None
    assert reward_range("t_declared") == (-1.0, 1.0)
    assert reward_range("t_given") == (0.0, 5.0)


def test_a_custom_function_declares_its_range_by_attribute(tmp_path, monkeypatch):
    _write_module(tmp_path, "user_rewards_ranges", """
        def bounded(response, answer):
            return 0.0
        bounded.reward_range = (0, 10)
        def free(response, answer):
            return 0.0
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reward_range("user_rewards_ranges:bounded") == (0.0, 10.0)
    assert reward_range("user_rewards_ranges:free") is None


@pytest.mark.parametrize("bad", [(1, 0), (0, float("nan")), (0,), "ab", 3])
def test_a_malformed_range_is_refused(scratch_registry, bad):
    with pytest.raises(ValueError, match="reward range"):
        register_reward("t_bad", lambda r, a: 0.0, range=bad)
    assert "t_bad" not in reward_names()


def test_infinite_ends_are_allowed(scratch_registry):
    register_reward("t_nonneg", lambda r, a: 0.0, range=(0, float("inf")))
    assert reward_range("t_nonneg") == (0.0, float("inf"))


def test_canonical_name_makes_a_file_path_absolute(tmp_path, monkeypatch):
    from liteppo_mcore.rewards.registry import canonical_name

    monkeypatch.chdir(tmp_path)
    assert canonical_name("rel/f.py:score") == f"{tmp_path}/rel/f.py:score"
    assert canonical_name("/abs/f.py:score") == "/abs/f.py:score"
    assert canonical_name("pkg.mod:score") == "pkg.mod:score"
    assert canonical_name("math") == "math"


def test_registering_again_with_another_range_is_refused(scratch_registry):
    register_reward("math", math_reward)  # the same function and range: a no-op
    with pytest.raises(ValueError, match="already registered with range"):
        register_reward("math", math_reward, range=(0, 2))
