"""Which stage of the run this process is in (rollout, reward, normalization, train, eval, checkpoint, ...)
and which step, so that an error raised deep inside a collective can say where the run was.

    set_step(3)
    with stage("normalization"):
        ...

`PhaseTimer` blocks set the stage too. The record is process-wide (the main thread's view) and costs a
couple of attribute writes: safe to use around every phase of every step. A stage ends by restoring
the one it interrupted, and the stage that ended last is remembered, so that code between named stages
is still reported as "after <stage>". An exception leaving a stage carries the stage it was raised in
(`stage_of_exception`), since by the time it is reported the stages it left have ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    """A snapshot: the stage in progress (None between named stages), the step, and the last stage that ended."""

    name: str | None
    step: int | None
    previous: str | None = None

    def describe(self) -> str:
        """'in stage normalization of step 3', 'after stage reward of step 3', 'outside any named stage'."""
        if self.name is not None:
            where = f"in stage {self.name}"
        elif self.previous is not None:
            where = f"after stage {self.previous}"
        else:
            where = "outside any named stage"
        return where if self.step is None else f"{where} of step {self.step}"


class _Record:
    name: str | None = None
    step: int | None = None
    previous: str | None = None


_record = _Record()
_ATTRIBUTE = "_liteppo_stage"


def set_stage(name: str | None, step: int | None = None) -> None:
    """Enter stage `name` (None: no named stage); `step`, when given, becomes the current step."""
    if name is None and _record.name is not None:
        _record.previous = _record.name
    _record.name = name
    if step is not None:
        _record.step = int(step)


def set_step(step: int | None) -> None:
    """The step in progress (the number the step line prints for it); None clears it."""
    _record.step = None if step is None else int(step)


def current_stage() -> StageInfo:
    return StageInfo(_record.name, _record.step, _record.previous)


@contextmanager
def stage(name: str, step: int | None = None) -> Iterator[None]:
    """Be in stage `name` for the block, then back in the stage it interrupted (the step stays)."""
    outer = _record.name
    set_stage(name, step)
    try:
        yield
    except BaseException as exc:
        if stage_of_exception(exc) is None:  # the innermost stage is the one to report
            try:
                setattr(exc, _ATTRIBUTE, current_stage())
            except (AttributeError, TypeError):  # exceptions without a __dict__ go unannotated
                pass
        raise
    finally:
        _record.previous = name
        _record.name = outer


def stage_of_exception(exc: BaseException) -> StageInfo | None:
    """The stage `exc` was raised in, if it left a `stage` block (else None)."""
    info = getattr(exc, _ATTRIBUTE, None)
    return info if isinstance(info, StageInfo) else None


def reset() -> None:
    """Forget the stage, the step and the last stage (tests, or a new run in the same process)."""
    _record.name = _record.step = _record.previous = None
