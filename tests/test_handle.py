"""FlowRun handles: `await flow.start(task_group, inputs, ...)` (API.md §3).

A run started in the caller's task group is stopped from other tasks by its handle, shows a live report, and
hands its outcome to whoever awaits `outcome()`; its failures never reach the task group. Every test is
deterministic: the steps wait on anyio Events, and time is driven by replacing the executor's `_sleep`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import stoppoint as sp

from .conftest import Channel, FakeSleep, statuses

pytestmark = pytest.mark.anyio

Outcome = sp.Completed[Any] | sp.Interrupted


def gated_flow(name: str = "gated") -> tuple[sp.Flow, anyio.Event, anyio.Event, list[str]]:
    """prepare -> work -> finish; `work` sets `entered`, waits for `go`, then reaches a stopping point.

    Returns the flow, `entered`, `go` and the list of what ran.
    """
    flow = sp.Flow(name)
    entered, go = anyio.Event(), anyio.Event()
    ran: list[str] = []

    @flow.step
    async def prepare(size: int) -> int:
        ran.append("prepare")
        return size

    @flow.step
    async def work(ctx: sp.StepContext, prepare: int) -> int:
        ran.append("work")
        entered.set()
        await go.wait()
        await ctx.checkpoint()
        ran.append("work done")
        return prepare * 2

    @flow.step
    async def finish(work: int) -> int:
        ran.append("finish")
        return work + 1

    return flow, entered, go, ran


async def test_start_returns_a_live_handle_once_the_run_has_begun() -> None:
    """start() returns while the run goes on (not after it), with its run_id, flow, done and repr."""
    flow, entered, go, ran = gated_flow()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 5}, run_id="run-1")
        assert isinstance(handle, sp.FlowRun)
        assert handle.run_id == "run-1"
        assert handle.flow == "gated"
        assert not handle.done
        assert repr(handle) == "<FlowRun flow='gated' run_id='run-1' running>"
        report = handle.report
        assert report.run_id == "run-1"
        assert report.flow == "gated"
        assert report.finished_at is None
        # `prepare` and `work` may already have begun; `finish` waits for `work`, which waits for `go`.
        assert statuses(report)["finish"] is sp.StepStatus.PENDING
        await entered.wait()
        assert not handle.done
        go.set()
        outcome = await handle.outcome()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 11
    assert ran == ["prepare", "work", "work done", "finish"]
    assert handle.done
    assert repr(handle) == "<FlowRun flow='gated' run_id='run-1' done>"
    assert outcome.report.run_id == "run-1"
    assert await handle.outcome() is outcome  # the outcome can be awaited again, by anyone


async def test_run_id_is_generated_when_not_given() -> None:
    """Without run_id= each run gets a fresh hex id, the one its report shows."""
    flow, _, go, _ = gated_flow()
    go.set()
    async with anyio.create_task_group() as tg:
        first = await flow.start(tg, {"size": 1})
        second = await flow.start(tg, {"size": 2})
    assert re.fullmatch(r"[0-9a-f]{32}", first.run_id)
    assert re.fullmatch(r"[0-9a-f]{32}", second.run_id)
    assert first.run_id != second.run_id
    outcome = await first.outcome()
    assert outcome.report.run_id == first.run_id
    assert first.report.run_id == first.run_id


async def test_outcome_can_be_awaited_by_several_tasks() -> None:
    """Every task awaiting outcome() gets the same outcome once the run ends."""
    flow, entered, go, _ = gated_flow()
    got: list[Outcome] = []

    async def wait_for(handle: sp.FlowRun) -> None:
        got.append(await handle.outcome())

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 3})
        tg.start_soon(wait_for, handle)
        tg.start_soon(wait_for, handle)
        await entered.wait()
        await anyio.wait_all_tasks_blocked()
        assert got == []  # nobody gets an outcome before the run ends
        go.set()
    assert len(got) == 2
    assert got[0] is got[1]
    assert isinstance(got[0], sp.Completed)
    assert got[0].value == 7


async def test_interrupt_from_another_task_stops_at_the_next_stopping_point() -> None:
    """interrupt() from another task: the step stops at its next checkpoint; source "api", reason kept."""
    flow = sp.Flow("loop")
    reached, resume = anyio.Event(), anyio.Event()
    passed: list[int] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        for i in range(10):
            await ctx.checkpoint()
            passed.append(i)
            if i == 2:
                reached.set()
                await resume.wait()
        return len(passed)

    @flow.step
    async def after(work: int) -> int:
        return work

    async def handler(handle: sp.FlowRun) -> None:
        await reached.wait()
        assert handle.interrupt("enough for today")
        resume.set()

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        tg.start_soon(handler, handle)
        outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert passed == [0, 1, 2]
    assert not outcome.forced
    assert outcome.signal.reason == "enough for today"
    assert outcome.signal.source == "api"
    assert not outcome.signal.force
    assert outcome.report.stopped == ["work"]
    assert outcome.report.not_started == ["after"]
    assert outcome.report.interrupts == [outcome.signal]
    # The run is over: a late interrupt is refused and changes nothing.
    assert handle.interrupt("too late") is False
    assert handle.report.interrupts == [outcome.signal]


async def test_interrupt_keeps_a_given_source() -> None:
    """interrupt(source=...) overrides the default "api"."""
    flow, entered, go, _ = gated_flow()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 1})
        await entered.wait()
        assert handle.interrupt("from the admin shell", source="admin")
        go.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.source == "admin"
    assert outcome.signal.reason == "from the admin shell"


async def test_forced_interrupt_cancels_a_step_blocked_forever() -> None:
    """interrupt(force=True) cancels a step blocked in sleep_forever(): Interrupted(forced=True), step CANCELLED."""
    flow = sp.Flow("stuck")
    blocked = anyio.Event()
    cleanup: list[str] = []

    @flow.step
    async def first() -> int:
        return 1

    @flow.step
    async def hang(first: int) -> None:
        blocked.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleanup.append("hang cleaned up")

    @flow.step
    async def last(hang: None) -> None: ...

    async def handler(handle: sp.FlowRun) -> None:
        await blocked.wait()
        assert handle.interrupt("stuck for too long", force=True)

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        tg.start_soon(handler, handle)
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.signal.force
    assert outcome.signal.source == "api"
    assert outcome.signal.reason == "stuck for too long"
    assert statuses(outcome.report) == {
        "first": sp.StepStatus.COMPLETED,
        "hang": sp.StepStatus.CANCELLED,
        "last": sp.StepStatus.NOT_STARTED,
    }
    assert cleanup == ["hang cleaned up"]
    assert outcome.checkpoint.outputs == {"first": 1}


async def test_live_report_shows_statuses_and_progress() -> None:
    """While running: COMPLETED/RUNNING/PENDING, the step's progress, no finished_at; final statuses after."""
    flow = sp.Flow("live")
    reported, go = anyio.Event(), anyio.Event()

    @flow.step
    async def load() -> list[int]:
        return list(range(10))

    @flow.step
    async def crunch(ctx: sp.StepContext, load: list[int]) -> int:
        ctx.progress(3, 10, "msg")
        reported.set()
        await go.wait()
        ctx.progress(10, 10, "all done")
        return sum(load)

    @flow.step
    async def store(crunch: int) -> int:
        return crunch

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        await reported.wait()
        live = handle.report
        assert live.finished_at is None
        assert statuses(live) == {
            "load": sp.StepStatus.COMPLETED,
            "crunch": sp.StepStatus.RUNNING,
            "store": sp.StepStatus.PENDING,
        }
        crunch_step = live.steps["crunch"]
        assert crunch_step.progress == sp.Progress(done=3, total=10, message="msg")
        assert crunch_step.started_at is not None
        assert crunch_step.finished_at is None
        assert crunch_step.duration_s is None
        assert live.steps["load"].finished_at is not None
        assert live.steps["store"].started_at is None
        # A snapshot: it does not change as the run goes on.
        go.set()
        outcome = await handle.outcome()
    assert crunch_step.status is sp.StepStatus.RUNNING
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 45
    final = handle.report
    assert final.finished_at is not None
    assert final.completed == ["load", "crunch", "store"]
    assert final.steps["crunch"].progress == sp.Progress(done=10, total=10, message="all done")
    assert final.steps["crunch"].finished_at is not None
    # `store` was reported PENDING above; its report now is that of a completed step, times and all.
    for name in ("load", "crunch", "store"):
        step = final.steps[name]
        assert step.started_at is not None
        assert step.finished_at is not None
        assert step.duration_s is not None
        assert step.started_at <= step.finished_at
        assert abs((step.finished_at - step.started_at).total_seconds() - step.duration_s) < 1e-3
    assert final == outcome.report


