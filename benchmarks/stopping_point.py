"""What a stopping point costs when nothing is pending, measured inside a running step."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

import stoppoint as sp

from ._measure import Report, per_item


async def _trivial() -> None:
    pass


async def in_step(body: Callable[[sp.StepContext], Awaitable[Any]]) -> Any:
    """`await body(ctx)` inside a one-step flow, with an interrupt channel open (nothing sent):
    the context is the one a real step gets."""
    flow = sp.Flow("bench")

    @flow.step()
    async def measure(ctx: sp.StepContext) -> Any:
        return await body(ctx)

    interrupter, receiver = sp.interrupt_channel()
    with interrupter:
        outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Completed), outcome
    return outcome.value


async def measure(report: Report, n: int, repeats: int) -> None:
    section = report.section(f"Stopping point, nothing pending ({n:,} per run, median of {repeats})")
    send, receive = anyio.create_memory_object_stream[int](1)

    class Holder:
        flag = False

    holder = Holder()

    async def run(ctx: sp.StepContext) -> dict[str, float]:
        async def empty_loop(n: int) -> None:
            for _ in range(n):
                pass

        async def bare_await(n: int) -> None:
            for _ in range(n):
                await _trivial()

        async def checkpoint(n: int) -> None:
            cp = ctx.checkpoint
            for _ in range(n):
                await cp()

        async def receive_nowait(n: int) -> None:
            for _ in range(n):
                try:  # noqa: SIM105 - the try/except round trip is exactly what this baseline measures
                    receive.receive_nowait()
                except anyio.WouldBlock:
                    pass

        async def attribute(n: int) -> None:
            for _ in range(n):
                if holder.flag:
                    break

        async def stop_requested(n: int) -> None:
            for _ in range(n):
                if ctx.stop_requested:
                    break

        async def plain_for(n: int) -> None:
            for _ in range(n):
                pass

        async def async_generator(n: int) -> None:
            async def items() -> AsyncIterator[int]:
                for i in range(n):
                    yield i

            async for _ in items():
                pass

        async def iterate_every_1(n: int) -> None:
            async for _ in ctx.iterate(range(n), every=1):
                pass

        async def iterate_every_1000(n: int) -> None:
            async for _ in ctx.iterate(range(n), every=1000):
                pass

        bodies = {
            "empty loop": empty_loop,
            "bare await of a trivial coroutine": bare_await,
            "await ctx.checkpoint()": checkpoint,
            "receive_nowait() + WouldBlock": receive_nowait,
            "plain attribute read": attribute,
            "ctx.stop_requested": stop_requested,
            "plain for over range(N)": plain_for,
            "async for over an async generator of range(N)": async_generator,
            "ctx.iterate(range(N), every=1)": iterate_every_1,
            "ctx.iterate(range(N), every=1000)": iterate_every_1000,
        }
        return await per_item(bodies, n, repeats)

    with send, receive:
        results = await in_step(run)
    # Each loop's own cost (the `for` and its counter) is subtracted, so the ratios compare the
    # operations themselves.
    loop = results.pop("empty loop")
    section.add("empty loop (subtracted from the rows below)", loop)
    for name in [
        "bare await of a trivial coroutine",
        "await ctx.checkpoint()",
        "receive_nowait() + WouldBlock",
        "plain attribute read",
        "ctx.stop_requested",
    ]:
        section.add(name, max(results[name] - loop, 1e-12), baseline="bare await of a trivial coroutine")
    for name in [
        "plain for over range(N)",
        "async for over an async generator of range(N)",
        "ctx.iterate(range(N), every=1)",
        "ctx.iterate(range(N), every=1000)",
    ]:
        section.add(name, results[name], baseline="plain for over range(N)", note="per item, loop included")

    checkpoint = section.get("await ctx.checkpoint()")
    report.target("stopping point <= 1.5x a bare trivial await", checkpoint.ratio, 1.5)
    report.target(
        "stopping point < one receive_nowait()+WouldBlock",
        checkpoint.value / section.get("receive_nowait() + WouldBlock").value,
        0.999,
    )
