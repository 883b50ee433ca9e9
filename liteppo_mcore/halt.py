"""The error that stops a run that cannot usefully go on (exit status 3), and its message for weights
that went non-finite after an update. Pure logic (no torch, no megatron, no process groups), at the
bottom of the package: the update (update/updater.py) raises it, and so does the trainer's circuit
breaker (trainer/health.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EXIT_HALTED = 3


class TrainingHalted(RuntimeError):
    """Training cannot usefully go on; the message says why and what to do. The entry point exits with
    `exit_code` (3). Raised on every rank at the same point, so no rank is left waiting in a collective."""

    exit_code = EXIT_HALTED

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


def step_ranges(steps: Sequence[int]) -> str:
    """`[3, 4, 5, 8]` -> "3-5, 8"."""
    parts: list[str] = []
    ordered = sorted(set(steps))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Non-finite weights after an applied update

@dataclass(frozen=True)
class NonFiniteParameter:
    """Where a rank found its first non-finite parameter (the model's own, local name on that rank)."""

    rank: int
    name: str
    where: str  # "tp 1, pp 0, cp 0, dp 0"


def nonfinite_weights_error(kind: str, *, step: int, update: int, first: NonFiniteParameter | None,
                            bad_ranks: Sequence[int], world_size: int) -> TrainingHalted:
    """The error every rank raises when the weights of `kind` ("actor" or "critic") hold a NaN or an
    infinity after optimizer update `update` (1-based, per model) of step `step` (its number as logged)."""
    lr_key = "critic.lr" if kind == "critic" else "train.lr"
    if len(bad_ranks) == 1:
        holders = f"rank {bad_ranks[0]} of {world_size} holds non-finite parameters"
    else:
        holders = f"ranks {step_ranges(bad_ranks) or '(unknown)'} of {world_size} hold non-finite parameters"
    found = holders if first is None else (
        f"the first non-finite parameter is {first.name!r} on rank {first.rank} ({first.where}); {holders}")
    return TrainingHalted(
        f"training halted: the {kind} weights are not finite (NaN or infinity) after its optimizer update "
        f"{update}, in step {step}: {found}. The loss and the gradient norm were finite, so the update itself "
        f"diverged. Lower {lr_key} (or lengthen train.lr_warmup_steps), check the data of step {step}, then "
        "resume from the last checkpoint (run the same command again); nothing of this step was saved.", step=step)