async def test_live_report_of_an_interrupted_run() -> None:
    """A step PENDING while the run goes on is NOT_STARTED once an interrupt ended the run."""
    flow, entered, go, _ = gated_flow()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 2})
        await entered.wait()
        assert statuses(handle.report)["finish"] is sp.StepStatus.PENDING
        assert handle.interrupt("stop")
        assert [s.reason for s in handle.report.interrupts] == ["stop"]  # recorded at once
        go.set()
    assert statuses(handle.report) == {
        "prepare": sp.StepStatus.COMPLETED,
        "work": sp.StepStatus.INTERRUPTED,
        "finish": sp.StepStatus.NOT_STARTED,
    }
    assert handle.report.finished_at is not None


async def test_failing_step_raises_from_outcome_not_into_the_task_group() -> None:
    """A step's exception comes out of outcome() as StepFailed; the task group and its other tasks go on."""
    flow = sp.Flow("fragile")
    sibling_may_finish = anyio.Event()
    events: list[str] = []

    @flow.step
    async def ok() -> int:
        return 1

    @flow.step
    async def broken(ok: int) -> None:
        raise ValueError("disk full")

    @flow.step
    async def never(broken: None) -> None: ...

    async def sibling() -> None:
        await sibling_may_finish.wait()
        events.append("sibling finished")

    async with anyio.create_task_group() as tg:
        tg.start_soon(sibling)
        handle = await flow.start(tg)
        message = r"step 'broken' of flow 'fragile' failed: ValueError: disk full"
        with pytest.raises(sp.StepFailed, match=message) as info:
            await handle.outcome()
        events.append("failure seen")
        assert handle.done
        assert handle.interrupt("too late") is False
        sibling_may_finish.set()  # the sibling was not cancelled by the failure
    events.append("task group exited")
    assert events == ["failure seen", "sibling finished", "task group exited"]
    failure = info.value
    assert failure.step == "broken"
    assert isinstance(failure.__cause__, ValueError)
    assert failure.report.completed == ["ok"]
    assert failure.report.failed == ["broken"]
    assert failure.report.not_started == ["never"]
    assert failure.checkpoint.outputs == {"ok": 1}
    with pytest.raises(sp.StepFailed):  # again, for anyone else who asks
        await handle.outcome()


