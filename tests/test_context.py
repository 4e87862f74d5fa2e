"""StepContext outside and inside a run (API.md §5)."""

from __future__ import annotations

import collections.abc
import inspect
from collections.abc import Awaitable, Generator
from typing import Any

import anyio
import pytest
import structlog

import stoppoint as sp
from tests.conftest import Channel

pytestmark = pytest.mark.anyio


async def test_hand_made_context_never_stops() -> None:
    ctx = sp.StepContext(run_id="r1", flow="deploy", step="upload")
    assert (ctx.run_id, ctx.flow, ctx.step) == ("r1", "deploy", "upload")
    assert "upload" in repr(ctx)
    for _ in range(1000):
        await ctx.checkpoint()
    assert ctx.stop_requested is False
    assert [x async for x in ctx.iterate("abc")] == ["a", "b", "c"]


async def test_log_is_bound_with_run_flow_and_step() -> None:
    ctx = sp.StepContext(run_id="r1", flow="deploy", step="upload")
    with structlog.testing.capture_logs() as logs:
        ctx.log.info("part.done", part=2)
    assert logs == [
        {"event": "part.done", "part": 2, "run_id": "r1", "flow": "deploy", "step": "upload", "log_level": "info"}
    ]


async def test_context_names_inside_a_run() -> None:
    flow = sp.Flow("names")
    seen: list[tuple[str, str, str]] = []

    @flow.step
    async def only(ctx: sp.StepContext) -> None:
        seen.append((ctx.run_id, ctx.flow, ctx.step))

    outcome = await flow.run(run_id="run-7")
    assert isinstance(outcome, sp.Completed)
    assert seen == [("run-7", "names", "only")]


async def test_iterate_stopped_at_points_to_the_users_loop(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("loop")
    lines: list[int] = []

    @flow.step
    async def loop(ctx: sp.StepContext) -> None:
        frame = inspect.currentframe()
        assert frame is not None
        lines.append(frame.f_lineno + 1)
        async for item in ctx.iterate(range(5)):
            if item == 1:
                interrupter.interrupt()

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.steps["loop"].stopped_at == f"test_context.py:{lines[0]}"


async def test_stop_requested_is_a_base_exception_with_a_location(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("raise")
    caught: list[sp.StopRequested] = []

    @flow.step
    async def step(ctx: sp.StepContext) -> None:
        interrupter.interrupt()
        try:
            await ctx.checkpoint()
        except sp.StopRequested as exc:
            caught.append(exc)
            raise

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert not issubclass(sp.StopRequested, Exception)
    assert caught[0].stopped_at == outcome.report.steps["step"].stopped_at
    assert caught[0].stopped_at is not None
    assert caught[0].stopped_at.startswith("test_context.py:")


async def test_iterate_closes_an_abandoned_async_source(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("source")
    closed: list[bool] = []

    async def source() -> object:
        try:
            for i in range(100):
                await anyio.lowlevel.checkpoint()
                yield i
        finally:
            closed.append(True)

    @flow.step
    async def consume(ctx: sp.StepContext) -> None:
        async for item in ctx.iterate(source()):
            if item == 3:
                interrupter.interrupt()

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert closed == [True]


async def test_a_stopping_point_with_nothing_due_allocates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot path: between two clock readings, `await ctx.checkpoint()` builds no object at all
    (no coroutine, no datetime, no string), which tracemalloc's peak shows, inside a real step."""
    import tracemalloc

    monkeypatch.setattr("stoppoint._context.YIELD_INTERVAL", 3600.0)  # no yield to the loop meanwhile
    flow = sp.Flow("hot")
    peaks: list[int] = []

    @flow.step
    async def spin(ctx: sp.StepContext) -> None:
        for _ in range(10_000):  # the stride between clock readings grows to its bound
            await ctx.checkpoint()
        fast = ctx._countdown - 1  # the checkpoints left before the next clock reading
        assert fast > 8
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            left = fast  # small ints are cached: counting down allocates nothing either
            while left:
                await ctx.checkpoint()
                left -= 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peaks.append(peak - before)

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert peaks == [0]


class _Delegating:
    """A plain awaitable wrapper, as timing and tracing helpers write them: it delegates to the
    inner awaitable's `__await__`."""

    def __init__(self, inner: Awaitable[None]) -> None:
        self.inner = inner

    def __await__(self) -> Generator[Any, None, None]:
        return (yield from self.inner.__await__())


async def test_a_checkpoint_with_nothing_due_is_still_an_awaitable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`checkpoint()` returns an `Awaitable` (with `__await__`, not a coroutine) also on its fast
    path, so wrappers that delegate to `__await__()` work whether or not a yield is due."""
    monkeypatch.setattr("stoppoint._context.YIELD_INTERVAL", 3600.0)  # no yield due: the fast path
    flow = sp.Flow("awaitable")
    seen: list[bool] = []

    @flow.step
    async def spin(ctx: sp.StepContext) -> int:
        for _ in range(5):
            awaitable = ctx.checkpoint()
            seen.append(isinstance(awaitable, collections.abc.Awaitable) and not inspect.iscoroutine(awaitable))
            await _Delegating(awaitable)
        return len(seen)

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 5
    assert seen == [True] * 5
