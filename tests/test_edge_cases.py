"""Edge cases found in review: escalation meeting the end of a run, cancellation meeting stops,
failures inside included flows, the order PollNextN admits steps in. Each failed before its fix."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stoppoint as sp

from .conftest import FakeSleep, statuses

pytestmark = pytest.mark.anyio


# -- 1. PollNextN: ready steps do not start in declaration order on trio -------------------------------


@pytest.mark.parametrize("n", [1, 2])
async def test_poll_next_n_starts_ready_steps_in_declaration_order(channel: Any, n: int) -> None:
    """The n steps admitted are the first ready ones, whatever order trio runs their tasks in."""
    interrupter, receiver = channel
    for _ in range(20):  # trio picks the order at random; 20 tries make a pass by luck ~impossible
        flow = sp.Flow("fan")
        ran: list[str] = []

        @flow.step
        async def first() -> int:
            return 1

        @flow.step
        async def second(first: int) -> int:  # runs while p..s are ready (spawned, not started)
            interrupter.interrupt()
            return 2

        for name in ["p", "q", "r", "s"]:

            async def branch(first: int, _name: str = name, _ran: list[str] = ran) -> str:
                _ran.append(_name)
                return _name

            flow.step(name=name)(branch)

        await flow.run(interrupts=receiver, strategy=sp.PollNextN(n))
        assert sorted(ran) == ["p", "q", "r", "s"][:n]  # admitted ones run concurrently, in any order


# -- 2. escalation after the run went idle marks a graceful stop forced ------------------------------------


@pytest.mark.parametrize("yield_due", [False, True])
async def test_grace_running_out_as_the_last_step_stops_does_not_force(
    channel: Any, fake_sleep: FakeSleep, monkeypatch: pytest.MonkeyPatch, yield_due: bool
) -> None:
    """The grace timer wakes in the loop turn in which the last step stops at a checkpoint: the
    run stopped gracefully, so the outcome is not forced. Also when the step took long enough
    for its worker to owe the loop a yield (`yield_due`): with no step left to start, the worker
    does not yield, so the timer finds the run idle."""
    if yield_due:
        monkeypatch.setattr("stoppoint._executor.YIELD_INTERVAL", 0.0)
    interrupter, receiver = channel
    flow = sp.Flow("f")

    @flow.step
    async def a(ctx: sp.StepContext) -> int:
        interrupter.interrupt("stop")
        await fake_sleep.entered.wait()
        fake_sleep.released.set()  # grace runs out now ...
        await ctx.checkpoint()  # ... and the step stops here, with no await in between
        return 1

    @flow.step
    async def b(a: int) -> int:
        return 2

    outcome = await flow.run(interrupts=receiver, grace=5)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["a"]
    assert outcome.report.cancelled == []
    assert outcome.forced is False


async def test_forced_interrupt_after_every_step_ended_changes_nothing(fake_sleep: FakeSleep) -> None:
    """Every step has ended (stopped gracefully): a forced interrupt arriving while the task group
    waits for the cancelled deadline timer does not make the outcome forced."""
    flow = sp.Flow("f")
    stopping = anyio.Event()
    handles: list[sp.FlowRun] = []
    go = anyio.Event()

    @flow.step
    async def a(ctx: sp.StepContext) -> int:
        await go.wait()
        handles[0].interrupt("stop")
        stopping.set()
        await ctx.checkpoint()  # stops here
        return 1

    @flow.step
    async def b(a: int) -> int:
        return 2

    accepted: list[bool] = []

    async def force_later() -> None:
        await stopping.wait()  # runs once `a` has stopped: no step is left
        accepted.append(handles[0].interrupt("now", force=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(force_later)
        handles.append(await flow.start(tg, deadline=100))
        go.set()
        outcome = await handles[0].outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["a"]
    assert outcome.forced is False, accepted


# -- 3. task group cancelled after a graceful signal: not reported as forced --------------------------------


async def test_cancelled_task_group_after_a_graceful_signal_is_forced() -> None:
    """A task group cancelled after a graceful signal: outcome() is Interrupted(forced=True) with
    that first signal, as without one (test_handle.py::test_no_step_starts_after_the_task_group_is_cancelled)."""
    flow = sp.Flow("f")
    shielded, release = anyio.Event(), anyio.Event()

    @flow.step
    async def first(ctx: sp.StepContext) -> int:
        async with ctx.shield():
            shielded.set()
            await release.wait()
        return 1

    @flow.step
    async def second(first: int) -> int:
        return 2

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, strategy=sp.FinishCurrent())
        await shielded.wait()
        assert handle.interrupt("please")
        tg.cancel_scope.cancel()
        release.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.reason == "please"
    assert outcome.forced is True


async def test_stop_and_cancellation_in_a_step_task_group_same_on_both_backends() -> None:
    """A graceful interrupt and the task group's cancellation land together while the step's own
    task group has a child at a stopping point and a blocked one: CANCELLED and forced on both
    backends (asyncio's task group drops the cancellation from the group it raises; trio's keeps it)."""
    flow = sp.Flow("f")
    wake, ready = anyio.Event(), anyio.Event()

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        async def at_checkpoint() -> None:
            await wake.wait()
            await ctx.checkpoint()

        async with anyio.create_task_group() as inner:
            inner.start_soon(at_checkpoint)
            inner.start_soon(anyio.sleep_forever)
            ready.set()

    @flow.step
    async def after(work: None) -> None: ...

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg)
        await ready.wait()
        await anyio.wait_all_tasks_blocked()
        wake.set()
        handle.interrupt("stop")
        tg.cancel_scope.cancel()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert (statuses(outcome.report)["work"], outcome.forced) == (sp.StepStatus.CANCELLED, True)


# -- 4. an inner step's failure is lost when the include step is then cancelled ------------------------------


def two_branches(name: str, entered: list[str]) -> sp.Flow:
    flow = sp.Flow(name)

    @flow.step
    async def bad() -> None:
        entered.append("bad")
        try:
            await anyio.sleep_forever()
        finally:
            raise ValueError("cleanup failed")

    @flow.step
    async def other() -> None:
        entered.append("other")
        await anyio.sleep_forever()

    return flow


async def test_failure_during_escalation_is_raised_at_top_level_control(channel: Any) -> None:
    """At the top level, a failure during the force wins over it: StepFailed."""
    interrupter, receiver = channel
    entered: list[str] = []
    flow = two_branches("top", entered)

    async def force() -> None:
        await anyio.wait_all_tasks_blocked()
        assert sorted(entered) == ["bad", "other"]
        interrupter.interrupt("now", force=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(force)
        with pytest.raises(sp.StepFailed):
            await flow.run(interrupts=receiver)


async def test_failure_during_escalation_inside_an_include_is_raised(channel: Any) -> None:
    """Same flow included: the inner failure is raised as StepFailed, not hidden by the force."""
    interrupter, receiver = channel
    entered: list[str] = []
    outer = sp.Flow("outer")
    outer.include(two_branches("inner", entered))

    async def force() -> None:
        await anyio.wait_all_tasks_blocked()
        assert sorted(entered) == ["bad", "other"]
        interrupter.interrupt("now", force=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(force)
        with pytest.raises(sp.StepFailed) as info:
            await outer.run(interrupts=receiver)
    assert info.value.step == "inner"


async def test_nested_failure_is_not_hidden_by_a_later_cancellation() -> None:
    """Nested twin of tests/test_handle.py::test_a_failure_is_not_hidden_by_a_later_cancellation."""
    inner = sp.Flow("inner")
    shielded, release = anyio.Event(), anyio.Event()

    @inner.step
    async def slow(ctx: sp.StepContext) -> None:
        async with ctx.shield():
            shielded.set()
            await release.wait()
        await anyio.lowlevel.checkpoint()

    @inner.step
    async def boom() -> None:
        await shielded.wait()
        raise ValueError("boom")

    outer = sp.Flow("outer")
    outer.include(inner)
    async with anyio.create_task_group() as tg:
        handle = await outer.start(tg)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
        release.set()
    with pytest.raises(sp.StepFailed) as info:
        await handle.outcome()
    assert info.value.step == "inner"
    assert isinstance(info.value.__cause__, sp.StepFailed)


# -- 5. a forced include step ends INTERRUPTED with stopped_at=None ----------------------------------------


async def test_forced_include_step_is_cancelled_not_interrupted() -> None:
    """README: the include step ends INTERRUPTED when the inner run stopped at a stopping point
    (stopped_at is the inner step's), CANCELLED when it was forced."""
    inner = sp.Flow("inner")
    shielded, release = anyio.Event(), anyio.Event()

    @inner.step
    async def i1(ctx: sp.StepContext) -> int:
        async with ctx.shield():
            shielded.set()
            await release.wait()
        return 1

    @inner.step
    async def i2(i1: int) -> int:
        return 2

    outer = sp.Flow("outer")
    outer.include(inner)
    async with anyio.create_task_group() as tg:
        handle = await outer.start(tg)
        await shielded.wait()
        handle.interrupt("now", force=True)
        release.set()
    outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    step = outcome.report.steps["inner"]
    assert statuses(step.nested) == {"i1": sp.StepStatus.COMPLETED, "i2": sp.StepStatus.NOT_STARTED}
    assert (step.status, step.stopped_at) == (sp.StepStatus.CANCELLED, None)


# -- 6. a failed include() freezes the other flow anyway -----------------------------------------------------


def test_failed_include_leaves_the_other_flow_open() -> None:
    inner = sp.Flow("inner")

    @inner.step
    async def a(sub: int) -> int:
        return sub

    outer = sp.Flow("outer")
    with pytest.raises(sp.FlowDefinitionError, match="like the include step"):
        outer.include(inner, name="sub")

    @inner.step  # the refused include did not freeze `inner`
    async def b(a: int) -> int:
        return a


# -- PollNextN on random graphs ---------------------------------------------------------------------------


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[list[int]], int, int, int | None, list[int]]:
    """A random DAG (each step waits for some earlier ones), the step that interrupts, n, a
    concurrency limit, and how many loop turns each step takes."""
    size = draw(st.integers(2, 9))
    deps = [draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else [] for i in range(size)]
    interrupting = draw(st.integers(0, size - 1))
    n = draw(st.integers(0, size))
    limit = draw(st.one_of(st.none(), st.integers(1, 4)))
    turns = draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
    return deps, interrupting, n, limit, turns