async def test_bad_inputs_raise_from_start_before_anything_starts(channel: Channel) -> None:
    """Missing or unknown inputs: FlowInputError from start() itself; no step ran, the receiver untouched."""
    interrupter, receiver = channel
    flow, _, go, ran = gated_flow()
    go.set()
    assert interrupter.interrupt("waiting in the buffer", source="test")
    async with anyio.create_task_group() as tg:
        with pytest.raises(sp.FlowInputError) as info:
            await flow.start(tg, {"sise": 5}, interrupts=receiver)
    assert info.value.missing == ("size",)
    assert info.value.unknown == ("sise",)
    assert ran == []
    assert receiver.statistics().current_buffer_used == 1  # nothing read the interrupt stream


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"strategy": "at checkpoint"}, TypeError),
        ({"interrupts": object()}, TypeError),
        ({"run_id": ""}, TypeError),
        ({"run_id": 7}, TypeError),
        ({"grace": -1}, ValueError),
        ({"grace": True}, ValueError),
        ({"deadline": math.nan}, ValueError),
        ({"deadline": "10"}, ValueError),
        ({"inputs": [("size", 1)]}, TypeError),
    ],
)
async def test_bad_options_raise_from_start(options: dict[str, Any], error: type[Exception]) -> None:
    """Bad options: TypeError/ValueError from start() itself, and no step runs."""
    flow, _, go, ran = gated_flow()
    go.set()
    kwargs: dict[str, Any] = {"inputs": {"size": 1}, **options}
    async with anyio.create_task_group() as tg:
        with pytest.raises(error):
            await flow.start(tg, **kwargs)
    assert ran == []


