"""Edge cases found in review: leaks, exception shapes, cleanup, broadcast before runs start."""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import stoppoint as sp
from tests.conftest import Channel

pytestmark = pytest.mark.anyio


async def test_stop_and_caller_cancellation_together_leak_no_group(channel: Channel) -> None:
    """A step's own task group ends with both a stop and the caller's cancellation inside it."""
    interrupter, receiver = channel
    flow = sp.Flow("both")
    caller = anyio.CancelScope()

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        interrupter.interrupt()
        caller.cancel()

        async def child() -> None:
            await ctx.checkpoint()  # raises StopRequested before any await

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            await anyio.sleep_forever()  # cancelled by the caller

    outcomes: list[object] = []
    with caller:
        # Either the run ends Interrupted before the cancellation is delivered, or it raises a
        # plain cancellation the caller's scope absorbs; never a group mixing both.
        outcomes.append(await flow.run(interrupts=receiver))
    assert caller.cancelled_caught or (
        len(outcomes) == 1 and isinstance(outcomes[0], sp.Interrupted) and outcomes[0].report.stopped == ["work"]
    )


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("shape", ["chain", "fan-out"])
async def test_base_exceptions_leave_run_as_themselves(exc_type: type[BaseException], shape: str) -> None:
    flow = sp.Flow("fatal")
    sibling_done: list[str] = []

    @flow.step
    async def first() -> int:
        return 1

    if shape == "fan-out":

        @flow.step
        async def sibling(first: int) -> None:
            try:
                await anyio.sleep_forever()
            finally:
                sibling_done.append("cancelled")

    @flow.step
    async def boom(first: int) -> None:
        await anyio.lowlevel.checkpoint()
        raise exc_type("bye")

    with pytest.raises(exc_type, match="bye"):
        await flow.run()
    if shape == "fan-out":
        assert sibling_done == ["cancelled"]


