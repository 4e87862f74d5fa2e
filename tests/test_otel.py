"""OpenTelemetry (API.md §12, issue 17 item 2): a span per run and per step attempt, interrupts as span events,
a resumed run linked to the earlier attempt's trace, nothing while no tracer provider is configured.

OpenTelemetry's global tracer provider can be set only once per process, so these tests do not set it: each
gets its own SDK `TracerProvider` (with an `InMemorySpanExporter`) through `stoppoint._otel.tracer_provider`,
the module's hook that takes precedence over the global provider. The global path itself (the provider an
application sets with `trace.set_tracer_provider`, and the default proxy provider meaning "not configured")
is tested in child processes, which leaves this process's global provider unset for every other test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import stoppoint as sp
from stoppoint import _observers, _otel
from stoppoint.testing import interrupt_at

from .conftest import Channel

pytestmark = pytest.mark.anyio


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Runs of this test are traced with a provider of its own, exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(_otel, "tracer_provider", provider)
    yield exporter
    provider.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def chain() -> sp.Flow:
    flow = sp.Flow("chain")

    @flow.step
    async def first() -> int:
        return 1

    @flow.step
    async def second(first: int, ctx: sp.StepContext) -> int:
        for _ in range(3):
            await ctx.checkpoint()
        return first + 1

    return flow


async def test_completed_run_has_a_run_span_and_one_child_per_step(spans: InMemorySpanExporter) -> None:
    outcome = await chain().run(run_id="r1")
    assert isinstance(outcome, sp.Completed)
    found = by_name(spans)
    assert sorted(found) == ["stoppoint.run chain", "stoppoint.step first", "stoppoint.step second"]
    (run,) = found["stoppoint.run chain"]
    assert attrs(run) == {"stoppoint.run_id": "r1", "stoppoint.flow": "chain", "stoppoint.status": "completed"}
    assert run.parent is None  # (no span was current where it started)
    assert run.status.status_code is StatusCode.UNSET
    for name in ("first", "second"):
        (step,) = found[f"stoppoint.step {name}"]
        assert attrs(step) == {
            "stoppoint.run_id": "r1",
            "stoppoint.flow": "chain",
            "stoppoint.step": name,
            "stoppoint.attempt": 1,
            "stoppoint.status": "completed",
        }
        assert step.parent is not None
        assert step.parent.span_id == run.context.span_id
        assert step.context.trace_id == run.context.trace_id
        assert run.start_time is not None
        assert step.start_time is not None
        assert step.end_time is not None
        assert run.end_time is not None
        assert run.start_time <= step.start_time <= step.end_time <= run.end_time


async def test_run_span_is_a_child_of_the_current_span(spans: InMemorySpanExporter) -> None:
    tracer = _otel.tracer_provider.get_tracer("test")  # type: ignore[union-attr]
    with tracer.start_as_current_span("request") as request:
        await chain().run()
    (run,) = by_name(spans)["stoppoint.run chain"]
    assert run.parent is not None
    assert run.parent.span_id == request.get_span_context().span_id


async def test_interrupted_run_has_stopped_at_and_an_interrupt_event(spans: InMemorySpanExporter) -> None:
    outcome = await chain().run(interrupts=interrupt_at("second", 2))
    assert isinstance(outcome, sp.Interrupted)
    stopped_at = outcome.report.steps["second"].stopped_at
    assert stopped_at is not None
    found = by_name(spans)
    (run,) = found["stoppoint.run chain"]
    assert attrs(run)["stoppoint.status"] == "interrupted"
    assert attrs(run)["stoppoint.stopped_at"] == stopped_at
    assert attrs(run)["stoppoint.forced"] is False
    (event,) = run.events
    assert event.name == "stoppoint.interrupt"
    assert dict(event.attributes or {}) == {
        "stoppoint.reason": "test",
        "stoppoint.force": False,
        "stoppoint.source": "test",
    }
    (second,) = found["stoppoint.step second"]
    assert attrs(second)["stoppoint.status"] == "interrupted"
    assert attrs(second)["stoppoint.stopped_at"] == stopped_at
    assert attrs(found["stoppoint.step first"][0])["stoppoint.status"] == "completed"


async def test_forced_interrupt_is_an_event_with_force(spans: InMemorySpanExporter, channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("forced")

    @flow.step
    async def wait() -> None:
        interrupter.interrupt("stop now", force=True)
        await anyio.sleep_forever()

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    found = by_name(spans)
    (run,) = found["stoppoint.run forced"]
    assert attrs(run)["stoppoint.status"] == "interrupted"
    assert attrs(run)["stoppoint.forced"] is True
    (event,) = run.events
    assert dict(event.attributes or {})["stoppoint.reason"] == "stop now"
    assert dict(event.attributes or {})["stoppoint.force"] is True
    (wait_span,) = found["stoppoint.step wait"]
    assert attrs(wait_span)["stoppoint.status"] == "cancelled"


async def test_failed_step_records_the_exception_and_error_status(spans: InMemorySpanExporter) -> None:
    flow = sp.Flow("failing")

    @flow.step
    async def boom() -> None:
        raise ValueError("no good")

    with pytest.raises(sp.StepFailed):
        await flow.run()
    found = by_name(spans)
    # the step's span: the step's exception; the run's: what run() raised
    for span, kind in (
        (found["stoppoint.step boom"][0], "ValueError"),
        (found["stoppoint.run failing"][0], "StepFailed"),
    ):
        assert attrs(span)["stoppoint.status"] == "failed"
        assert span.status.status_code is StatusCode.ERROR
        (event,) = span.events
        assert event.name == "exception"
        assert dict(event.attributes or {})["exception.type"] == kind
        assert "no good" in str(dict(event.attributes or {})["exception.message"])
    assert attrs(found["stoppoint.run failing"][0])["stoppoint.step"] == "boom"


async def test_retried_step_has_one_span_per_attempt(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def instant(seconds: float) -> None:
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr("stoppoint._control._sleep", instant)
    flow = sp.Flow("retried")
    calls = 0

    @flow.step(retry=sp.Retry(attempts=3, delay=0.0))
    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise OSError(f"failure {calls}")
        return calls

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.report.steps["flaky"].attempts == 3
    found = by_name(spans)
    attempts = sorted(found["stoppoint.step flaky"], key=lambda span: attrs(span)["stoppoint.attempt"])
    assert [attrs(span)["stoppoint.attempt"] for span in attempts] == [1, 2, 3]
    assert [attrs(span)["stoppoint.status"] for span in attempts] == ["failed", "failed", "completed"]
    assert [span.status.status_code for span in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    assert dict(attempts[1].events[0].attributes or {})["exception.message"] == "failure 2"
    (run,) = found["stoppoint.run retried"]
    assert all(span.parent is not None and span.parent.span_id == run.context.span_id for span in attempts)
    assert attrs(run)["stoppoint.status"] == "completed"


async def test_resumed_run_links_to_the_earlier_attempt(spans: InMemorySpanExporter, store: sp.Store) -> None:
    flow = chain()
    first = await flow.run(store=store, run_id="again", interrupts=interrupt_at("second", 1))
    assert isinstance(first, sp.Interrupted)
    (earlier,) = by_name(spans)["stoppoint.run chain"]
    assert earlier.links == ()
    assert isinstance(store, sp.LabelStore)
    kept = (await store.labels("chain", "again"))[_otel.TRACEPARENT_LABEL]
    assert kept.startswith(f"00-{earlier.context.trace_id:032x}-{earlier.context.span_id:016x}-")
    spans.clear()

    resumed = await flow.run(store=store, run_id="again")
    assert isinstance(resumed, sp.Completed)
    found = by_name(spans)
    (run,) = found["stoppoint.run chain"]
    (link,) = run.links
    assert (link.context.trace_id, link.context.span_id) == (earlier.context.trace_id, earlier.context.span_id)
    assert attrs(run)["stoppoint.resumed"] == ("first",)
    assert "stoppoint.step first" not in found  # it completed in the earlier attempt: no span
    # the label now holds this attempt's context, for the next one
    kept = (await store.labels("chain", "again"))[_otel.TRACEPARENT_LABEL]
    assert kept.startswith(f"00-{run.context.trace_id:032x}-{run.context.span_id:016x}-")


async def test_included_flow_steps_are_spans_of_the_run(spans: InMemorySpanExporter) -> None:
    inner = sp.Flow("inner")

    @inner.step
    async def work() -> int:
        return 2

    outer = sp.Flow("outer")
    outer.include(inner, name="sub")

    outcome = await outer.run(run_id="n")
    assert isinstance(outcome, sp.Completed)
    found = by_name(spans)
    (run,) = found["stoppoint.run outer"]
    (work_span,) = found["stoppoint.step work"]
    assert attrs(work_span)["stoppoint.flow"] == "inner"
    assert work_span.parent is not None
    assert work_span.parent.span_id == run.context.span_id


async def test_listeners_still_hear_every_event_while_traced(spans: InMemorySpanExporter) -> None:
    heard: list[str] = []
    await chain().run(on_event=lambda event: heard.append(event.event))
    assert heard[0] == "flow.started"
    assert heard[-1] == "flow.completed"
    assert len(spans.get_finished_spans()) == 3


async def test_no_observer_without_a_configured_provider() -> None:
    # This process never sets the global provider (see the module docstring): the default proxy.
    assert _otel.tracer_provider is None
    assert _otel.tracing() is None
    # (other sinks depend on the suite: an earlier test may have configured structlog)
    observers = _observers.Observers(None)
    assert observers.tracing is None
    assert not any(isinstance(sink, _otel.Tracing) for sink in observers.sinks)


_CHILD = """
import anyio, sys
import stoppoint as sp
from stoppoint import _observers

