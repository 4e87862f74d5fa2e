"""Observers: who listens to a run, and the one builder of each of its events.

A run calls `Observers.tell` at each transition, and only when it is not None: while nobody listens
(no `on_event`, no open `FlowRun.events()` stream, structlog unconfigured) no event is built at all,
at the cost of one attribute check. Events told live and events rebuilt for a late listener
(`past_events`) come from the same builders, so both say the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import perf_counter
from typing import Any

import structlog

from ._errors import StepFailed
from ._events import (
    EventCallback,
    FlowCompletedEvent,
    FlowFailedEvent,
    FlowInterruptedEvent,
    FlowStartedEvent,
    InterruptReceivedEvent,
    RunEvent,
    StepCancelledEvent,
    StepCompletedEvent,
    StepFailedEvent,
    StepProgressEvent,
    StepRetryingEvent,
    StepStartedEvent,
    StepStoppedEvent,
    log_event,
)
from ._otel import Tracing, tracing
from ._outcome import Completed, Interrupted, StepStatus
from ._signal import InterruptSignal
from ._timeline import StepRecord, Timeline

__all__ = [
    "Observers",
    "flow_ended",
    "flow_started",
    "interrupt_received",
    "past_events",
    "step_completed",
    "step_ended",
    "step_progress",
    "step_retrying",
    "step_started",
]

_COMPLETED = StepStatus.COMPLETED  # (a module global: see _timeline)


class Observers:
    """The listeners of one run, shared by every level of it (included flows too)."""

    __slots__ = ("sinks", "tell", "tracing")

    def __init__(self, on_event: EventCallback | None) -> None:
        # From its start: `on_event`, and structlog once the application configured it
        # (unconfigured, structlog prints to stdout, which a library must not start doing),
        # and OpenTelemetry's spans once the application configured a tracer provider (_otel).
        self.sinks: list[EventCallback] = []
        if on_event is not None:
            self.sinks.append(on_event)
        if structlog.is_configured():
            self.sinks.append(log_event)
        self.tracing: Tracing | None = tracing()
        if self.tracing is not None:
            self.sinks.append(self.tracing)
        # What the run calls with each event: None while nobody listens.
        self.tell: Callable[[RunEvent], None] | None = self._dispatch if self.sinks else None

    def _dispatch(self, event: RunEvent) -> None:
        for sink in list(self.sinks):
            try:
                sink(event)
            except Exception:
                # A listener's bug must not change the run (as a failing callback does not stop
                # an event loop): it is logged, with its traceback, and the run goes on.
                _listener_failed(sink, event)

    def add(self, sink: EventCallback) -> None:
        """`sink` hears the run's events from now on (`FlowRun.events()` opens a stream)."""
        self.sinks.append(sink)
        self.tell = self._dispatch

    def remove(self, sink: EventCallback) -> None:
        """`sink` hears no more events."""
        if sink in self.sinks:
            self.sinks.remove(sink)
        if not self.sinks:
            self.tell = None


def _listener_failed(sink: EventCallback, event: RunEvent) -> None:
    """Log a listener's exception (being handled): through structlog if the application configured
    it, else through the standard library's `logging` (to stderr, by its last-resort handler),
    never through an unconfigured structlog, which would print to stdout."""
    try:
        if structlog.is_configured():
            structlog.get_logger("stoppoint").exception(
                "event.listener_failed", listener=repr(sink), failed_on=event.event, run_id=event.run_id
            )
        else:
            logging.getLogger("stoppoint").exception(
                "event listener %r failed on %s (run %s)", sink, event.event, event.run_id
            )
    except Exception:  # pragma: no cover - a logging setup that raises must not stop the run either
        pass


# -- one builder per event ---------------------------------------------------------------------------
# `at` is a perf_counter() reading of the run; the timeline turns it into wall-clock time.


def flow_started(timeline: Timeline) -> RunEvent:
    return FlowStartedEvent.model_construct(
        run_id=timeline.run_id,
        flow=timeline.flow,
        at=timeline.wall(timeline.perf0),
        resumed=tuple(name for name in timeline.steps if name in timeline.resumed),
    )


def step_started(timeline: Timeline, step: str, at: float) -> RunEvent:
    return StepStartedEvent.model_construct(run_id=timeline.run_id, flow=timeline.flow, at=timeline.wall(at), step=step)


