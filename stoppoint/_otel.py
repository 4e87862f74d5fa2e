"""OpenTelemetry: a run's spans, made by an observer of its events (API.md §12; the `otel` extra).

`tracing()` is asked once per run (by `Observers`): while no tracer provider is configured it returns None
and the run gets no observer at all, so it costs what a run without listeners costs. A provider can only
have been configured by code that imported `opentelemetry.trace` (or through the
`OTEL_PYTHON_TRACER_PROVIDER` variable, which `get_tracer_provider()` reads), so the check is a
`sys.modules` look-up, then `get_tracer_provider()`: its default, a `ProxyTracerProvider` (or a
`NoOpTracerProvider`), means not configured. stoppoint never imports `opentelemetry` itself otherwise:
`import stoppoint` works without it.

A run's spans: `stoppoint.run FLOW` from its start to its end, and one `stoppoint.step STEP` per attempt of
a step, a child of the run's span (also the steps of included flows, whose `stoppoint.flow` names the
included flow). Their times are the events' own (`at`). Interrupts are events of the run's span. With a
`LabelStore` the run's span context is kept as the run's label `stoppoint.traceparent` (W3C
`traceparent`), written when the attempt starts; a later attempt of the run (a resume, a worker's claim)
reads it first and links its run span to it, so each attempt links to the one before. The run's span is
a child of the span current where the run started (a request handler's, say), a root without one.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._events import (
    FlowFailedEvent,
    FlowInterruptedEvent,
    FlowStartedEvent,
    InterruptReceivedEvent,
    RunEvent,
    StepFailedEvent,
    StepRetryingEvent,
    StepStartedEvent,
    StepStoppedEvent,
)
from ._outcome import StepStatus
from ._store import BasicStore, LabelStore

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._timeline import Timeline

__all__ = ["TRACEPARENT_LABEL", "Tracing", "tracer_provider", "tracing"]

TRACEPARENT_LABEL = "stoppoint.traceparent"
"""The run label a `LabelStore` keeps the last attempt's run span context under (W3C `traceparent`)."""

tracer_provider: TracerProvider | None = None
"""When set, the provider runs are traced with instead of the global one (`opentelemetry.trace`'s): for
tests, which may set the global provider only once per process."""

# The variable that names a provider `get_tracer_provider()` loads: read once (a process's environment is
# set before it starts), so that a run's check costs no environment look-up.
_ENV_PROVIDER = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def tracing() -> Tracing | None:
    """A run's tracing observer, or None while no tracer provider is configured (see the module docstring)."""
    provider = tracer_provider
    if provider is None:
        if "opentelemetry.trace" not in sys.modules and not _ENV_PROVIDER:
            return None
        try:
            from opentelemetry import trace
        except ImportError:  # (the variable set, the package not installed)
            return None
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
    from . import __version__

    return Tracing(provider.get_tracer("stoppoint", __version__))


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1e9)


