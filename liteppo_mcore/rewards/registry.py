"""Reward functions by name: a small registry, plus ``module:function`` for users' own functions.

A reward function takes ``(response_text, reference_answer)`` and returns a float. It raises on an
internal error (a reference it cannot read, a bug); the runner turns that into reward 0 and counts it
in ``reward/errors``, so a raise never stops training, but it is never silently a wrong score either.

A custom function is named ``module:function`` (an importable module, e.g. ``my_rewards:score`` with
its directory on PYTHONPATH, or ``pkg.sub:score``) or ``path/to/file.py:function``.

Declared ranges: a function may declare the closed interval ``(lo, hi)`` its values lie in, as an
attribute ``fn.reward_range = (0.0, 1.0)`` or with ``register_reward(name, fn, range=(lo, hi))``. The
runner then treats a value outside it as a failure (``out_of_range``), never as a score. The built-in
rewards declare ``(0.0, 1.0)``; a function without a declaration is unrestricted.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable
from typing import Any

RewardFn = Callable[[str, str], float]
RewardRange = tuple[float, float]
RANGE_ATTRIBUTE = "reward_range"

_REGISTRY: dict[str, RewardFn] = {}
_RANGES: dict[str, RewardRange | None] = {}


class RewardError(RuntimeError):
    """A reward function could not score a sample for a reason of its own (not a wrong answer)."""


def check_range(value: Any, where: str) -> RewardRange | None:
    """``value`` as a ``(lo, hi)`` pair of floats with ``lo <= hi`` (infinite ends allowed), or None."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a reward range is a pair (lo, hi) of numbers, got {value!r}") from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"{where}: a reward range needs lo <= hi, got {value!r}")
    return (lo, hi)


def declared_range(fn: Any) -> RewardRange | None:
    """The range ``fn`` declares in its ``reward_range`` attribute, or None."""
    return check_range(getattr(fn, RANGE_ATTRIBUTE, None), f"{getattr(fn, '__qualname__', fn)!r}.{RANGE_ATTRIBUTE}")


def register_reward(name: str, fn: RewardFn, range: RewardRange | None = None) -> RewardFn:  # noqa: A002
    """Make ``fn`` available as ``reward.name: <name>``; names are unique.

    ``range``: the closed interval of values ``fn`` returns; None takes ``fn.reward_range`` if it has
    one, else the values are unrestricted."""
    if not name or ":" in name:
        raise ValueError(
            f"a reward name must be non-empty and without ':' (that form names module:function), got {name!r}"
        )
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"a reward named {name!r} is already registered ({_REGISTRY[name]!r})")
    where = f"register_reward({name!r})"
    checked = check_range(range, where) if range is not None else declared_range(fn)
    if name in _REGISTRY and _RANGES[name] != checked:
        raise ValueError(f"{where}: already registered with range {_RANGES[name]}, not {checked}")
    _REGISTRY[name] = fn
    _RANGES[name] = checked
    return fn


def reward_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def reward_range(name: str) -> RewardRange | None:
    """The declared range of the reward ``name`` (registered, or the function's ``reward_range``), or None."""
    if name in _REGISTRY:
        return _RANGES[name]
    return declared_range(get_reward(name))


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``, or loaded from ``module:function``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return load_reward_function(name)
    raise ValueError(
        f"reward.name={name!r} is not a known reward. Valid names: {', '.join(reward_names())}; "
        "or your own function as module:function (e.g. my_rewards:score, with its directory on PYTHONPATH) "
        "or path/to/file.py:function."
    )


def canonical_name(name: str) -> str:
    """``name`` with a relative ``path/to/file.py`` made absolute, so that it names the same function
    from any working directory (a worker process resolves the function again by this name)."""
    if name in _REGISTRY or ":" not in name:
        return name
    module_name, _, attr = name.rpartition(":")
    if module_name.endswith(".py") and not os.path.isabs(module_name):
        return f"{os.path.abspath(module_name)}:{attr}"
    return name


def load_reward_function(spec: str) -> RewardFn:
    """Import ``module:function`` or ``path/to/file.py:function`` and check it takes two arguments."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"reward.name={spec!r}: expected module:function, e.g. my_rewards:score")
    module = _import(module_name, spec)
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ValueError(
            f"reward.name={spec!r}: module {module_name!r} has no attribute {attr!r} "
            f"(its callables: {', '.join(public) or 'none'})."
        )
    if not callable(fn):
        raise ValueError(
            f"reward.name={spec!r}: {module_name}.{attr} is not callable (it is of type {type(fn).__name__})."
        )
    try:
        inspect.signature(fn).bind("response", "answer")
    except TypeError as e:
        raise ValueError(
            f"reward.name={spec!r}: {attr} must accept (response_text, reference_answer) and return a float ({e})."
        ) from None
    except ValueError:
        pass  # some builtins have no introspectable signature; calling them will tell
    return fn


def _import(module_name: str, spec: str):
    try:
        if module_name.endswith(".py"):
            return _import_file(module_name)
        return importlib.import_module(module_name)
    except Exception as e:
        hint = (
            "Check the file path."
            if module_name.endswith(".py")
            else f"Make it importable: install it, or put its directory on PYTHONPATH (sys.path starts {sys.path[:3]})."
        )
        raise ValueError(
            f"reward.name={spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}). {hint}"
        ) from e


def _import_file(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file {path!r} (relative paths are read from {os.getcwd()!r})")
    name = "liteppo_user_reward_" + os.path.splitext(os.path.basename(path))[0]
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:  # not for a .py file, the only kind _import passes
        raise ImportError(f"cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module
