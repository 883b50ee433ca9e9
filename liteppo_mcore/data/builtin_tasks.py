"""Built-in synthetic tasks: verifiable prompts generated in code, with held-out prompts, no downloads.

``max_digit``: the prompt is ``max:`` followed by 3 to 8 digits; the answer is the largest of them,
one digit, after which the model closes its turn. For example ``max:04241112`` -> ``4``.

Why this rule (docs/data_and_rewards.md has the measurements):
- The largest digit is found by one attention head whose score grows with the digit's value, a
  pattern a two-layer model picks up within a few hundred RL steps from random initialization; rules
  that need a position lookup (the k-th digit) or a rule named in the prompt learned far more slowly.
- The answer is drawn uniformly from 0-9 first and the other digits below or equal to it, so every
  answer is equally likely: a constant response is right on at most 10.5% of the training prompts
  (14% of the held-out ones, which are distinct prompts and so have fewer tiny answers). With digits
  drawn independently the largest would be 9 on most prompts, and "9" would win.
- The answer is the first response token and the vocabulary has 29 tokens, so a uniformly random
  response starts with the right digit about 1 time in 30; with the task's reward (partial credit
  for the right digit, a little for any well-formed digit; liteppo_mcore.rewards.answer_match) there
  is signal from the first step.

Prompts are drawn from one fixed-seed stream (the same on every rank and every run); a prompt is
held out when the CRC-32 of its text falls in the held-out bucket, so no held-out prompt is ever a
training prompt, whatever the counts.
"""

from __future__ import annotations

import functools
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import DataError

Example = tuple[str, str]  # (prompt text, reference answer)
SPLITS = ("train", "eval")
HELD_OUT_BUCKETS = 10  # one prompt text in ten (by CRC-32) is held out


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    """Registry name, used as data.builtin_task and reward.name."""
    description: str
    """One line for the docs and the error listing."""
    sample: Callable[[random.Random], Example]
    """Draws one (prompt, answer) pair from the given generator."""
    answer_space: tuple[str, ...]
    """Every possible answer (used to check that no constant response wins)."""
    response_length: int = 4
    """Suggested response_length: room for the answer, the end-of-turn token and a little slack."""
    num_train: int = 20000
    """Training prompts: draws from the task's distribution (repeats allowed, answers uniform)."""
    num_eval: int = 500
    """Held-out prompts, all distinct."""
    generator_seed: int = 1234
    """Seed of the prompt stream; fixed, so every rank and every run sees the same prompts."""


def _sample_max_digit(rng: random.Random) -> Example:
    answer = rng.randrange(10)
    length = rng.randint(3, 8)
    digits = [rng.randint(0, answer) for _ in range(length - 1)]
    digits.insert(rng.randrange(length), answer)  # the answer occurs at least once, anywhere
    return "max:" + "".join(map(str, digits)), str(answer)


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    task.name: task
    for task in (
        BuiltinTask(
            name="max_digit",
            description="the largest digit of a list of 3-8 digits (answer uniform over 0-9)",
            sample=_sample_max_digit,
            answer_space=tuple(str(d) for d in range(10)),
        ),
    )
}


def builtin_task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(BUILTIN_TASKS)


def get_builtin_task(name: str) -> BuiltinTask:
    """The task registered as ``name``; an unknown name is an error listing the valid ones."""
    if name not in BUILTIN_TASKS:
        listing = "; ".join(f"{n}: {BUILTIN_TASKS[n].description}" for n in builtin_task_names())
        raise DataError(f"data.builtin_task={name!r} is not a built-in task. Valid names: {listing}.")
    return BUILTIN_TASKS[name]


def is_held_out(prompt: str) -> bool:
    """Whether a prompt text belongs to the held-out split (CRC-32: stable across runs and machines)."""
    return zlib.crc32(prompt.encode("utf-8")) % HELD_OUT_BUCKETS == 0


@functools.lru_cache(maxsize=8)
def _generate(name: str) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    task = get_builtin_task(name)
    rng = random.Random(task.generator_seed)
    train: list[Example] = []
    held_out: dict[str, str] = {}  # distinct prompts: a repeated question would only reweight the score
    # Bounded: with one bucket in ten held out, about 10 * num_eval draws fill the held-out split.
    for _ in range(100 * (task.num_train + task.num_eval)):
        if len(train) >= task.num_train and len(held_out) >= task.num_eval:
            break
        prompt, answer = task.sample(rng)
        if not is_held_out(prompt):
            if len(train) < task.num_train:
                train.append((prompt, answer))
        elif len(held_out) < task.num_eval:
            held_out.setdefault(prompt, answer)
    else:
        raise RuntimeError(f"built-in task {name!r} could not fill its splits; its prompt space is too small")
    return tuple(train), tuple(held_out.items())


def task_examples(name: str, split: str = "train") -> list[Example]:
    """The (prompt, answer) pairs of a task's split, ``train`` or ``eval``; identical on every call."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train, held_out = _generate(name)
    return list(train if split == "train" else held_out)
