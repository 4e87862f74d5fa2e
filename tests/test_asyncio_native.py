"""asyncio-only behaviour, under pytest-asyncio (strict mode), as users of plain asyncio run it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import stoppoint as sp


@pytest_asyncio.fixture
async def channel() -> AsyncIterator[tuple[sp.Interrupter, object]]:
    interrupter, receiver = sp.interrupt_channel()
    async with interrupter:
        with receiver:
            yield interrupter, receiver


@pytest.mark.asyncio
async def test_cancelling_the_asyncio_task_cancels_the_run() -> None:
    flow = sp.Flow("native")
    running = asyncio.Event()
    cleaned: list[str] = []

    @flow.step
    async def work() -> None:
        running.set()
        try:
            await asyncio.Event().wait()  # blocks until cancelled
        finally:
            cleaned.append("finally")

    task = asyncio.create_task(flow.run())
    await running.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally"]


@pytest.mark.asyncio
async def test_interrupt_from_another_asyncio_task(channel: tuple[sp.Interrupter, object]) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("native")
    at_part = asyncio.Event()
    go_on = asyncio.Event()

    @flow.step
    async def upload(ctx: sp.StepContext) -> int:
        for part in range(3):
            await ctx.checkpoint()
            if part == 1:
                at_part.set()
                await go_on.wait()
        return 3

    async def operator() -> None:
        await at_part.wait()
        interrupter.interrupt("operator", source="api")
        go_on.set()

    stopper = asyncio.create_task(operator())
    outcome = await flow.run(interrupts=receiver)  # type: ignore[arg-type]
    await stopper
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["upload"]
    assert outcome.signal.source == "api"


@pytest.mark.asyncio
async def test_cancelled_error_raised_by_a_step_is_a_failure() -> None:
    """A step awaiting a cancelled future raises CancelledError without being cancelled itself:
    that is the step's failure, not a cancellation of the caller."""
    flow = sp.Flow("spurious")

    @flow.step
    async def a() -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    with pytest.raises(sp.StepFailed, match=r"step 'a' of flow 'spurious' failed: CancelledError") as info:
        await flow.run()
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert info.value.report.failed == ["a"]
