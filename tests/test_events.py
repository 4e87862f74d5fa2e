"""Events (API.md §7): one typed object per transition, to `on_event=` and to a configured structlog."""

from __future__ import annotations

from datetime import UTC

import anyio
import pydantic
import pytest
import structlog
import structlog.testing

import stoppoint as sp

from .conftest import Channel, kinds, line_after

pytestmark = pytest.mark.anyio


def chain(name: str = "chain") -> sp.Flow:
    flow = sp.Flow(name)

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(a: int) -> int:
        return a + 1

    return flow


async def test_a_completed_run_tells_each_transition_in_order() -> None:
    events: list[sp.RunEvent] = []
    outcome = await chain().run(run_id="r1", on_event=events.append)
    assert isinstance(outcome, sp.Completed)
    assert kinds(events) == [
        ("flow.started", None),
        ("step.started", "a"),
        ("step.completed", "a"),
        ("step.started", "b"),
        ("step.completed", "b"),
        ("flow.completed", None),
    ]
    assert all(event.run_id == "r1" and event.flow == "chain" for event in events)
    assert all(event.at.tzinfo is UTC for event in events)
    assert [event.at for event in events] == sorted(event.at for event in events)
    completed = [event for event in events if isinstance(event, sp.StepCompletedEvent)]
    for event in completed:
        assert event.duration_s == pytest.approx(outcome.report.steps[event.step].duration_s)
    assert isinstance(events[-1], sp.FlowCompletedEvent)
    assert events[-1].duration_s >= sum(event.duration_s for event in completed)


async def test_an_interrupted_run_tells_where_it_stopped_and_why(channel: Channel) -> None:
    interrupter, receiver = channel
    events: list[sp.RunEvent] = []
    flow = sp.Flow("stops")

    @flow.step
    async def first() -> int:
        return 1

    @flow.step
    async def work(ctx: sp.StepContext, first: int) -> int:
        interrupter.interrupt("enough", source="test")
        line = line_after()
        await ctx.checkpoint()
        return line

    @flow.step
    async def last(work: int) -> int:
        return work

    outcome = await flow.run(interrupts=receiver, on_event=events.append)
    assert isinstance(outcome, sp.Interrupted)
    assert kinds(events) == [
        ("flow.started", None),
        ("step.started", "first"),
        ("step.completed", "first"),
        ("step.started", "work"),
        ("interrupt.received", None),
        ("step.stopped", "work"),
        ("flow.interrupted", None),
    ]
    received, stopped, ended = events[4], events[5], events[6]
    assert isinstance(received, sp.InterruptReceivedEvent)
    assert received.signal == outcome.signal
    assert isinstance(stopped, sp.StepStoppedEvent)
    assert stopped.stopped_at == outcome.report.steps["work"].stopped_at
    assert stopped.stopped_at is not None
    assert stopped.stopped_at.startswith("test_events.py:")
    assert isinstance(ended, sp.FlowInterruptedEvent)
    assert ended.signal == outcome.signal
    assert ended.forced is False


async def test_a_failed_step_tells_its_error_and_the_cancelled_siblings() -> None:
    events: list[sp.RunEvent] = []
    flow = sp.Flow("fails")
    blocked = anyio.Event()

    @flow.step
    async def slow() -> None:
        blocked.set()
        await anyio.sleep_forever()

    @flow.step
    async def broken() -> None:
        await blocked.wait()
        raise ValueError("bad input")

    with pytest.raises(sp.StepFailed):
        await flow.run(on_event=events.append)
    ends = {
        getattr(event, "step", None): event
        for event in events
        if event.event.startswith("step.") and event.event != "step.started"
    }
    assert isinstance(ends["broken"], sp.StepFailedEvent)
    assert ends["broken"].error == "ValueError: bad input"
    assert isinstance(ends["slow"], sp.StepCancelledEvent)
    assert isinstance(events[-1], sp.FlowFailedEvent)
    assert events[-1].step == "broken"
    assert "bad input" in events[-1].error
    assert sum(isinstance(event, sp.FlowFailedEvent) for event in events) == 1


async def test_a_forced_interrupt_tells_cancelled_steps_and_a_forced_end(channel: Channel) -> None:
    interrupter, receiver = channel
    events: list[sp.RunEvent] = []
    flow = sp.Flow("forced")
    started = anyio.Event()

    @flow.step
    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        run = await flow.start(tg, interrupts=receiver, on_event=events.append)
        await started.wait()
        interrupter.interrupt("now", force=True)
        outcome = await run.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert kinds(events)[-2:] == [("step.cancelled", "hang"), ("flow.interrupted", None)]
    assert isinstance(events[-1], sp.FlowInterruptedEvent)
    assert events[-1].forced is True