def step_progress(
    timeline: Timeline, step: str, at: float, progress: tuple[float, float | None, str | None]
) -> RunEvent:
    done, total, message = progress
    return StepProgressEvent.model_construct(
        run_id=timeline.run_id,
        flow=timeline.flow,
        at=timeline.wall(at),
        step=step,
        done=done,
        total=total,
        message=message,
    )


def interrupt_received(timeline: Timeline, signal: InterruptSignal, at: float) -> RunEvent:
    return InterruptReceivedEvent.model_construct(
        run_id=timeline.run_id, flow=timeline.flow, at=timeline.wall(at), signal=signal
    )


def step_ended(timeline: Timeline, step: str, record: StepRecord, returned_at: float | None = None) -> RunEvent:
    """How a started step ended, by its record's (final) status (`returned_at`: when it returned,
    if it did; a completed step's record may not keep it)."""
    status = record.status
    if status is _COMPLETED and returned_at is not None:
        ended = returned_at
    else:
        ended = record.finished if record.finished is not None else perf_counter()
    if status is _COMPLETED:
        return step_completed(timeline, step, record.started, ended)
    common: dict[str, Any] = {
        "run_id": timeline.run_id,
        "flow": timeline.flow,
        "at": timeline.wall(ended),
        "step": step,
    }
    if status is StepStatus.INTERRUPTED:
        return StepStoppedEvent.model_construct(stopped_at=record.stopped_at, **common)
    if status is StepStatus.FAILED:
        return StepFailedEvent.model_construct(error=record.error or "", **common)
    # CANCELLED, or still RUNNING: a cancellation went through before the end was recorded
    return StepCancelledEvent.model_construct(**common)


def step_retrying(timeline: Timeline, step: str, at: float, attempt: int, error: str, delay_s: float) -> RunEvent:
    return StepRetryingEvent.model_construct(
        run_id=timeline.run_id,
        flow=timeline.flow,
        at=timeline.wall(at),
        step=step,
        attempt=attempt,
        error=error,
        delay_s=delay_s,
    )


def step_completed(timeline: Timeline, step: str, started: float, ended: float) -> RunEvent:
    return StepCompletedEvent.model_construct(
        run_id=timeline.run_id, flow=timeline.flow, at=timeline.wall(ended), step=step, duration_s=ended - started
    )


def flow_ended(timeline: Timeline, end: Completed[Any] | Interrupted | BaseException) -> RunEvent:
    """The event of the run's end: its outcome, or what `run()` raised."""
    at = timeline.ended if timeline.ended is not None else perf_counter()
    common: dict[str, Any] = {
        "run_id": timeline.run_id,
        "flow": timeline.flow,
        "at": timeline.wall(at),
        "duration_s": at - timeline.perf0,
    }
    if isinstance(end, Completed):
        return FlowCompletedEvent.model_construct(**common)
    if isinstance(end, Interrupted):
        return FlowInterruptedEvent.model_construct(signal=end.signal, forced=end.forced, **common)
    return FlowFailedEvent.model_construct(
        error=f"{type(end).__name__}: {end}", step=end.step if isinstance(end, StepFailed) else None, **common
    )


# -- the past, for a listener who comes late ----------------------------------------------------------


def past_events(timeline: Timeline, received: list[float]) -> list[RunEvent]:
    """The events of the run so far, rebuilt from its records (`received`: when each of the
    timeline's signals came), in the order they happened; without the end event."""
    events = [flow_started(timeline)]
    events += (interrupt_received(timeline, signal, at) for signal, at in zip(timeline.signals, received, strict=True))
    _step_events(timeline, events)
    events.sort(key=lambda event: event.at)  # stable: a step's start stays before its end
    return events


def _step_events(timeline: Timeline, events: list[RunEvent]) -> None:
    """Append the events of the steps started so far, looking into includes."""
    for name, begun, ended in timeline.completed:
        events.append(step_started(timeline, name, begun))
        events.append(step_completed(timeline, name, begun, ended))
    for name, record in timeline.records.items():
        events.append(step_started(timeline, name, record.started))
        if record.nested is not None:
            _step_events(record.nested, events)
        for at, attempt, error, delay_s in record.retries:
            events.append(step_retrying(timeline, name, at, attempt, error, delay_s))
        if record.told and record.finished is not None:
            events.append(step_ended(timeline, name, record))