@settings(max_examples=60, deadline=None)
@given(case=graphs())
async def test_poll_next_n_on_random_graphs(case: tuple[list[list[int]], int, int, int | None, list[int]]) -> None:
    """At most n steps start after the interrupt; fewer only if nothing else could start, in which
    case every step ran; steps running when it came always finish."""
    deps, interrupting, n, limit, turns = case
    interrupter, receiver = sp.interrupt_channel()
    started: list[int] = []
    signalled_at: list[int] = []
    flow = sp.Flow("random", max_concurrency=limit)
    for i, waits in enumerate(deps):

        async def step(_i: int = i) -> int:
            started.append(_i)
            if _i == interrupting:
                signalled_at.append(len(started))
                interrupter.interrupt()
            for _ in range(turns[_i]):
                await anyio.lowlevel.checkpoint()
            return _i

        flow.step(name=f"s{i}", after=tuple(f"s{d}" for d in waits))(step)
    with interrupter, receiver:
        outcome = await flow.run(interrupts=receiver, strategy=sp.PollNextN(n))
    report = outcome.report
    assert report.cancelled == report.stopped == report.failed == []  # running steps finish
    if not signalled_at:  # the interrupting step never started: nothing else could have stopped
        pytest.fail("the interrupting step did not run")
    after = len(started) - signalled_at[0]
    assert after <= n
    if after < n:
        assert isinstance(outcome, sp.Completed)
        assert sorted(started) == list(range(len(deps)))
