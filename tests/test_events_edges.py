"""Run events at the edges (API.md §7): what a review of the events found, pinned."""

from __future__ import annotations

import anyio
import pytest

import stoppoint as sp

from .conftest import Channel, kinds
from .hooks import HookedStore, Write

pytestmark = pytest.mark.anyio


async def test_replay_of_a_run_whose_task_group_was_cancelled_tells_an_interrupt_never_heard_live() -> None:
    flow = sp.Flow("cancelled")
    started = anyio.Event()

    @flow.step
    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    heard: list[sp.RunEvent] = []
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, on_event=heard.append)
        await started.wait()
        tg.cancel_scope.cancel()
    assert isinstance(await handle.outcome(), sp.Interrupted)
    assert kinds(heard) == [
        ("flow.started", None),
        ("step.started", "hang"),
        ("step.cancelled", "hang"),
        ("interrupt.received", None),  # the run's own signal, source="cancel", as the report lists it
        ("flow.interrupted", None),
    ]
    replay = [event async for event in handle.events()]
    assert kinds(replay) == kinds(heard)


async def test_replay_of_a_signal_sent_before_the_run_puts_it_before_flow_started(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("early")

    @flow.step
    async def a() -> int:
        return 1

    interrupter.interrupt("before", source="test")  # waits in the buffer: the run stops before `a`
    heard: list[sp.RunEvent] = []
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, interrupts=receiver, on_event=heard.append)
        assert isinstance(await handle.outcome(), sp.Interrupted)
    assert kinds(heard) == [("flow.started", None), ("interrupt.received", None), ("flow.interrupted", None)]
    replay = [event async for event in handle.events()]
    assert kinds(replay) == kinds(heard)  # replay: interrupt.received, flow.started, flow.interrupted


async def test_a_listener_interrupting_on_interrupt_received_does_not_change_the_first_signal(
    channel: Channel,
) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("reentrant")
    ready = anyio.Event()
    handles: list[sp.FlowRun] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        await ready.wait()
        interrupter.interrupt("first", source="test")
        await ctx.checkpoint()

    def listener(event: sp.RunEvent) -> None:
        if isinstance(event, sp.InterruptReceivedEvent) and event.signal.reason == "first":
            handles[0].interrupt("second")

    async with anyio.create_task_group() as tg:
        handles.append(await flow.start(tg, interrupts=receiver, on_event=listener))
        ready.set()
        outcome = await handles[0].outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert [signal.reason for signal in outcome.report.interrupts] == ["first", "second"]
    assert outcome.signal.reason == "first"  # it is "second"


async def test_a_listener_interrupting_on_the_end_event_hears_nothing_after_it() -> None:
    flow = sp.Flow("late")
    ready = anyio.Event()
    handles: list[sp.FlowRun] = []
    heard: list[sp.RunEvent] = []
    accepted: list[bool] = []

    @flow.step
    async def a() -> int:
        await ready.wait()
        return 1

    def listener(event: sp.RunEvent) -> None:
        heard.append(event)
        if event.event == "flow.completed":
            accepted.append(handles[0].interrupt("too late"))

    async with anyio.create_task_group() as tg:
        handles.append(await flow.start(tg, on_event=listener))
        ready.set()
        outcome = await handles[0].outcome()
    assert isinstance(outcome, sp.Completed)
    assert kinds(heard)[-1] == ("flow.completed", None)  # last: interrupt.received
    assert accepted == [False]
    assert outcome.report.interrupts == []


async def test_a_failing_listener_prints_nothing_while_structlog_is_unconfigured(
    unconfigured_structlog: None, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = sp.Flow("quiet")

    @flow.step
    async def a() -> int:
        return 1

    def listener(event: sp.RunEvent) -> None:
        raise RuntimeError("display broke")

    outcome = await flow.run(on_event=listener)
    assert isinstance(outcome, sp.Completed)
    assert capsys.readouterr().out == ""


async def test_a_stream_opened_by_a_listener_of_the_end_event_gets_the_end_event() -> None:
    flow = sp.Flow("opened_late")
    ready = anyio.Event()
    handles: list[sp.FlowRun] = []
    streams: list[sp.EventStream] = []

    @flow.step
    async def a() -> int:
        await ready.wait()
        return 1

    def listener(event: sp.RunEvent) -> None:
        if event.event == "flow.completed":
            streams.append(handles[0].events())

    async with anyio.create_task_group() as tg:
        handles.append(await flow.start(tg, on_event=listener))
        ready.set()
        assert isinstance(await handles[0].outcome(), sp.Completed)
    got = [event async for event in streams[0]]
    assert kinds(got) == [
        ("flow.started", None),
        ("step.started", "a"),
        ("step.completed", "a"),
        ("flow.completed", None),
    ]


class HeldStore(HookedStore):
    """A MemoryStore whose commit of step `a` (the write after the one that lists the run) waits for
    `let_go` (to open a stream mid-commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.saving = anyio.Event()
        self.let_go = anyio.Event()

    async def before(self, write: Write) -> None:
        if write.outputs == {"a"} and not write.final:  # the commit of step `a`
            self.saving.set()
            await self.let_go.wait()


async def test_a_stream_opened_while_a_completed_step_is_saved_tells_its_end_once() -> None:
    """The step's end is told after its save: a stream opened during the save must not get it
    both from the replay and live."""
    flow = sp.Flow("saved")

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(a: int) -> int:
        return a + 1

    store = HeldStore()
    heard: list[sp.RunEvent] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            handle = await flow.start(tg, store=store, on_event=heard.append)
            await store.saving.wait()
            stream = handle.events()
            store.let_go.set()
            got = [event async for event in stream]
            assert isinstance(await handle.outcome(), sp.Completed)
    assert kinds(got) == kinds(heard)
    assert kinds(got).count(("step.completed", "a")) == 1


async def test_two_tasks_reading_one_stream_both_wake() -> None:
    """Two consumers of one stream share its events; neither waits for ever."""
    flow = sp.Flow("shared")
    go = anyio.Event()

    @flow.step
    async def a() -> int:
        await go.wait()
        return 1

    got: list[list[str]] = [[], []]
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        stream = handle.events()

        async def read(index: int) -> None:
            async for event in stream:
                got[index].append(event.event)

        tg.start_soon(read, 0)
        tg.start_soon(read, 1)
        await anyio.wait_all_tasks_blocked()
        go.set()
        await handle.outcome()
    assert sorted(got[0] + got[1]) == sorted(["flow.started", "step.started", "step.completed", "flow.completed"])
