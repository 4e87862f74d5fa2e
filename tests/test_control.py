"""Every way a run is stopped: strategies, escalation (force, grace), deadlines, shields, progress.

Time is never waited for: grace and deadline timers sleep through `stoppoint._control._sleep`,
which these tests replace with a `FakeSleep` they release by hand (one test also runs trio's
MockClock, which jumps time forward whenever every task is blocked).
"""

from __future__ import annotations

import decimal
import fractions
import inspect
import math
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pydantic
import pytest

import stoppoint as sp

from .conftest import Channel, FakeSleep, line_after

pytestmark = pytest.mark.anyio


def chain(names: list[str], ran: list[str], interrupt_in: str | None, interrupter: sp.Interrupter | None) -> sp.Flow:
    """A linear flow of `names`; the step named `interrupt_in` interrupts the run, then runs on
    through a few stopping points (which only `AtCheckpoint` lets stop it) and returns."""
    flow = sp.Flow("chain")
    previous: str | None = None
    for name in names:

        async def step(ctx: sp.StepContext, _name: str = name, **_: Any) -> str:
            if _name == interrupt_in:
                assert interrupter is not None
                assert interrupter.interrupt("stop", source="test")
                for _ in range(3):
                    await ctx.checkpoint()
            ran.append(_name)
            return _name

        params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY)]
        if previous is not None:
            params.append(inspect.Parameter(previous, inspect.Parameter.KEYWORD_ONLY))
        step.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        flow.step(name=name)(step)
        previous = name
    return flow


STEPS = ["a", "b", "c", "d", "e", "f"]

# -- strategies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(5))
async def test_poll_next_n_lets_n_more_steps_start(channel: Channel, n: int) -> None:
    """PollNextN(n): the running step finishes (its checkpoints do not stop it), exactly n more start."""
    interrupter, receiver = channel
    ran: list[str] = []
    outcome = await chain(STEPS, ran, "a", interrupter).run(interrupts=receiver, strategy=sp.PollNextN(n))
    assert ran == STEPS[: 1 + n]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced is False
    assert outcome.report.completed == STEPS[: 1 + n]
    assert outcome.report.not_started == STEPS[1 + n :]
    assert outcome.checkpoint.outputs == {name: name for name in STEPS[: 1 + n]}


@pytest.mark.parametrize("n", [5, 6, 100])
async def test_poll_next_n_larger_than_the_remaining_steps_completes(channel: Channel, n: int) -> None:
    """With n at least the number of steps left, every step runs and the outcome is Completed."""
    interrupter, receiver = channel
    ran: list[str] = []
    outcome = await chain(STEPS, ran, "a", interrupter).run(interrupts=receiver, strategy=sp.PollNextN(n))
    assert ran == STEPS
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "f"
    assert [s.reason for s in outcome.report.interrupts] == ["stop"]


async def test_poll_next_n_counts_steps_in_declaration_order_among_ready_ones(channel: Channel) -> None:
    """Of several ready steps (one at a time), the first n in declaration order are the ones to start."""
    interrupter, receiver = channel
    flow = sp.Flow("fan", max_concurrency=1)
    ran: list[str] = []

    @flow.step
    async def first() -> int:
        interrupter.interrupt()
        return 1

    for name in ["p", "q", "r", "s"]:

        async def branch(first: int, _name: str = name) -> str:
            ran.append(_name)
            return _name

        flow.step(name=name)(branch)

    outcome = await flow.run(interrupts=receiver, strategy=sp.PollNextN(2))
    assert ran == ["p", "q"]
    assert outcome.report.not_started == ["r", "s"]