async def test_included_steps_are_told_under_their_own_flow() -> None:
    events: list[sp.RunEvent] = []
    inner = chain("inner")
    outer = sp.Flow("outer")
    outer.include(inner, name="sub")

    outcome = await outer.run(on_event=events.append)
    assert isinstance(outcome, sp.Completed)
    assert [(event.flow, *kinds([event])[0]) for event in events] == [
        ("outer", "flow.started", None),
        ("outer", "step.started", "sub"),
        ("inner", "step.started", "a"),
        ("inner", "step.completed", "a"),
        ("inner", "step.started", "b"),
        ("inner", "step.completed", "b"),
        ("outer", "step.completed", "sub"),
        ("outer", "flow.completed", None),
    ]


async def test_a_resumed_run_says_which_steps_it_will_not_run_again(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("resumable")

    @flow.step
    async def a() -> int:
        interrupter.interrupt()
        return 1

    @flow.step
    async def b(a: int) -> int:
        return a + 1

    first = await flow.run(interrupts=receiver)
    assert isinstance(first, sp.Interrupted)
    events: list[sp.RunEvent] = []
    second = await flow.run(resume=first.checkpoint, on_event=events.append)
    assert isinstance(second, sp.Completed)
    assert isinstance(events[0], sp.FlowStartedEvent)
    assert events[0].resumed == ("a",)
    assert kinds(events)[1:] == [("step.started", "b"), ("step.completed", "b"), ("flow.completed", None)]


async def test_a_cancelled_run_tells_a_forced_end_once() -> None:
    events: list[sp.RunEvent] = []
    flow = sp.Flow("cancelled")
    started = anyio.Event()

    @flow.step
    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:

        async def run_it() -> None:
            await flow.run(on_event=events.append)

        tg.start_soon(run_it)
        await started.wait()
        tg.cancel_scope.cancel()
    assert kinds(events)[-3:] == [("step.cancelled", "hang"), ("interrupt.received", None), ("flow.interrupted", None)]
    assert isinstance(events[-1], sp.FlowInterruptedEvent)
    assert events[-1].forced is True
    assert events[-1].signal.source == "cancel"

    events.clear()
    started = anyio.Event()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, on_event=events.append)
        await started.wait()
        tg.cancel_scope.cancel()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert sum(event.event == "flow.interrupted" for event in events) == 1
    assert isinstance(events[-1], sp.FlowInterruptedEvent)
    assert events[-1].signal == outcome.signal


async def test_a_listener_that_raises_is_logged_and_the_run_goes_on() -> None:
    calls: list[str] = []

    def listener(event: sp.RunEvent) -> None:
        calls.append(event.event)
        raise RuntimeError("display broke")

    with structlog.testing.capture_logs() as logs:
        outcome = await chain().run(on_event=listener)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 2
    assert len(calls) == 6  # every event was still offered
    failures = [log for log in logs if log["event"] == "event.listener_failed"]
    assert len(failures) == 6
    assert failures[0]["failed_on"] == "flow.started"
    assert failures[0]["log_level"] == "error"


async def test_events_go_to_a_configured_structlog_with_run_flow_and_step() -> None:
    flow = sp.Flow("logged")

    @flow.step
    async def ok() -> int:
        return 1

    @flow.step
    async def broken(ok: int) -> None:
        raise ValueError("no")

    with structlog.testing.capture_logs() as logs, pytest.raises(sp.StepFailed):
        await flow.run(run_id="r9")
    assert [(log["event"], log.get("step"), log["log_level"]) for log in logs] == [
        ("flow.started", None, "info"),
        ("step.started", "ok", "info"),
        ("step.completed", "ok", "info"),
        ("step.started", "broken", "info"),
        ("step.failed", "broken", "error"),
        ("flow.failed", "broken", "error"),
    ]
    assert all(log["run_id"] == "r9" and log["flow"] == "logged" for log in logs)
    assert logs[4]["error"] == "ValueError: no"


async def test_nobody_listening_builds_no_event(monkeypatch: pytest.MonkeyPatch, unconfigured_structlog: None) -> None:
    """With no `on_event` and structlog unconfigured, a run builds no event object at all."""
    assert not structlog.is_configured()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an event was built with nobody listening")

    for name in sp.__all__:
        obj = getattr(sp, name)
        if isinstance(obj, type) and issubclass(obj, sp.RunEvent):
            monkeypatch.setattr(obj, "model_construct", refuse)
            monkeypatch.setattr(obj, "__init__", refuse)
    outcome = await chain().run()
    assert isinstance(outcome, sp.Completed)


async def test_events_read_back_from_json() -> None:
    events: list[sp.RunEvent] = []
    await chain().run(on_event=events.append)
    adapter = pydantic.TypeAdapter(sp.Event)
    for event in events:
        again = adapter.validate_json(event.model_dump_json())
        assert type(again) is type(event)
        assert again == event