async def test_starting_an_empty_flow_is_a_definition_error() -> None:
    """A flow without steps cannot start: FlowDefinitionError from start()."""
    async with anyio.create_task_group() as tg:
        with pytest.raises(sp.FlowDefinitionError, match="has no steps"):
            await sp.Flow("empty").start(tg)


async def test_strategy_given_to_start_applies() -> None:
    """start(strategy=FinishCurrent()): the running step finishes, the next one never starts."""
    flow, entered, go, ran = gated_flow()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 4}, strategy=sp.FinishCurrent())
        await entered.wait()
        assert handle.interrupt("finish what you are doing")
        go.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert ran == ["prepare", "work", "work done"]
    assert outcome.report.completed == ["prepare", "work"]
    assert outcome.report.not_started == ["finish"]
    assert outcome.checkpoint.outputs == {"prepare": 4, "work": 8}


async def test_cancelling_the_task_group_mid_step_is_a_forced_interrupt() -> None:
    """The caller's task group cancelled during a step: outcome() is Interrupted(forced=True), source "cancel"."""
    flow = sp.Flow("cancelled")
    blocked = anyio.Event()
    cleanup: list[str] = []

    @flow.step
    async def first() -> str:
        return "first"

    @flow.step
    async def hang(first: str) -> None:
        blocked.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleanup.append("hang cleaned up")

    @flow.step
    async def last(hang: None) -> None: ...

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        await blocked.wait()
        tg.cancel_scope.cancel()
    assert handle.done
    outcome = await handle.outcome()  # awaited outside the cancelled task group
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.signal.source == "cancel"
    assert outcome.signal.force
    assert statuses(outcome.report) == {
        "first": sp.StepStatus.COMPLETED,
        "hang": sp.StepStatus.CANCELLED,
        "last": sp.StepStatus.NOT_STARTED,
    }
    assert outcome.report.interrupts == [outcome.signal]
    assert handle.report.interrupts == [outcome.signal]
    assert outcome.checkpoint.outputs == {"first": "first"}
    assert cleanup == ["hang cleaned up"]
    assert handle.interrupt("too late") is False


async def test_cancelling_the_task_group_cancels_every_branch() -> None:
    """With several steps in flight (one task each), cancelling the task group still gives Interrupted."""
    flow = sp.Flow("fan")
    in_flight: list[str] = []

    @flow.step
    async def root() -> int:
        return 1

    def branch(name: str) -> Callable[..., Awaitable[None]]:
        async def step(root: int) -> None:
            in_flight.append(name)
            await anyio.sleep_forever()

        return step

    for name in ("x", "y", "z"):
        flow.step(name=name)(branch(name))

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        await anyio.wait_all_tasks_blocked()
        assert sorted(in_flight) == ["x", "y", "z"]
        tg.cancel_scope.cancel()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.signal.source == "cancel"
    assert outcome.report.completed == ["root"]
    assert outcome.report.cancelled == ["x", "y", "z"]


async def test_cancel_after_a_graceful_interrupt_keeps_the_first_signal() -> None:
    """A graceful interrupt, then the task group cancelled: the outcome's signal is the first one."""
    flow, entered, _, _ = gated_flow()  # `work` waits for `go`, which never comes: no stopping point reached
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 1})
        await entered.wait()
        assert handle.interrupt("please stop")
        tg.cancel_scope.cancel()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.signal.reason == "please stop"
    assert outcome.signal.source == "api"
    assert not outcome.signal.force
    assert outcome.report.interrupts == [outcome.signal]  # no "cancel" signal is added
    assert statuses(outcome.report)["work"] is sp.StepStatus.CANCELLED