@pytest.mark.parametrize("limit", [None, 2, 3])
async def test_poll_next_n_admits_ready_steps_in_order_whatever_the_task_order(
    channel: Channel, limit: int | None
) -> None:
    """Steps ready together are admitted in declaration order when handed out, not by which spawned
    task happens to run first (trio runs them in random order: repeat to give it the chance)."""
    interrupter, receiver = channel
    flow = sp.Flow("fan", max_concurrency=limit)
    ran: list[str] = []

    @flow.step
    async def first() -> int:
        interrupter.interrupt()
        return 1

    for name in ["p", "q", "r", "s"]:

        async def branch(first: int, _name: str = name) -> str:
            ran.append(_name)
            await anyio.lowlevel.checkpoint()
            return _name

        flow.step(name=name)(branch)

    for _ in range(20):
        ran.clear()
        outcome = await flow.run(interrupts=receiver, strategy=sp.PollNextN(2))
        assert sorted(ran) == ["p", "q"]
        assert outcome.report.not_started == ["r", "s"]


async def test_signal_in_the_stream_before_the_run_counts_for_poll_next_n(channel: Channel) -> None:
    """A signal already waiting when the run begins: PollNextN(2) runs the first two steps only."""
    interrupter, receiver = channel
    interrupter.interrupt("early")
    ran: list[str] = []
    outcome = await chain(STEPS, ran, None, None).run(interrupts=receiver, strategy=sp.PollNextN(2))
    assert ran == ["a", "b"]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.reason == "early"


async def test_ignore_interruptions_runs_to_completion_and_records_every_signal(channel: Channel) -> None:
    """IgnoreInterruptions: checkpoints never stop, stop_requested stays False, even forced signals
    are only recorded."""
    interrupter, receiver = channel
    flow = sp.Flow("ignore")
    seen: list[bool] = []

    @flow.step
    async def noisy(ctx: sp.StepContext) -> int:
        interrupter.interrupt("one")
        interrupter.interrupt("two", force=True)
        for _ in range(10):
            await ctx.checkpoint()
        seen.append(ctx.stop_requested)
        await anyio.lowlevel.checkpoint()  # a forced signal would cancel here
        return 1

    @flow.step
    async def after(noisy: int) -> int:
        return noisy + 1

    outcome = await flow.run(interrupts=receiver, strategy=sp.IgnoreInterruptions())
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 2
    assert seen == [False]
    assert [(s.reason, s.force) for s in outcome.report.interrupts] == [("one", False), ("two", True)]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_poll_next_n_rejects_bad_n(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"PollNextN\(n\): n must be an int >= 0"):
        sp.PollNextN(bad)


def test_new_strategies_are_frozen_and_comparable() -> None:
    assert sp.PollNextN(2) == sp.PollNextN(2)
    assert sp.PollNextN(2) != sp.PollNextN(3)
    assert sp.PollNextN(0) != sp.FinishCurrent()
    assert sp.IgnoreInterruptions() == sp.IgnoreInterruptions()
    assert len({sp.PollNextN(1), sp.PollNextN(1), sp.IgnoreInterruptions()}) == 2
    assert repr(sp.PollNextN(3)) == "PollNextN(n=3)"
    with pytest.raises(AttributeError):
        sp.PollNextN(1).n = 2  # type: ignore[misc]


# -- escalation: force ----------------------------------------------------------------------------------


def blocked_flow(started: anyio.Event, ended: list[str]) -> sp.Flow:
    """`stuck` has no stopping point at all: only cancellation ends it. `later` never starts."""
    flow = sp.Flow("blocked")

    @flow.step
    async def stuck(ctx: sp.StepContext) -> int:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            ended.append("stuck")
        return 1  # pragma: no cover

    @flow.step
    async def later(stuck: int) -> int:  # pragma: no cover - never runs
        return stuck

    return flow


async def run_with(flow: sp.Flow, action: Callable[[], Any], started: anyio.Event, **options: Any) -> Any:
    """Run `flow`; once `started` is set, call `action` from another task."""
    result: list[Any] = []

    async def act() -> None:
        await started.wait()
        await anyio.wait_all_tasks_blocked()
        action()

    async with anyio.create_task_group() as tg:
        tg.start_soon(act)
        result.append(await flow.run(**options))
    return result[0]


