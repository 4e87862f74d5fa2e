"""Step endings: how a step that did not simply return ended, in its record and in its level's fate;
and how a level ended (finished, the `StepFailed` of its failure, a cancellation still to deliver).

`StepEndings` is the part of the scheduler (`_executor.Run`) that sorts out a step's exception:
stopped at a stopping point, cancelled, failed (which halts its level), or fatal (`KeyboardInterrupt`,
`SystemExit`, raised again once the run is over). A step that returned is recorded on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._checkpoint import Checkpoint
from ._context import StepContext
from ._control import Control, cancellation_in_effect
from ._errors import StepFailed, StopRequested
from ._outcome import StepStatus
from ._plan import Plan
from ._timeline import StepRecord, Timeline

__all__ = ["CLEANUP_TIMEOUT", "StepEndings"]

CLEANUP_TIMEOUT = 1.0
"""Seconds the generators of a cancelled step's unfinished `iterate()` loops get to close."""


def _first_stop(group: BaseExceptionGroup[Any]) -> StopRequested | None:
    for exc in group.exceptions:
        if isinstance(exc, StopRequested):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_stop(exc)) is not None:
            return found
    return None


class StepEndings:
    """What a level of a run does when one of its steps ends other than by returning (a base of `Run`)."""

    __slots__ = ("failure", "fatal", "halted")

    # Set by `Run`.
    control: Control
    cancelled_exc: type[BaseException]
    task_group: TaskGroup | None
    outputs: dict[str, Any]
    records: dict[str, StepRecord]
    timeline: Timeline
    includes: Mapping[str, StepEndings]
    path: tuple[str, ...]  # the include steps leading to this level
    plan: Plan
    checkpoint: Callable[[], Checkpoint]  # this level's checkpoint

    def __init__(self) -> None:
        # Why this level is being abandoned, if it is; `halted` is their "or", checked per step.
        self.halted = False
        self.failure: tuple[str, BaseException] | None = None  # the first step that failed, and its exception
        self.fatal: BaseException | None = None  # KeyboardInterrupt, SystemExit from a step

    @property
    def finished(self) -> bool:
        """Every step of this level completed."""
        return len(self.outputs) == len(self.plan.specs)

    def halt(self) -> None:
        """Start no more steps here and cancel the running ones (a step failed)."""
        self.halted = True
        if self.task_group is not None:
            self.task_group.cancel_scope.cancel()

    def stopped(
        self, name: str, record: StepRecord, ctx: StepContext | None, stop: StopRequested | None, raised: BaseException
    ) -> None:
        if ctx is not None and ctx._stop:
            record.finish(StepStatus.INTERRUPTED)
            record.stopped_at = stop.stopped_at if stop is not None else None
        else:
            # Nobody asked this step to stop: raising StopRequested itself is a bug in the step.
            self.failed(name, record, raised)

    def ended_in_group(
        self, name: str, record: StepRecord, ctx: StepContext | None, group: BaseExceptionGroup[Any]
    ) -> None:
        """A step raised an exception group (from a task group inside it)."""
        _, rest = group.split(StopRequested)
        if rest is None and cancellation_in_effect():
            # Stops only, but the step is being cancelled: asyncio's task group dropped the
            # cancellation from the group (trio's keeps it). Report it as trio would.
            record.finish(StepStatus.CANCELLED)
            self.control.close()
        elif rest is None:
            self.stopped(name, record, ctx, _first_stop(group), group)
        elif rest.split(self.cancelled_exc)[1] is None:
            # Only stops and cancellations: the cancellation is what ends the step. Raise the
            # cancellations alone, or the caller's cancel scope could not absorb them.
            record.finish(StepStatus.CANCELLED)
            raise rest from None
        else:
            self.failed(name, record, group)

    def failed(self, name: str, record: StepRecord, exc: BaseException) -> None:
        record.finish(StepStatus.FAILED)
        record.error = f"{type(exc).__name__}: {exc}"
        if self.failure is None:
            self.failure = (name, exc)
            self.halt()  # siblings still running end CANCELLED

    def drop_unstorable(self) -> bool:
        """A save failed with a `CheckpointError`: fail the steps whose output cannot be stored (it
        cannot be serialised, or is nested too deep to read back where it sits), here and in the
        included flows running, and leave their outputs out, so that the run can still be saved
        (and ends stored as failed, resumable, not running for ever). True if there was any (else
        the store raised it for another reason).

        Only steps that completed in this attempt and are still being saved have a record here: an
        output resumed from a checkpoint has none, and one already saved could be stored."""
        dropped = False
        for name, error in self.checkpoint().unstorable(len(self.path)).items():
            record = self.records.get(name)
            if record is not None and record.status is StepStatus.COMPLETED:
                del self.outputs[name]
                self.timeline.cache.pop(name, None)  # its report, cached as final when it completed
                self.failed(name, record, error)
                dropped = True
        for inner in list(self.includes.values()):
            dropped = inner.drop_unstorable() or dropped
        return dropped

    def fatal_error(self, record: StepRecord, exc: BaseException) -> None:
        """KeyboardInterrupt, SystemExit: record it, end the run, and re-raise it as itself once
        the task group is gone (raised here, it would leave run() in an exception group)."""
        record.finish(StepStatus.FAILED)
        record.error = f"{type(exc).__name__}: {exc}"
        if self.fatal is None:
            self.fatal = exc
            self.halt()

    def cancelled_include(self, name: str, record: StepRecord, inner: StepEndings) -> None:
        """The include step is being cancelled: a failure inside it, if any, still counts."""
        if inner.fatal is not None:
            self.fatal_error(record, inner.fatal)
        elif inner.failure is not None:
            self.failed(name, record, inner.step_failed())
        else:
            record.finish(StepStatus.CANCELLED)

    async def close_iterations(self, name: str, record: StepRecord, ctx: StepContext) -> None:
        """Close the generators of `ctx.iterate()` loops the step left unfinished, so their
        `finally` blocks run now rather than at garbage collection."""
        try:
            if cancellation_in_effect():
                # The step was cancelled (forced, a sibling failed, the caller cancelled): shield
                # the cleanup from that cancellation, but not for ever.
                with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                    await ctx._close_iterations()
            else:
                await ctx._close_iterations()
        except Exception as exc:
            if record.status is StepStatus.FAILED:
                # Keep the step's own error first; the cleanup's comes after it.
                record.error = f"{record.error}; then closing an iterate() source raised {type(exc).__name__}: {exc}"
            else:
                record.stopped_at = None
                self.failed(name, record, exc)

    async def let_cancellation_through(self) -> None:
        """Raise the cancellation of the caller's scope, if one is pending when the run ends unfinished.

        A shield, or a step that stopped at a stopping point, may have let the task group exit
        without an await to deliver it; the run must not return as if it had only been stopped.
        """
        control = self.control
        if self.failure is None and control.bad_signal is None and control.store_error is None and not self.finished:
            await anyio.lowlevel.checkpoint_if_cancelled()

    def step_failed(self) -> StepFailed:
        """The `StepFailed` of this level's failure, with its report and checkpoint."""
        assert self.failure is not None
        name, exc = self.failure
        error = StepFailed(name, self.timeline.report(), self.checkpoint())
        error.__cause__ = exc  # as `raise error from exc` would
        error.__suppress_context__ = True
        return error