async def test_several_runs_are_interrupted_independently_by_run_id() -> None:
    """Runs of one flow in one task group, kept by run id: interrupting one leaves the others alone."""
    flow, _, go, _ = gated_flow()
    sizes = {"r1": 1, "r2": 2, "r3": 3}
    async with anyio.create_task_group() as tg:
        runs = {run_id: await flow.start(tg, {"size": size}, run_id=run_id) for run_id, size in sizes.items()}
        await anyio.wait_all_tasks_blocked()  # every run waits in `work`
        assert all(statuses(handle.report)["work"] is sp.StepStatus.RUNNING for handle in runs.values())

        async def handler(run_id: str) -> None:
            assert runs[run_id].interrupt(f"cancel {run_id}")

        async with anyio.create_task_group() as handlers:
            handlers.start_soon(handler, "r2")
        go.set()
    outcomes = {run_id: await handle.outcome() for run_id, handle in runs.items()}
    assert isinstance(outcomes["r1"], sp.Completed)
    assert outcomes["r1"].value == 3
    assert isinstance(outcomes["r3"], sp.Completed)
    assert outcomes["r3"].value == 7
    interrupted = outcomes["r2"]
    assert isinstance(interrupted, sp.Interrupted)
    assert interrupted.signal.reason == "cancel r2"
    assert interrupted.report.run_id == "r2"
    assert interrupted.report.stopped == ["work"]
    assert interrupted.report.not_started == ["finish"]
    assert outcomes["r1"].report.interrupts == outcomes["r3"].report.interrupts == []


@pytest.mark.parametrize("via", ["handle", "channel"])
async def test_handle_and_interrupt_channel_both_stop_the_run(via: str, channel: Channel) -> None:
    """A run started with interrupts= stops on a signal from either its handle or the channel."""
    interrupter, receiver = channel
    flow, entered, go, _ = gated_flow()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 1}, interrupts=receiver)
        await entered.wait()
        if via == "handle":
            assert handle.interrupt("by handle")
        else:
            assert interrupter.interrupt("by channel", source="test")
        go.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert (outcome.signal.reason, outcome.signal.source) == (
        ("by handle", "api") if via == "handle" else ("by channel", "test")
    )
    assert outcome.report.stopped == ["work"]


async def test_a_signal_waiting_on_the_receiver_is_taken_before_start_returns(channel: Channel) -> None:
    """A signal already in the interrupts= receiver is taken by the time start() returns: no step starts."""
    interrupter, receiver = channel
    flow, _, go, ran = gated_flow()
    go.set()
    assert interrupter.interrupt("before the start", source="test")
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 1}, interrupts=receiver)
        assert receiver.statistics().current_buffer_used == 0  # the run listens by the time start() returns
        assert [s.reason for s in handle.report.interrupts] == ["before the start"]
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.reason == "before the start"
    assert outcome.report.not_started == ["prepare", "work", "finish"]
    assert ran == []


async def test_channel_and_handle_signals_are_both_recorded(channel: Channel) -> None:
    """Signals from the channel and from the handle are all recorded, in order; the first one is the outcome's."""
    interrupter, receiver = channel
    flow, entered, go, _ = gated_flow()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 1}, interrupts=receiver)
        await entered.wait()
        assert interrupter.interrupt("from the channel", source="test")
        assert handle.interrupt("from the handle")
        go.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.reason == "from the channel"
    assert [(s.reason, s.source) for s in outcome.report.interrupts] == [
        ("from the channel", "test"),
        ("from the handle", "api"),
    ]
    assert outcome.report.stopped == ["work"]


async def test_deadline_given_to_start_interrupts_the_run(fake_sleep: FakeSleep) -> None:
    """start(deadline=30): when the timer fires the run gets a "deadline" signal and stops at its next checkpoint."""
    flow, entered, go, ran = gated_flow()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 1}, deadline=30)
        await entered.wait()
        await fake_sleep.entered.wait()
        assert fake_sleep.calls == [30.0]
        assert handle.report.interrupts == []
        fake_sleep.released.set()
        await anyio.wait_all_tasks_blocked()  # the timer has fired
        assert [s.source for s in handle.report.interrupts] == ["deadline"]
        go.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.source == "deadline"
    assert outcome.signal.reason == "deadline of 30 s passed"
    assert not outcome.forced
    assert outcome.report.stopped == ["work"]
    assert outcome.report.not_started == ["finish"]
    assert ran == ["prepare", "work"]