async def test_signal_sent_before_runs_start_reaches_every_clone(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("early")

    @flow.step
    async def a() -> None: ...

    clones = [receiver.clone(), receiver.clone(), receiver.clone()]
    assert interrupter.interrupt("before anyone listens")
    outcomes: list[Any] = []

    async def run(rx: Any) -> None:
        with rx:
            outcomes.append(await flow.run(interrupts=rx))

    async with anyio.create_task_group() as tg:
        for clone in clones:
            tg.start_soon(run, clone)
    assert [type(o).__name__ for o in outcomes] == ["Interrupted"] * 3
    # The original receiver got its own copy too; a clone made afterwards did not.
    assert receiver.receive_nowait().reason == "before anyone listens"
    with receiver.clone() as late, pytest.raises(anyio.WouldBlock):
        late.receive_nowait()


async def test_clone_after_every_interrupter_closed_sees_the_end(channel: Channel) -> None:
    interrupter, receiver = channel
    interrupter.close()
    with receiver.clone() as late, pytest.raises(anyio.EndOfStream):
        late.receive_nowait()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_stop_inside_an_iterate_body_closes_the_generator(kind: str, channel: Channel) -> None:
    interrupter, receiver = channel
    closed: list[str] = []

    def sync_source() -> Any:
        try:
            yield from range(100)
        finally:
            closed.append("sync")

    async def async_source() -> Any:
        try:
            for i in range(100):
                await anyio.lowlevel.checkpoint()
                yield i
        finally:
            closed.append("async")

    flow = sp.Flow("loop")

    @flow.step
    async def loop(ctx: sp.StepContext) -> None:
        source = sync_source() if kind == "sync" else async_source()
        async for item in ctx.iterate(source):
            if item == 3:
                interrupter.interrupt()
                await ctx.checkpoint()  # the stop comes from the loop body, not from iterate()

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert closed == [kind]  # closed before run() returned, not at garbage collection


async def test_a_step_that_completes_leaves_its_generator_alone() -> None:
    flow = sp.Flow("break")
    source_state: list[str] = []

    def numbers() -> Any:
        try:
            yield from range(10)
        finally:
            source_state.append("closed")

    gen = numbers()

    @flow.step
    async def take_three(ctx: sp.StepContext) -> list[int]:
        taken = []
        async for item in ctx.iterate(gen):
            taken.append(item)
            if len(taken) == 3:
                break
        return taken

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == [0, 1, 2]
    assert source_state == []  # still the caller's to use
    assert next(gen) == 3
    gen.close()


async def test_completed_keeps_no_intermediate_output_alive() -> None:
    class Big:
        pass

    refs: list[weakref.ref[Big]] = []
    flow = sp.Flow("memory")

    @flow.step
    async def load() -> Big:
        big = Big()
        refs.append(weakref.ref(big))
        return big

    @flow.step
    async def summarize(load: Big) -> str:
        return "summary"

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    gc.collect()
    assert refs[0]() is None
    assert outcome.report.completed == ["load", "summarize"]  # the report is still there


async def test_checkpoint_yields_within_the_stride_bound_when_iterations_slow_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After many cheap checkpoints the clock is read rarely; once iterations turn slow, a yield
    must still come within the stride bound (32 checkpoints), not after hundreds."""
    interval = 1e-4
    monkeypatch.setattr("stoppoint._context.YIELD_INTERVAL", interval)
    yields: list[int] = []
    slow_iteration = [0]

    async def counting_yield() -> None:
        yields.append(slow_iteration[0])
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr("stoppoint._context._loop_yield", counting_yield)
    ctx = sp.StepContext(run_id="r", flow="f", step="s")
    for _ in range(20_000):  # cheap: the stride grows to its bound
        await ctx.checkpoint()
    yields.clear()
    for i in range(1, 40):
        slow_iteration[0] = i
        deadline = time.perf_counter() + 2 * interval
        while time.perf_counter() < deadline:  # burn CPU: no sleeping
            pass
        await ctx.checkpoint()
    assert yields
    assert yields[0] <= 32  # the countdown never exceeds the stride bound


async def test_unfinished_generators_close_innermost_first_and_all_of_them(channel: Channel) -> None:
    interrupter, receiver = channel
    log: list[str] = []

    def source(name: str, fail: bool = False) -> Any:
        try:
            yield from range(100)
        finally:
            log.append(f"{name} closed")
            if fail:
                raise ValueError(f"{name} cleanup failed")

    flow = sp.Flow("nested")

    @flow.step
    async def loops(ctx: sp.StepContext) -> None:
        async for _ in ctx.iterate(source("outer", fail=True)):
            async for item in ctx.iterate(source("inner")):
                if item == 2:
                    interrupter.interrupt()
                    await ctx.checkpoint()

    with pytest.raises(sp.StepFailed, match=r"ValueError: outer cleanup failed") as info:
        await flow.run(interrupts=receiver)
    assert log == ["inner closed", "outer closed"]
    assert info.value.report.steps["loops"].stopped_at is None


async def test_a_checkpoint_in_a_generators_finally_does_not_leak(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("finally")
    ctx_holder: list[sp.StepContext] = []

    async def source() -> Any:
        try:
            for i in range(100):
                yield i
        finally:
            await ctx_holder[0].checkpoint()  # raises StopRequested: the step is stopping already

    @flow.step
    async def loop(ctx: sp.StepContext) -> None:
        ctx_holder.append(ctx)
        async for item in ctx.iterate(source()):
            if item == 1:
                interrupter.interrupt()
                await ctx.checkpoint()

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["loop"]


async def test_cleanup_of_a_cancelled_step_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sibling fails, the step is cancelled, and its generator's finally never returns: the
    shielded cleanup gives up after CLEANUP_TIMEOUT instead of holding the run for ever."""
    monkeypatch.setattr("stoppoint._endings.CLEANUP_TIMEOUT", 0.01)
    flow = sp.Flow("stuck")
    looping = anyio.Event()
    log: list[str] = []

    async def source() -> Any:
        try:
            for i in range(10**6):
                await anyio.lowlevel.checkpoint()
                yield i
        finally:
            log.append("cleanup started")
            await anyio.sleep_forever()

    @flow.step
    async def loop(ctx: sp.StepContext) -> None:
        async for _ in ctx.iterate(source()):
            looping.set()

    @flow.step
    async def broken() -> None:
        await looping.wait()
        raise RuntimeError("sibling failed")

    with pytest.raises(sp.StepFailed, match="sibling failed") as info:
        await flow.run()
    assert log == ["cleanup started"]
    assert info.value.report.steps["loop"].status is sp.StepStatus.CANCELLED