@pytest.mark.parametrize("strategy", [sp.AtCheckpoint(), sp.FinishCurrent(), sp.PollNextN(3)])
async def test_force_cancels_a_step_with_no_stopping_point(channel: Channel, strategy: sp.Strategy) -> None:
    """A forced signal cancels the step through its cancel scope, under every strategy but Ignore."""
    interrupter, receiver = channel
    started, ended = anyio.Event(), []
    flow = blocked_flow(started, ended)
    outcome = await run_with(
        flow, lambda: interrupter.interrupt("now", force=True), started, interrupts=receiver, strategy=strategy
    )
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced is True
    assert outcome.signal.force is True
    assert outcome.report.cancelled == ["stuck"]
    assert outcome.report.not_started == ["later"]
    assert ended == ["stuck"]  # its finally ran
    assert outcome.checkpoint.outputs == {}


async def test_force_during_finish_current_cancels_the_step_it_let_run(channel: Channel) -> None:
    """FinishCurrent lets the step run past the first signal; a second, forced one cancels it."""
    interrupter, receiver = channel
    flow = sp.Flow("finish")
    graceful_seen, survived = anyio.Event(), []

    @flow.step
    async def long(ctx: sp.StepContext) -> int:
        interrupter.interrupt("please stop")
        for _ in range(100):
            await ctx.checkpoint()
        survived.append(ctx.stop_requested)
        graceful_seen.set()
        await anyio.sleep_forever()
        return 1  # pragma: no cover

    outcome = await run_with(
        flow,
        lambda: interrupter.interrupt("now", force=True),
        graceful_seen,
        interrupts=receiver,
        strategy=sp.FinishCurrent(),
    )
    assert survived == [False]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced is True
    assert outcome.signal.reason == "please stop"  # the first signal is the one reported
    assert [s.force for s in outcome.report.interrupts] == [False, True]
    assert outcome.report.cancelled == ["long"]


