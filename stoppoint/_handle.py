"""FlowRun: a handle on a run started in the caller's task group (`Flow.start`)."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from ._feed import EventStream
from ._outcome import Completed, Interrupted, RunReport
from ._signal import InterruptSignal

if TYPE_CHECKING:
    from ._attempt import Attempt

__all__ = ["FlowRun"]


class FlowRun:
    """A run going on in a task group: interrupt it, watch its report, await its outcome.

    Made by `await flow.start(task_group, inputs, ...)`. A service keeps these by `run_id` to stop
    runs from other tasks (an HTTP handler, an admin command).

    A step's failure never reaches the task group: `outcome()` raises the `StepFailed`. Only
    `KeyboardInterrupt` and `SystemExit` from a step propagate there, as they would from `run()`.
    If the task group is cancelled, the run's steps are cancelled and `outcome()` returns
    `Interrupted(forced=True)`; its signal is the first one received or, if none was, a signal
    with `source="cancel"` (also listed in `report.interrupts`).
    """

    __slots__ = ("_done", "_error", "_error_tb", "_flow", "_outcome", "_run", "_run_id", "_streams")

    def __init__(self, run: Attempt | None, flow: str = "", run_id: str = "") -> None:
        self._run = run
        self._flow = run.flow if run is not None else flow
        self._run_id = run.run_id if run is not None else run_id
        self._done = anyio.Event()
        self._outcome: Completed[Any] | Interrupted | None = None
        self._error: BaseException | None = None
        self._error_tb: TracebackType | None = None
        self._streams: list[EventStream] = []

    @classmethod
    def _finished(cls, flow: str, outcome: Completed[Any]) -> FlowRun:
        """A handle on a run a store holds completed: done from the start, nothing runs."""
        handle = cls(None, flow, outcome.report.run_id)
        handle._outcome = outcome
        handle._done.set()
        return handle

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self._run_id

    @property
    def flow(self) -> str:
        """The flow's name."""
        return self._flow

    @property
    def done(self) -> bool:
        """True once the run has ended (its outcome is ready)."""
        return self._done.is_set()

    @property
    def report(self) -> RunReport:
        """A snapshot of the run's report now: steps `PENDING`, `RUNNING`, ... while it goes on."""
        if self._run is None:
            assert self._outcome is not None
            return self._outcome.report
        return self._run.timeline.report()

    def _requeue(self, reason: str) -> bool:
        """For a `Worker` stopping: interrupt gracefully and, unless another interrupt came first, store
        the run queued (released) when it stops, for another worker to resume. False once it is over."""
        return self._run is not None and self._run.requeue(reason)

    @property
    def _epoch(self) -> int:
        """The run's claim number (0 without a leased store)."""
        return 0 if self._run is None else self._run.epoch

    def interrupt(self, reason: str = "interrupted", *, force: bool = False, source: str | None = "api") -> bool:
        """Ask this run to stop, like a signal on its interrupt stream would (call it in the loop's thread).

        Args:
            reason: Free text shown in reports.
            force: Do not wait for a stopping point: cancel the steps in flight.
            source: Where the request came from (default `"api"`).

        Returns:
            True if the run received it; False if the run had already ended.
        """
        if self._done.is_set() or self._run is None:
            return False
        return self._run.interrupt(InterruptSignal(reason=reason, force=force, source=source))

    def events(self, max_buffer: int = 10_000) -> EventStream:
        """The run's events, from its start, as an async iterator: `async for event in handle.events()`.

        Events that happened before the call come first (rebuilt from the run's records), then
        the live ones; the stream ends after the run's end event. The run never waits for the
        consumer: one that falls more than `max_buffer` events behind loses the oldest
        (`EventStream.dropped` counts them). Any number of streams may be open on one run, and
        while none is (and no `on_event`, structlog or `EventStore` listens), the run builds no event.
        Progress events (`StepProgressEvent`) are live only: the past ones are not rebuilt.

        Raises:
            ValueError: `max_buffer` is not an int >= 1.
        """
        if isinstance(max_buffer, bool) or not isinstance(max_buffer, int) or max_buffer < 1:
            raise ValueError(f"FlowRun.events(): max_buffer must be an int >= 1, got {max_buffer!r}")
        run = self._run
        if run is None:  # a run the store held completed: nothing ran
            assert self._outcome is not None
            stream = EventStream((), max_buffer)
            stream.close()
            return stream
        past = run.past_events()
        end = run.told_end  # set when asked by a listener of the end event itself
        if end is None and self._done.is_set():
            ended: Completed[Any] | Interrupted | BaseException | None = self._error or self._outcome
            assert ended is not None
            end = run.end_event(ended)
        if end is not None:
            return EventStream([*past, end], max_buffer)  # the end event closes it
        stream = EventStream(past, max_buffer)
        observers = run.control.observers
        observers.add(stream._put)
        stream._detach = lambda: observers.remove(stream._put)
        self._streams.append(stream)
        return stream

    async def outcome(self) -> Completed[Any] | Interrupted:
        """Wait for the run to end and return its outcome (any number of tasks may wait).

        Returns:
            `Completed` or `Interrupted`, as `Flow.run()` returns; `Interrupted(forced=True)` if
            the task group was cancelled.

        Raises:
            StepFailed: A step raised (raised here, not into the task group).
            TypeError: The interrupt stream carried something other than signals.
            KeyboardInterrupt, SystemExit: A step raised one (it also reached the task group).
        """
        await self._done.wait()
        if self._error is not None:
            # From its original traceback each time, or every call would lengthen it.
            raise self._error.with_traceback(self._error_tb)
        assert self._outcome is not None
        return self._outcome

    async def _drive(
        self,
        receiver: MemoryObjectReceiveStream[InterruptSignal] | None,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        run = self._run
        assert run is not None
        try:
            self._outcome = await run.execute(receiver, started=task_status.started)
        except anyio.get_cancelled_exc_class():
            try:
                self._outcome = run.outcome(cancelled=True)
            except Exception as exc:  # a step had failed first: that is what outcome() raises
                self._fail(exc)
            raise
        except Exception as exc:
            self._fail(exc)
        except BaseException as exc:
            self._fail(exc)  # KeyboardInterrupt, SystemExit: the task group must see them too
            raise
        finally:
            self._done.set()
            for stream in self._streams:  # ended without an end event (say, KeyboardInterrupt)
                stream.close()
            self._streams.clear()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._error_tb = exc.__traceback__

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        return f"<FlowRun flow={self.flow!r} run_id={self.run_id!r} {state}>"
