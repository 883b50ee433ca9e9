"""Stopping a run that cannot make progress: the circuit breaker over consecutive bad steps (the error
that ends a run with exit status 3, `TrainingHalted`, lives in liteppo_mcore/halt.py, where the update raises it
for weights that went non-finite).

    health = StepHealth.from_config(cfg)                       # train.max_consecutive_bad_steps
    health.observe(step, metrics, num_responses=cfg.num_responses_per_step)   # may raise TrainingHalted

A step is bad when every reward of the step failed (`reward/errors` equals the step's number of
responses), when every update of a model was skipped (`actor/skipped_updates` or
`critic/skipped_updates` equals the updates a step makes), or when the actor's gradient norm is exactly
0 (`actor/grad_norm == 0`; it is NaN, not 0, when every update was skipped). Every metric read here is
global (reduced over the ranks before it is reported), so every rank reaches the same decision without
a collective, as long as every rank calls `observe` with the same metrics.

Pure logic: no torch, no megatron, no process groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from liteppo_mcore.halt import EXIT_HALTED, TrainingHalted, step_ranges

__all__ = ["BAD_STEP_KINDS", "EXIT_HALTED", "BadStepKind", "StepHealth", "TrainingHalted", "bad_step_kinds",
           "step_ranges"]

# ---------------------------------------------------------------------------------------------------
# The circuit breaker

@dataclass(frozen=True)
class BadStepKind:
    key: str
    what: str   # "every reward of the step failed"
    hint: str   # what to look at


REWARDS_FAILED = BadStepKind(
    "rewards_failed", "every reward of the step failed",
    "the reward function is broken: see reward/errors in the metrics and the logged failures ('reward <name>: "
    "<kind> on sample ...')")
ACTOR_UPDATES_SKIPPED = BadStepKind(
    "actor_updates_skipped", "every actor update was skipped",
    "see the logged skip reasons ('actor update skipped, weights unchanged: ...'): the loss or the gradient "
    "norm was not finite")
CRITIC_UPDATES_SKIPPED = BadStepKind(
    "critic_updates_skipped", "every critic update was skipped",
    "see the logged skip reasons ('critic update skipped, weights unchanged: ...'): the loss or the gradient "
    "norm was not finite")
ZERO_GRADIENT = BadStepKind(
    "zero_gradient", "the actor's gradient norm was 0",
    "all advantages are zero: every group has identical rewards; check the reward function and the reward "
    "normalization (reward_norm, num_return_sequences_in_group)")
BAD_STEP_KINDS: tuple[BadStepKind, ...] = (REWARDS_FAILED, ACTOR_UPDATES_SKIPPED, CRITIC_UPDATES_SKIPPED,
                                           ZERO_GRADIENT)


def _metric(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def bad_step_kinds(metrics: Mapping[str, float], *, num_responses: int,
                   updates_per_step: int) -> tuple[BadStepKind, ...]:
    """The kinds of bad step `metrics` (one step's global metrics) shows, in `BAD_STEP_KINDS` order."""
    found = []
    errors = _metric(metrics, "reward/errors")
    if num_responses > 0 and errors is not None and errors >= num_responses:
        found.append(REWARDS_FAILED)
    for kind, prefix in ((ACTOR_UPDATES_SKIPPED, "actor"), (CRITIC_UPDATES_SKIPPED, "critic")):
        skipped = _metric(metrics, f"{prefix}/skipped_updates")
        if skipped is not None and skipped >= updates_per_step:
            found.append(kind)
    if _metric(metrics, "actor/grad_norm") == 0.0:  # NaN (every update skipped) is read as None
        found.append(ZERO_GRADIENT)
    return tuple(found)


def _steps(steps: Sequence[int]) -> str:
    return f"step {steps[0]}" if len(set(steps)) == 1 else f"steps {step_ranges(steps)}"


class StepHealth:
    """Counts consecutive bad steps; `observe` raises `TrainingHalted` when the count reaches the limit.

    `max_consecutive_bad_steps` is `train.max_consecutive_bad_steps` (0: never stop); `updates_per_step`
    is the number of optimizer updates each model attempts per step (ppo_epochs x mini-batches). Any
    good step resets the count; bad steps of different kinds in a row count together.
    """

    def __init__(self, max_consecutive_bad_steps: int, *, updates_per_step: int) -> None:
        if max_consecutive_bad_steps < 0:
            raise ValueError(f"max_consecutive_bad_steps must be >= 0, got {max_consecutive_bad_steps}")
        if updates_per_step < 1:
            raise ValueError(f"updates_per_step must be >= 1, got {updates_per_step}")
        self.limit = int(max_consecutive_bad_steps)
        self.updates_per_step = int(updates_per_step)
        self._streak: list[tuple[int, tuple[BadStepKind, ...]]] = []

    @classmethod
    def from_config(cls, cfg) -> StepHealth:
        updates = cfg.ppo_epochs * (cfg.num_responses_per_step // cfg.train.mini_batch_size)
        return cls(cfg.train.max_consecutive_bad_steps, updates_per_step=max(1, updates))

    @property
    def consecutive_bad_steps(self) -> int:
        return len(self._streak)

    def observe(self, step: int, metrics: Mapping[str, float], *, num_responses: int,
                updates_per_step: int | None = None) -> None:
        """Record step `step` (its number as logged) from its global `metrics`; `num_responses` is the
        step's number of responses over all ranks, `updates_per_step` the updates it made room for when
        not the configured number (a filter_groups step short of informative groups). Raises
        `TrainingHalted` on the limit-th bad step in a row."""
        updates = self.updates_per_step if updates_per_step is None else max(1, updates_per_step)
        kinds = bad_step_kinds(metrics, num_responses=num_responses, updates_per_step=updates)
        if not kinds:
            self._streak.clear()
            return
        if self.limit == 0:
            return
        self._streak.append((int(step), kinds))
        if len(self._streak) >= self.limit:
            message = self._message()
            self._streak.clear()
            raise TrainingHalted(message, step=int(step))

    def state_dict(self) -> dict[str, Any]:
        """The current streak (checkpointed, so that a resume continues counting)."""
        return {"streak": [[step, [kind.key for kind in kinds]] for step, kinds in self._streak]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        by_key = {kind.key: kind for kind in BAD_STEP_KINDS}
        self._streak = [(int(step), tuple(by_key[k] for k in keys)) for step, keys in state.get("streak", [])]

    def _message(self) -> str:
        steps = [s for s, _ in self._streak]
        by_kind: dict[str, list[int]] = {}
        for s, kinds in self._streak:
            for kind in kinds:
                by_kind.setdefault(kind.key, []).append(s)
        plural = "s" if len(steps) != 1 else ""
        lines = [f"training halted: {len(steps)} consecutive bad step{plural} ({_steps(steps)}) reached "
                 f"the limit train.max_consecutive_bad_steps={self.limit}."]
        for kind in BAD_STEP_KINDS:
            if kind.key in by_kind:
                lines.append(f"  {kind.what} ({_steps(by_kind[kind.key])}): {kind.hint}.")
        lines.append("Fix the cause, then resume from the last checkpoint (run the same command again), or set "
                     "train.max_consecutive_bad_steps=0 to never stop for bad steps.")
        return "\n".join(lines)
