"""Attempt: one run at the top level, from listening for interrupts to its outcome and end event.

`_launch.py` sets an attempt up, `Flow.run` and `FlowRun` drive it. A resumed run is a new attempt
(its own signals, timers and report) of the same run id.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from ._control import Control, cancellation_in_effect
from ._events import RunEvent
from ._executor import Run
from ._observers import flow_ended, flow_started, past_events
from ._outcome import Completed, Interrupted
from ._persist import Leased
from ._probe import probe_of
from ._signal import InterruptSignal, linked
from ._timeline import Timeline

__all__ = ["Attempt"]


class Attempt:
    """The top level of one run (a `Run`), with what only the top has: the interrupt stream it
    listens on, the saves at its start and end, its timers, and its outcome."""

    __slots__ = ("control", "deadline", "level", "over", "told_end")

    def __init__(self, level: Run, control: Control, deadline: float | None) -> None:
        self.level = level
        self.control = control
        self.deadline = deadline
        level.is_top = True
        control.timeline = level.timeline
        control.unstorable = level.drop_unstorable
        self.told_end: RunEvent | None = None  # the end event, once told (streams opened after it get it too)
        self.over = False  # the run's outcome is being made: it is over

    @property
    def run_id(self) -> str:
        return self.level.run_id

    @property
    def epoch(self) -> int:
        return self.control.epoch

    @property
    def flow(self) -> str:
        return self.level.name

    @property
    def timeline(self) -> Timeline:
        return self.level.timeline

    def interrupt(self, signal: InterruptSignal) -> bool:
        """Deliver `signal` as if it came on the interrupt stream; False once the run is over."""
        if self.over:
            return False
        self.control.on_signal(signal)
        return True

    def requeue(self, reason: str) -> bool:
        """A worker stopping: interrupt the run gracefully and, unless another interrupt came first, store
        its interrupted end as queued (released), for another worker to resume. False once it is over."""
        persist = self.control.persist
        if self.over:
            return False
        if self.control.first is None and isinstance(persist, Leased):
            persist.requeue = True
        return self.interrupt(InterruptSignal(reason=reason, source="worker"))

    # -- the run --------------------------------------------------------------------------------------

    async def execute(
        self,
        receiver: MemoryObjectReceiveStream[InterruptSignal] | None,
        started: Callable[[], object] | None = None,
    ) -> Completed[Any] | Interrupted:
        """Run the flow, listening on `receiver`; `started` is called once the run has begun (its
        task group is up), before the first step."""
        control, level = self.control, self.level
        control.probe = probe = probe_of(receiver)
        if probe is not None:
            probe.attached(level.plan)
            probe.deliver = control.on_signal
        tracing = control.observers.tracing
        if tracing is not None:
            await tracing.begin(level.timeline, control.store)  # the run's span, linked to earlier attempts'
        if control.observers.tell is not None:
            control.observers.tell(flow_started(level.timeline))
        channel = None
        if receiver is not None and control.drain(receiver):
            # Listening starts in the same synchronous stretch as the drain: no signal falls between.
            channel = linked(receiver)
            if channel is not None:
                channel.listen(control.on_signal)
            else:
                control.polled = receiver

        def begin(task_group: TaskGroup) -> None:
            control.begin(task_group, self.deadline)
            if started is not None:
                started()

        persist = control.persist
        try:
            if persist is not None:
                await control.save(persist.start)  # listed as running before any step starts
                if cancellation_in_effect():
                    control.close()  # cancelled during the (shielded) save: no step may start
            await level.drive(begin)
        finally:
            if channel is not None:
                channel.unlisten(control.on_signal)
            if receiver is not None:
                # Signals that came too late still belong in the report (the stored one too);
                # garbage that came too late cannot spoil a run that is over.
                bad_signal = control.bad_signal
                control.drain(receiver)
                control.bad_signal = bad_signal
            if persist is not None:
                if not level.finished and cancellation_in_effect():
                    control.cancel_signal()  # the stored report says what the outcome will say
                if level.timeline.ended is None:
                    level.timeline.ended = perf_counter()  # cancelled before its steps were driven
                await control.save(persist.end)  # how the run ended, also when it was cancelled
                await persist.over()
        if level.fatal is not None:
            self.tell_end(level.fatal)
            if persist is not None:
                await persist.flush()
            raise level.fatal
        await level.let_cancellation_through()
        if persist is None:
            return self.outcome()
        try:
            return self.outcome()
        finally:
            await persist.flush()  # the events of its end, told after its end was written

    # -- its end --------------------------------------------------------------------------------------

    def outcome(self, cancelled: bool = False) -> Completed[Any] | Interrupted:
        """The run's outcome once it has ended; `cancelled`: its task was cancelled from outside
        (a `FlowRun` whose task group was cancelled), which makes an unfinished run a forced
        interrupt, with a signal of its own if none came first.

        Raises:
            TypeError: The interrupt stream carried something other than signals.
            StoreError: The store failed (or another error a store raised).
            StepFailed: A step failed (also when a cancellation came after).
        """
        self.over = True  # no signal counts any more (FlowRun.interrupt returns False)
        if self.control.observers.tell is None:
            return self._ended(cancelled)
        try:
            outcome = self._ended(cancelled)
        except Exception as exc:
            self.tell_end(exc)
            raise
        self.tell_end(outcome)
        return outcome

    def _ended(self, cancelled: bool) -> Completed[Any] | Interrupted:
        control, level = self.control, self.level
        if control.bad_signal is not None:
            raise control.bad_signal
        if control.store_error is not None:
            raise control.store_error
        if level.failure is not None:
            raise level.step_failed()
        if level.finished:
            return Completed(level.outputs[level.plan.result], level.timeline.report)
        if cancelled:
            return Interrupted(control.cancel_signal(), level.timeline.report, level.checkpoint(), forced=True)
        if control.first is None:  # pragma: no cover - every path that leaves a step unfinished records why
            raise RuntimeError(f"stoppoint: run {self.run_id!r} of flow {self.flow!r} ended unfinished without cause")
        return Interrupted(control.first, level.timeline.report, level.checkpoint(), forced=control.forced)

    def tell_cancelled(self) -> None:
        """The caller's scope cancelled `run()` before the run ended: say so, as a forced interrupt."""
        level = self.level
        if self.control.observers.tell is not None and not level.finished:
            signal = self.control.cancel_signal()
            self.tell_end(Interrupted(signal, level.timeline.report, level.checkpoint(), forced=True))

    def tell_end(self, end: Completed[Any] | Interrupted | BaseException) -> None:
        """Tell the listeners how the run ended (once: a cancelled `FlowRun` may ask twice)."""
        tell = self.control.observers.tell
        if tell is None or self.told_end is not None:
            return
        self.told_end = flow_ended(self.timeline, end)
        tell(self.told_end)

    def end_event(self, end: Completed[Any] | Interrupted | BaseException) -> RunEvent:
        """The event of the run's end (for a stream opened after it was told, or without listeners)."""
        return flow_ended(self.timeline, end)

    def past_events(self) -> list[RunEvent]:
        """The events of the run so far, rebuilt from its records, without the end event."""
        return past_events(self.timeline, self.control.received)