flow = sp.Flow("child")

@flow.step
async def one() -> int:
    return 1

{setup}

async def main() -> None:
    observers = _observers.Observers(None)
    print("observer", observers.tracing is not None, observers.tell is not None)
    await flow.run()
    {report}

anyio.run(main)
"""


def _child(setup: str, report: str) -> str:
    code = _CHILD.format(setup=textwrap.dedent(setup), report=report)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_nothing_without_a_provider_in_a_fresh_process() -> None:
    # opentelemetry imported (the API's default proxy provider), no SDK configured: no observer at all.
    out = _child("import opentelemetry.trace", "print('modules', 'opentelemetry.sdk' in sys.modules)")
    assert out.split() == ["observer", "False", "False", "modules", "False"]
    # opentelemetry never imported: stoppoint does not import it either.
    out = _child("", "print('modules', 'opentelemetry' in sys.modules)")
    assert out.split() == ["observer", "False", "False", "modules", "False"]


def test_global_sdk_provider_is_used_in_a_fresh_process() -> None:
    setup = """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    """
    out = _child(
        setup, "print('spans', *sorted(span.name.replace(' ', '_') for span in exporter.get_finished_spans()))"
    )
    assert out.split() == ["observer", "True", "True", "spans", "stoppoint.run_child", "stoppoint.step_one"]