async def test_force_is_ignored_under_ignore_interruptions(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("ignored")
    started, release = anyio.Event(), anyio.Event()

    @flow.step
    async def waits() -> str:
        started.set()
        await release.wait()
        return "done"

    def force_then_release() -> None:
        interrupter.interrupt("now", force=True)
        release.set()

    outcome = await run_with(flow, force_then_release, started, interrupts=receiver, strategy=sp.IgnoreInterruptions())
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "done"
    assert [s.force for s in outcome.report.interrupts] == [True]


async def test_forced_signal_waiting_before_the_run_starts_nothing(channel: Channel) -> None:
    """A forced signal already in the stream: no step starts, and the outcome says forced."""
    interrupter, receiver = channel
    interrupter.interrupt("now", force=True)
    started, ended = anyio.Event(), []
    outcome = await blocked_flow(started, ended).run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced is True
    assert outcome.report.not_started == ["stuck", "later"]
    assert not started.is_set()


async def test_force_cancels_every_branch_in_flight(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("branches")
    arrived: list[str] = []
    all_in = anyio.Event()

    for name in ["x", "y", "z"]:

        async def branch(_name: str = name) -> str:
            arrived.append(_name)
            if len(arrived) == 3:
                all_in.set()
            await anyio.sleep_forever()
            return _name  # pragma: no cover

        flow.step(name=name)(branch)

    @flow.step
    async def join(x: str, y: str, z: str) -> str:  # pragma: no cover - never runs
        return x + y + z

    outcome = await run_with(flow, lambda: interrupter.interrupt(force=True), all_in, interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.cancelled == ["x", "y", "z"]
    assert outcome.report.not_started == ["join"]


async def test_a_step_forcing_its_own_run_is_cancelled_at_its_next_await(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("self")

    @flow.step
    async def rash() -> int:
        interrupter.interrupt("bail out", force=True)
        await anyio.lowlevel.checkpoint()
        return 1  # pragma: no cover

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.cancelled == ["rash"]


# -- escalation: grace ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [sp.AtCheckpoint(), sp.FinishCurrent(), sp.PollNextN(1)])
async def test_grace_cancels_steps_still_running_when_it_runs_out(
    channel: Channel, fake_sleep: FakeSleep, strategy: sp.Strategy
) -> None:
    """`grace` seconds after the first signal, steps that have not stopped are cancelled."""
    interrupter, receiver = channel
    started, ended = anyio.Event(), []
    flow = blocked_flow(started, ended)

    async def interrupt_then_let_time_pass() -> None:
        await started.wait()
        interrupter.interrupt("stop")
        await fake_sleep.entered.wait()
        assert fake_sleep.calls == [7.5]
        await anyio.wait_all_tasks_blocked()
        assert ended == []  # still running: grace has not run out
        fake_sleep.released.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupt_then_let_time_pass)
        outcome = await flow.run(interrupts=receiver, strategy=strategy, grace=7.5)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced is True
    assert outcome.signal.force is False  # the signal was graceful; grace forced the run
    assert outcome.report.cancelled == ["stuck"]
    assert ended == ["stuck"]


async def test_grace_does_not_hold_a_run_that_stopped_in_time(channel: Channel, fake_sleep: FakeSleep) -> None:
    """A run that stops at a stopping point ends at once; the grace timer is cancelled, not awaited."""
    interrupter, receiver = channel
    ran: list[str] = []
    outcome = await chain(STEPS, ran, "b", interrupter).run(interrupts=receiver, grace=60)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced is False
    assert outcome.report.stopped == ["b"]
    assert not fake_sleep.released.is_set()


async def test_grace_zero_forces_at_the_first_signal(channel: Channel) -> None:
    interrupter, receiver = channel
    started, ended = anyio.Event(), []
    outcome = await run_with(
        blocked_flow(started, ended), lambda: interrupter.interrupt(), started, interrupts=receiver, grace=0
    )
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.cancelled == ["stuck"]


async def test_grace_is_never_armed_under_ignore_interruptions(channel: Channel, fake_sleep: FakeSleep) -> None:
    interrupter, receiver = channel
    ran: list[str] = []
    outcome = await chain(STEPS, ran, "a", interrupter).run(
        interrupts=receiver, strategy=sp.IgnoreInterruptions(), grace=1
    )
    assert isinstance(outcome, sp.Completed)
    assert fake_sleep.calls == []


async def test_grace_is_armed_for_a_signal_waiting_before_the_run(channel: Channel, fake_sleep: FakeSleep) -> None:
    """PollNextN(1) lets one step start after a signal that came before the run: grace still applies."""
    interrupter, receiver = channel
    interrupter.interrupt("early")
    started, ended = anyio.Event(), []

    async def let_time_pass() -> None:
        await fake_sleep.entered.wait()
        await started.wait()
        fake_sleep.released.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(let_time_pass)
        outcome = await blocked_flow(started, ended).run(interrupts=receiver, strategy=sp.PollNextN(1), grace=3)
    assert fake_sleep.calls == [3.0]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.cancelled == ["stuck"]


def test_grace_with_trio_mock_clock() -> None:
    """The real timer on a virtual clock: cancellation comes exactly `grace` seconds after the signal."""
    trio = pytest.importorskip("trio")
    from trio.testing import MockClock

    async def main() -> tuple[sp.Completed[Any] | sp.Interrupted, float]:
        interrupter, receiver = sp.interrupt_channel()
        with interrupter, receiver:
            started, ended = anyio.Event(), []
            sent_at: list[float] = []

            def interrupt() -> None:
                sent_at.append(trio.current_time())
                interrupter.interrupt()

            outcome = await run_with(blocked_flow(started, ended), interrupt, started, interrupts=receiver, grace=30)
            return outcome, trio.current_time() - sent_at[0]

    outcome, waited = anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert waited == pytest.approx(30)


@pytest.mark.parametrize("option", ["grace", "deadline"])
@pytest.mark.parametrize("bad", [-1, math.nan, "5", True])
async def test_bad_grace_or_deadline(option: str, bad: Any) -> None:
    flow = sp.Flow("opts")

    @flow.step
    async def one() -> int:  # pragma: no cover - never runs
        return 1

    with pytest.raises(ValueError, match=rf"flow 'opts': {option} must be None or a number of seconds >= 0"):
        await flow.run(**{option: bad})


# -- deadline ---------------------------------------------------------------------------------------------


async def test_deadline_interrupts_the_run_with_source_deadline(fake_sleep: FakeSleep) -> None:
    flow = sp.Flow("slow")
    stops: list[str] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        await fake_sleep.entered.wait()
        fake_sleep.released.set()
        while True:
            stops.append(f"test_control.py:{line_after()}")
            await ctx.checkpoint()
            await anyio.lowlevel.checkpoint()

    outcome = await flow.run(deadline=10)
    assert fake_sleep.calls == [10.0]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.source == "deadline"
    assert outcome.signal.reason == "deadline of 10 s passed"
    assert outcome.forced is False
    assert outcome.report.steps["work"].stopped_at == stops[0]


async def test_deadline_signal_goes_to_this_run_only(channel: Channel, fake_sleep: FakeSleep) -> None:
    """The deadline's signal is not sent on the interrupt channel: other listeners never see it."""
    _, receiver = channel
    fake_sleep.released.set()
    with receiver.clone() as other:
        flow = sp.Flow("own")

        @flow.step
        async def work(ctx: sp.StepContext) -> int:
            while True:
                await ctx.checkpoint()
                await anyio.lowlevel.checkpoint()

        outcome = await flow.run(interrupts=receiver, deadline=5)
        assert isinstance(outcome, sp.Interrupted)
        assert outcome.signal.source == "deadline"
        with pytest.raises(anyio.WouldBlock):
            other.receive_nowait()


async def test_deadline_zero_stops_before_the_first_step() -> None:
    ran: list[str] = []
    outcome = await chain(STEPS, ran, None, None).run(deadline=0)
    assert ran == []
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.source == "deadline"
    assert outcome.report.not_started == STEPS


async def test_deadline_then_grace_forces(fake_sleep: FakeSleep) -> None:
    """The deadline's signal is an ordinary first signal: grace starts counting from it."""
    fake_sleep.released.set()
    started, ended = anyio.Event(), []
    outcome = await blocked_flow(started, ended).run(deadline=5, grace=2)
    assert fake_sleep.calls == [5.0, 2.0]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.source == "deadline"
    assert outcome.forced
    assert outcome.report.cancelled == ["stuck"]


async def test_a_far_deadline_does_not_hold_a_finished_run() -> None:
    """The timer is cancelled when the last step ends (real anyio.sleep, an hour away)."""
    ran: list[str] = []
    with anyio.fail_after(30):
        outcome = await chain(STEPS, ran, None, None).run(deadline=3600, grace=3600)
    assert isinstance(outcome, sp.Completed)


# -- shields ----------------------------------------------------------------------------------------------


async def test_stop_arriving_during_a_shield_is_delivered_after_it(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("shielded")
    inside: list[bool] = []
    lines: list[str] = []

    @flow.step
    async def careful(ctx: sp.StepContext) -> int:
        async with ctx.shield():
            interrupter.interrupt("stop")
            for _ in range(50):
                await ctx.checkpoint()
            async for _ in ctx.iterate(range(5)):
                pass
            inside.append(ctx.stop_requested)
        inside.append(ctx.stop_requested)
        lines.append(f"test_control.py:{line_after()}")
        await ctx.checkpoint()
        return 1  # pragma: no cover

    outcome = await flow.run(interrupts=receiver)
    assert inside == [False, True]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.steps["careful"].status is sp.StepStatus.INTERRUPTED
    assert outcome.report.steps["careful"].stopped_at == lines[0]


async def test_force_waits_for_the_shield_to_exit(channel: Channel) -> None:
    """A forced signal does not cancel inside the shield; the step is cancelled at its first
    await after the block."""
    interrupter, receiver = channel
    flow = sp.Flow("critical")
    in_shield, go = anyio.Event(), anyio.Event()
    log: list[str] = []

    @flow.step
    async def commit() -> int:
        async with sp.StepContext(run_id="r", flow="f", step="s").shield():
            in_shield.set()
            await go.wait()  # cancellation would land here without the shield
            log.append("block finished")
        await anyio.lowlevel.checkpoint()
        log.append("after the block")  # pragma: no cover
        return 1  # pragma: no cover

    async def force_then_release() -> None:
        await in_shield.wait()
        interrupter.interrupt("now", force=True)
        await anyio.wait_all_tasks_blocked()
        assert log == []
        go.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(force_then_release)
        outcome = await flow.run(interrupts=receiver)
    assert log == ["block finished"]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.cancelled == ["commit"]


async def test_forced_cancellation_lands_at_the_first_stopping_point_after_the_shield(channel: Channel) -> None:
    """Under FinishCurrent a stopping point never stops, but once the run is forced every stopping
    point yields, so the cancellation lands at the first one after the block (not a loop turn later)."""
    interrupter, receiver = channel
    flow = sp.Flow("critical")
    passed: list[int] = []

    @flow.step
    async def commit(ctx: sp.StepContext) -> int:
        async with ctx.shield():
            interrupter.interrupt("now", force=True)
            for _ in range(5):
                await ctx.checkpoint()  # shielded: neither stops nor is cancelled
        for i in range(5):
            passed.append(i)
            await ctx.checkpoint()
        return 1  # pragma: no cover

    outcome = await flow.run(interrupts=receiver, strategy=sp.FinishCurrent())
    assert passed == [0]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.cancelled == ["commit"]


async def test_a_forced_step_looping_on_checkpoints_is_cancelled_at_the_next_one(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("busy")
    count = 0

    @flow.step
    async def spin(ctx: sp.StepContext) -> int:
        nonlocal count
        interrupter.interrupt("now", force=True)
        while True:
            count += 1
            await ctx.checkpoint()

    outcome = await flow.run(interrupts=receiver, strategy=sp.FinishCurrent())
    assert count == 1
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.cancelled == ["spin"]


async def test_grace_waits_for_the_shield_too(channel: Channel, fake_sleep: FakeSleep) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("critical")
    go = anyio.Event()
    log: list[str] = []

    @flow.step
    async def commit(ctx: sp.StepContext) -> int:
        async with ctx.shield():
            interrupter.interrupt("stop")
            await fake_sleep.entered.wait()
            fake_sleep.released.set()
            await go.wait()
            log.append("block finished")
        await anyio.sleep_forever()
        return 1  # pragma: no cover

    async def release_later() -> None:
        await fake_sleep.released.wait()
        await anyio.wait_all_tasks_blocked()
        assert log == []
        go.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(release_later)
        outcome = await flow.run(interrupts=receiver, grace=1)
    assert log == ["block finished"]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.cancelled == ["commit"]


async def test_a_shield_completes_normally_without_signals() -> None:
    flow = sp.Flow("calm")

    @flow.step
    async def commit(ctx: sp.StepContext) -> int:
        async with ctx.shield():
            async with ctx.shield():  # nested shields are fine
                await ctx.checkpoint()
            await ctx.checkpoint()
        return 1

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)


async def test_a_shield_cannot_be_entered_twice() -> None:
    ctx = sp.StepContext(run_id="r", flow="f", step="s")
    shield = ctx.shield()
    async with shield:
        with pytest.raises(RuntimeError, match="step 's': a shield\\(\\) block cannot be entered twice"):
            await shield.__aenter__()


async def test_exception_in_a_shield_propagates_and_fails_the_step() -> None:
    flow = sp.Flow("oops")

    @flow.step
    async def commit(ctx: sp.StepContext) -> int:
        async with ctx.shield():
            raise ValueError("disk full")

    with pytest.raises(sp.StepFailed) as info:
        await flow.run()
    assert isinstance(info.value.__cause__, ValueError)


# -- progress ---------------------------------------------------------------------------------------------


async def test_progress_is_in_the_report() -> None:
    flow = sp.Flow("progress")

    @flow.step
    async def load(ctx: sp.StepContext) -> int:
        for i in range(1, 4):
            ctx.progress(i, 3, f"row {i}")
        return 3

    @flow.step
    async def quiet(load: int) -> int:
        return load

    outcome = await flow.run()
    assert outcome.report.steps["load"].progress == sp.Progress(done=3, total=3, message="row 3")
    assert outcome.report.steps["quiet"].progress is None
    assert outcome.report.model_dump()["steps"]["load"]["progress"] == {"done": 3, "total": 3, "message": "row 3"}


def test_progress_rejects_bad_values() -> None:
    ctx = sp.StepContext(run_id="r", flow="f", step="s")
    ctx.progress(1)
    ctx.progress(0.5, None, None)
    with pytest.raises(TypeError, match="step 's': progress\\(done=\\) must be a real number"):
        ctx.progress("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress\\(total=\\)"):
        ctx.progress(1, True)
    with pytest.raises(TypeError, match="progress\\(message=\\)"):
        ctx.progress(1, 2, 3)  # type: ignore[arg-type]
    ctx.progress(fractions.Fraction(1, 2), decimal.Decimal("2.5"), "exact numbers are fine")
    assert ctx._progress == (0.5, 2.5, "exact numbers are fine")
    for bad in (math.nan, math.inf, 10**400):
        with pytest.raises(ValueError, match="progress\\(done=\\) must be finite"):
            ctx.progress(bad)
    assert ctx._progress == (0.5, 2.5, "exact numbers are fine")  # a refused call changes nothing


# -- many senders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["interrupt", "send"])
async def test_ten_thousand_interrupts_from_a_hundred_tasks_make_one_stop(channel: Channel, how: str) -> None:
    """No sender ever blocks (each send finishes within a loop turn), every signal is recorded
    once, and the run stops once, at the step's stopping point."""
    interrupter, receiver = channel
    flow = sp.Flow("storm")
    started, all_sent = anyio.Event(), anyio.Event()
    sent = 0

    @flow.step
    async def target(ctx: sp.StepContext) -> int:
        started.set()
        await all_sent.wait()
        await ctx.checkpoint()
        return 1  # pragma: no cover

    @flow.step
    async def after(target: int) -> int:  # pragma: no cover - never runs
        return target

    async def sender(task: int) -> None:
        nonlocal sent
        await started.wait()
        for i in range(100):
            if how == "interrupt":
                assert interrupter.interrupt(f"{task}/{i}")
            else:
                with anyio.fail_after(5):  # a blocked sender fails here instead of hanging
                    await interrupter.send(sp.InterruptSignal(reason=f"{task}/{i}"))
            sent += 1
            await anyio.lowlevel.checkpoint()
        if sent == 10_000:
            all_sent.set()

    async with anyio.create_task_group() as tg:
        for task in range(100):
            tg.start_soon(sender, task)
        outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    reasons = [s.reason for s in outcome.report.interrupts]
    assert len(reasons) == len(set(reasons)) == 10_000
    assert outcome.signal is outcome.report.interrupts[0]
    assert outcome.report.stopped == ["target"]
    assert outcome.report.not_started == ["after"]


async def test_the_base_strategy_class_is_refused() -> None:
    """`Strategy()` itself would act like FinishCurrent without saying so: run() and interruptible() refuse it."""
    flow = sp.Flow("base")

    @flow.step
    async def one() -> int:  # pragma: no cover - never runs
        return 1

    with pytest.raises(TypeError, match="strategy must be one of AtCheckpoint"):
        await flow.run(strategy=sp.Strategy())
    with pytest.raises(TypeError, match="strategy must be a Strategy instance"):
        sp.interruptible([1], None, strategy=sp.Strategy())


def test_signal_fields_are_strict() -> None:
    """`force="no"` must not quietly become True."""
    with pytest.raises(pydantic.ValidationError):
        sp.InterruptSignal(force="no")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError):
        sp.InterruptSignal(reason=5)  # type: ignore[arg-type]
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver, pytest.raises(pydantic.ValidationError):
        interrupter.interrupt("stop", force="yes")  # type: ignore[arg-type]
    assert sp.InterruptSignal.model_validate_json('{"force": true, "sent_at": "2026-01-01T00:00:00Z"}').force