async def test_on_event_must_be_callable() -> None:
    with pytest.raises(TypeError, match="flow 'chain': on_event must be a callable"):
        await chain().run(on_event="print")  # type: ignore[arg-type]


def same_events(a: list[sp.RunEvent], b: list[sp.RunEvent]) -> bool:
    """Equal but for `at` (an event rebuilt for a late listener may carry a slightly other time)."""
    return [event.model_dump(exclude={"at"}) for event in a] == [event.model_dump(exclude={"at"}) for event in b]


def gated(name: str = "gated") -> tuple[sp.Flow, anyio.Event, anyio.Event]:
    """a -> b -> c, where b waits for `go` after setting `inside`."""
    flow = sp.Flow(name)
    inside, go = anyio.Event(), anyio.Event()

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(a: int) -> int:
        inside.set()
        await go.wait()
        return a + 1

    @flow.step
    async def c(b: int) -> int:
        return b + 1

    return flow, inside, go


async def test_events_of_a_started_run_from_its_start_to_its_end() -> None:
    """`FlowRun.events()` yields the same events as `on_event` hears, also when the listener
    comes in the middle of the run: the past is rebuilt from the run's records."""
    flow, inside, go = gated()
    heard: list[sp.RunEvent] = []
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, on_event=heard.append)
        early = handle.events()
        await inside.wait()
        late = handle.events()  # a and b started, a completed
        go.set()
        got_early = [event async for event in early]
        got_late = [event async for event in late]
        outcome = await handle.outcome()
    assert isinstance(outcome, sp.Completed)
    assert kinds(heard) == [
        ("flow.started", None),
        ("step.started", "a"),
        ("step.completed", "a"),
        ("step.started", "b"),
        ("step.completed", "b"),
        ("step.started", "c"),
        ("step.completed", "c"),
        ("flow.completed", None),
    ]
    assert same_events(got_early, heard)
    assert same_events(got_late, heard)
    assert early.dropped == late.dropped == 0


async def test_events_of_an_ended_run_are_all_there_and_the_stream_ends(channel: Channel) -> None:
    interrupter, receiver = channel
    flow, inside, go = gated()
    heard: list[sp.RunEvent] = []
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, interrupts=receiver, on_event=heard.append)
        await inside.wait()
        interrupter.interrupt("stop", source="test")  # b finishes (it holds no stopping point), c never starts
        go.set()
        outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    replay = [event async for event in handle.events()]
    assert kinds(replay) == kinds(heard)
    assert kinds(replay)[-1] == ("flow.interrupted", None)
    received = [event for event in replay if isinstance(event, sp.InterruptReceivedEvent)]
    assert [event.signal for event in received] == [outcome.signal]


async def test_a_slow_consumer_loses_the_oldest_events_and_never_stalls_the_run() -> None:
    flow = sp.Flow("many")
    for i in range(10):
        flow.step(name=f"s{i}", after=(f"s{i - 1}",) if i else ())(chain_body)
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        stream = handle.events(max_buffer=3)
        outcome = await handle.outcome()  # the run ends without anyone reading the stream
    assert isinstance(outcome, sp.Completed)
    got = [event async for event in stream]
    assert kinds(got) == [("step.started", "s9"), ("step.completed", "s9"), ("flow.completed", None)]
    assert stream.dropped == 1 + 2 * 10 + 1 - 3


async def chain_body() -> None:
    pass


async def test_closing_a_stream_stops_listening_and_ends_it() -> None:
    flow, inside, go = gated()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        stream = handle.events()
        await inside.wait()
        stream.close()
        go.set()
        assert isinstance(await handle.outcome(), sp.Completed)
    got = [event async for event in stream]
    assert kinds(got) == [("flow.started", None), ("step.started", "a"), ("step.completed", "a"), ("step.started", "b")]


async def test_a_started_run_nobody_listens_to_builds_no_event(
    monkeypatch: pytest.MonkeyPatch, unconfigured_structlog: None
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an event was built with nobody listening")

    for name in sp.__all__:
        obj = getattr(sp, name)
        if isinstance(obj, type) and issubclass(obj, sp.RunEvent):
            monkeypatch.setattr(obj, "model_construct", refuse)
    flow, inside, go = gated()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        await inside.wait()
        go.set()
        assert isinstance(await handle.outcome(), sp.Completed)


async def test_events_max_buffer_must_be_a_positive_int() -> None:
    flow, _, go = gated()
    go.set()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        with pytest.raises(ValueError, match="max_buffer must be an int >= 1, got 0"):
            handle.events(max_buffer=0)
        await handle.outcome()