class Tracing:
    """The spans of one run, made from its events (an `EventCallback`)."""

    __slots__ = ("run_span", "steps", "stopped_at", "tracer")

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.run_span: Span | None = None
        self.steps: dict[tuple[str, str], tuple[Span, int]] = {}  # each step's open span and its start, by (flow, step)
        self.stopped_at: str | None = None

    # -- the run's span, before its first event ------------------------------------------------------

    async def begin(self, timeline: Timeline, store: BasicStore | None) -> None:
        """Open the run's span, linked to the context an earlier attempt kept in `store`; keep its own."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        flow, run_id = timeline.flow, timeline.run_id
        propagator = TraceContextTextMapPropagator()
        links = []
        labels = isinstance(store, LabelStore)
        if labels:
            assert isinstance(store, LabelStore)
            try:
                kept = (await store.labels(flow, run_id)).get(TRACEPARENT_LABEL)
            except Exception:
                _failed("read the trace context of", run_id)
                kept = None
            if kept:
                earlier = trace.get_current_span(propagator.extract({"traceparent": kept})).get_span_context()
                if earlier.is_valid:
                    links.append(trace.Link(earlier, {"stoppoint.link": "earlier attempt"}))
        at = timeline.wall(timeline.perf0)
        assert at is not None
        self.run_span = span = self.tracer.start_span(
            f"stoppoint.run {flow}",
            kind=trace.SpanKind.INTERNAL,
            attributes={"stoppoint.run_id": run_id, "stoppoint.flow": flow},
            links=links,
            start_time=_ns(at),
        )
        if labels:
            carrier: dict[str, str] = {}
            propagator.inject(carrier, trace.set_span_in_context(span))
            if "traceparent" in carrier:
                assert isinstance(store, LabelStore)
                try:
                    await store.set_labels(flow, run_id, {TRACEPARENT_LABEL: carrier["traceparent"]})
                except Exception:
                    _failed("keep the trace context of", run_id)

    # -- its events -----------------------------------------------------------------------------------

    def __call__(self, event: RunEvent) -> None:
        name = event.event
        if name == "step.started":
            assert isinstance(event, StepStartedEvent)
            self._open_step(event.flow, event.run_id, event.step, 1, _ns(event.at))
        elif name == "step.retrying":
            assert isinstance(event, StepRetryingEvent)
            key = (event.flow, event.step)
            open_ = self.steps.pop(key, None)
            if open_ is not None:
                span = open_[0]
                span.set_attribute("stoppoint.status", StepStatus.FAILED.value)
                _error(span, event.error, _ns(event.at))
                span.end(end_time=_ns(event.at))
            # The next attempt starts once the wait is over (a stopping point: the step may stop in it).
            start = _ns(event.at) + int(event.delay_s * 1e9)
            self._open_step(event.flow, event.run_id, event.step, event.attempt + 1, start)
        elif name.startswith("step."):
            self._end_step(event)
        elif name == "interrupt.received":
            assert isinstance(event, InterruptReceivedEvent)
            if self.run_span is not None:
                signal = event.signal
                attributes: dict[str, Any] = {"stoppoint.reason": signal.reason, "stoppoint.force": signal.force}
                if signal.source is not None:
                    attributes["stoppoint.source"] = signal.source
                self.run_span.add_event("stoppoint.interrupt", attributes, timestamp=_ns(event.at))
        elif name == "flow.started":
            assert isinstance(event, FlowStartedEvent)
            if self.run_span is not None and event.resumed:
                self.run_span.set_attribute("stoppoint.resumed", list(event.resumed))
        elif name.startswith("flow."):
            self._end_run(event)

    def _open_step(self, flow: str, run_id: str, step: str, attempt: int, start: int) -> None:
        from opentelemetry import trace

        context = trace.set_span_in_context(self.run_span) if self.run_span is not None else None
        span = self.tracer.start_span(
            f"stoppoint.step {step}",
            context=context,
            attributes={
                "stoppoint.run_id": run_id,
                "stoppoint.flow": flow,
                "stoppoint.step": step,
                "stoppoint.attempt": attempt,
            },
            start_time=start,
        )
        self.steps[(flow, step)] = (span, start)

    def _end_step(self, event: RunEvent) -> None:
        step = getattr(event, "step", None)
        open_ = self.steps.pop((event.flow, step), None) if isinstance(step, str) else None
        if open_ is None:
            return
        span, start = open_
        end = max(_ns(event.at), start)  # (a step stopped during a retry wait: its next attempt never began)
        name = event.event
        if name == "step.completed":
            status = StepStatus.COMPLETED
        elif name == "step.stopped":
            assert isinstance(event, StepStoppedEvent)
            status = StepStatus.INTERRUPTED
            if event.stopped_at is not None:
                span.set_attribute("stoppoint.stopped_at", event.stopped_at)
                if self.stopped_at is None:
                    self.stopped_at = event.stopped_at  # the run's: the first step that stopped
        elif name == "step.failed":
            assert isinstance(event, StepFailedEvent)
            status = StepStatus.FAILED
            _error(span, event.error, end)
        else:
            status = StepStatus.CANCELLED
        span.set_attribute("stoppoint.status", status.value)
        span.end(end_time=end)

    def _end_run(self, event: RunEvent) -> None:
        end = _ns(event.at)
        for key in list(self.steps):  # (none should be left: each step tells its end)
            span = self.steps.pop(key)[0]
            span.set_attribute("stoppoint.status", StepStatus.CANCELLED.value)
            span.end(end_time=end)
        run_span = self.run_span
        if run_span is None:
            return
        self.run_span = None
        span = run_span
        if event.event == "flow.completed":
            span.set_attribute("stoppoint.status", "completed")
        elif isinstance(event, FlowInterruptedEvent):
            span.set_attribute("stoppoint.status", "interrupted")
            span.set_attribute("stoppoint.forced", event.forced)
            if self.stopped_at is not None:
                span.set_attribute("stoppoint.stopped_at", self.stopped_at)
        elif isinstance(event, FlowFailedEvent):
            span.set_attribute("stoppoint.status", "failed")
            if event.step is not None:
                span.set_attribute("stoppoint.step", event.step)
            _error(span, event.error, end)
        span.end(end_time=end)


def _error(span: Span, error: str, at: int) -> None:
    """Record a failure (`error`: `"ExcType: message"`) as the span's exception event and error status."""
    from opentelemetry.trace import Status, StatusCode

    kind, _, message = error.partition(": ")
    span.add_event("exception", {"exception.type": kind, "exception.message": message}, timestamp=at)
    span.set_status(Status(StatusCode.ERROR, error))


def _failed(what: str, run_id: str) -> None:
    """Tracing must not fail a run: a store error while keeping its context is logged, and the run goes on."""
    logging.getLogger("stoppoint").warning("tracing: could not %s run %s", what, run_id, exc_info=True)
