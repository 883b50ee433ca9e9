"""Reward functions by name: a small registry, plus ``module:function`` for users' own functions.

A reward function takes ``(response_text, reference_answer)`` and returns a float. It raises on an
internal error (a reference it cannot read, a bug); the runner turns that into reward 0 and counts it
in ``reward/errors``, so a raise never stops training, but it is never silently a wrong score either.

A custom function is named ``module:function`` (an importable module, e.g. ``my_rewards:score`` with
its directory on PYTHONPATH, or ``pkg.sub:score``) or ``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Callable, Dict, List

RewardFn = Callable[[str, str], float]

_REGISTRY: Dict[str, RewardFn] = {}


class RewardError(RuntimeError):
    """A reward function could not score a sample for a reason of its own (not a wrong answer)."""


def register_reward(name: str, fn: RewardFn) -> RewardFn:
    """Make ``fn`` available as ``reward.name: <name>``; names are unique."""
    if not name or ":" in name:
        raise ValueError(
            f"a reward name must be non-empty and without ':' (that form names module:function), got {name!r}"
        )
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"a reward named {name!r} is already registered ({_REGISTRY[name]!r})")
    _REGISTRY[name] = fn
    return fn


def reward_names() -> List[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


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
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module