async def test_deadline_timer_ends_with_the_run(fake_sleep: FakeSleep) -> None:
    """A run that completes before its deadline is Completed, and its timer does not hold the task group."""
    flow, entered, go, _ = gated_flow()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 1}, deadline=30)
        await entered.wait()
        await fake_sleep.entered.wait()
        go.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Completed)
    assert outcome.report.interrupts == []
    assert not fake_sleep.released.is_set()


async def test_grace_given_to_start_escalates(fake_sleep: FakeSleep) -> None:
    """start(grace=5): a graceful interrupt, then the grace period ends: the blocked step is cancelled."""
    flow, entered, _, _ = gated_flow()  # `work` never reaches its stopping point
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"size": 1}, grace=5)
        await entered.wait()
        assert handle.interrupt("wind down")
        await fake_sleep.entered.wait()
        assert fake_sleep.calls == [5.0]
        fake_sleep.released.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.signal.reason == "wind down"
    assert statuses(outcome.report)["work"] is sp.StepStatus.CANCELLED


# -- cancellation after a failure or a shield ----------------------------------------------------------------------


async def test_a_failure_is_not_hidden_by_a_later_cancellation() -> None:
    """A step failed, then the task group is cancelled while a sibling is shielded: outcome() raises StepFailed."""
    flow = sp.Flow("fail then cancel")
    shielded, release = anyio.Event(), anyio.Event()

    @flow.step
    async def slow(ctx: sp.StepContext) -> None:
        async with ctx.shield():
            shielded.set()
            await release.wait()
        await anyio.lowlevel.checkpoint()

    @flow.step
    async def boom() -> None:
        await shielded.wait()
        raise ValueError("boom")

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        await anyio.wait_all_tasks_blocked()
        assert statuses(handle.report) == {"slow": sp.StepStatus.RUNNING, "boom": sp.StepStatus.FAILED}
        tg.cancel_scope.cancel()
        release.set()
    with pytest.raises(sp.StepFailed) as info:
        await handle.outcome()
    assert info.value.step == "boom"
    assert isinstance(info.value.__cause__, ValueError)
    assert statuses(info.value.report) == {"slow": sp.StepStatus.CANCELLED, "boom": sp.StepStatus.FAILED}


async def test_no_step_starts_after_the_task_group_is_cancelled() -> None:
    """The task group cancelled while a step is shielded: the steps after it never start."""
    flow = sp.Flow("cancel between steps")
    shielded, release = anyio.Event(), anyio.Event()
    ran: list[str] = []

    @flow.step
    async def first(ctx: sp.StepContext) -> int:
        async with ctx.shield():
            shielded.set()
            await release.wait()
        return 1

    @flow.step
    async def second(first: int) -> int:
        ran.append("second")
        await anyio.lowlevel.checkpoint()
        return 2

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        await shielded.wait()
        tg.cancel_scope.cancel()
        release.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.signal.source == "cancel"
    assert ran == []
    assert statuses(outcome.report) == {"first": sp.StepStatus.COMPLETED, "second": sp.StepStatus.NOT_STARTED}


async def test_outcome_raises_a_failure_with_the_same_traceback_every_time() -> None:
    """Re-raising a stored StepFailed must not lengthen its traceback call after call."""
    flow = sp.Flow("fails")

    @flow.step
    async def boom() -> None:
        raise ValueError("boom")

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
    depths = []
    for _ in range(3):
        with pytest.raises(sp.StepFailed) as info:
            await handle.outcome()
        tb, depth = info.value.__traceback__, 0
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        depths.append(depth)
    assert depths[0] == depths[1] == depths[2]


async def test_progress_in_the_report_is_validated() -> None:
    """Progress values go through the pydantic model: ints become floats, as typed."""
    flow = sp.Flow("progress")

    @flow.step
    async def count(ctx: sp.StepContext) -> None:
        ctx.progress(3, 10)

    outcome = await flow.run()
    progress = outcome.report.steps["count"].progress
    assert progress is not None
    assert progress.model_dump_json() == '{"done":3.0,"total":10.0,"message":null}'


@pytest.mark.parametrize("task_group", [None, "tg"])
async def test_start_needs_a_task_group(task_group: Any) -> None:
    flow, *_ = gated_flow()
    with pytest.raises(TypeError, match="flow 'gated': start\\(\\) needs an anyio task group"):
        await flow.start(task_group)
