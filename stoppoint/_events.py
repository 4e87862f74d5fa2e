"""Events: one typed object per transition of a run (API.md §7), for progress displays and logs.

A run builds events only when someone listens (`on_event=`, or a configured structlog): with no
listener, each transition costs one attribute check.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from ._signal import InterruptSignal

__all__ = [
    "Event",
    "FlowCompletedEvent",
    "FlowFailedEvent",
    "FlowInterruptedEvent",
    "FlowStartedEvent",
    "InterruptReceivedEvent",
    "RunEvent",
    "StepCancelledEvent",
    "StepCompletedEvent",
    "StepFailedEvent",
    "StepProgressEvent",
    "StepRetryingEvent",
    "StepStartedEvent",
    "StepStoppedEvent",
]


class RunEvent(BaseModel):
    """What every event carries.

    Attributes:
        event: The event's name, as in the logs (`"step.completed"`, ...).
        run_id: The run's id.
        flow: The flow's name (for the steps of an included flow, the included flow's).
        at: When it happened (UTC).
    """

    model_config = ConfigDict(frozen=True)

    event: str
    run_id: str
    flow: str
    at: datetime


class FlowStartedEvent(RunEvent):
    """The run began (`resumed`: steps completed in an earlier attempt, which will not run)."""

    event: Literal["flow.started"] = "flow.started"
    resumed: tuple[str, ...] = ()


class StepStartedEvent(RunEvent):
    """A step passed the stopping point before it and started."""

    event: Literal["step.started"] = "step.started"
    step: str


class StepCompletedEvent(RunEvent):
    """A step returned; its output is kept."""

    event: Literal["step.completed"] = "step.completed"
    step: str
    duration_s: float


class StepStoppedEvent(RunEvent):
    """A step stopped at a stopping point (`stopped_at`: `"file.py:LINE"`, if known)."""

    event: Literal["step.stopped"] = "step.stopped"
    step: str
    stopped_at: str | None = None


class StepProgressEvent(RunEvent):
    """A running step reported how far it got (`ctx.progress(done, total, message)`).

    Told at most about 10 times a second per step: a report that comes sooner after the last one told
    waits, and is told when the step ends (before its end event) unless a later one replaced it; so the
    step's last report is always told."""

    event: Literal["step.progress"] = "step.progress"
    step: str
    done: float
    total: float | None = None
    message: str | None = None


class StepFailedEvent(RunEvent):
    """A step raised (`error`: `"ExcType: message"`)."""

    event: Literal["step.failed"] = "step.failed"
    step: str
    error: str


class StepRetryingEvent(RunEvent):
    """An attempt of a step failed with an error its `Retry` retries: the step now waits `delay_s`
    seconds (a stopping point) before attempt `attempt + 1` (`error`: `"ExcType: message"` of
    attempt `attempt`, which counts from 1)."""

    event: Literal["step.retrying"] = "step.retrying"
    step: str
    attempt: int
    error: str
    delay_s: float


class StepCancelledEvent(RunEvent):
    """A step was cancelled mid-flight (forced, or a sibling failed)."""

    event: Literal["step.cancelled"] = "step.cancelled"
    step: str


class InterruptReceivedEvent(RunEvent):
    """The run received an interrupt signal (whether or not it takes effect)."""

    event: Literal["interrupt.received"] = "interrupt.received"
    signal: InterruptSignal


class FlowCompletedEvent(RunEvent):
    """Every step completed."""

    event: Literal["flow.completed"] = "flow.completed"
    duration_s: float


class FlowInterruptedEvent(RunEvent):
    """The run ended interrupted (`forced`: it was escalated)."""

    event: Literal["flow.interrupted"] = "flow.interrupted"
    signal: InterruptSignal
    forced: bool
    duration_s: float


class FlowFailedEvent(RunEvent):
    """The run ended because a step failed (or the store or the interrupt stream did)."""

    event: Literal["flow.failed"] = "flow.failed"
    error: str
    step: str | None = None
    duration_s: float


Event = Annotated[
    FlowStartedEvent
    | StepStartedEvent
    | StepCompletedEvent
    | StepProgressEvent
    | StepStoppedEvent
    | StepFailedEvent
    | StepRetryingEvent
    | StepCancelledEvent
    | InterruptReceivedEvent
    | FlowCompletedEvent
    | FlowInterruptedEvent
    | FlowFailedEvent,
    Field(discriminator="event"),
]
"""Any event (a union discriminated by `event`: `TypeAdapter(Event)` reads one back from JSON)."""

EventCallback = Callable[[RunEvent], object]

_ERRORS = frozenset({"step.failed", "flow.failed"})


def log_event(event: RunEvent) -> None:
    """Emit `event` through structlog, logger `"stoppoint"`: its name as the event, its fields
    as key-values (the users' processors decide what becomes of it)."""
    fields: dict[str, Any] = event.model_dump(exclude={"event", "at"})
    logger = structlog.get_logger("stoppoint")
    if event.event in _ERRORS:
        logger.error(event.event, **fields)
    else:
        logger.info(event.event, **fields)
