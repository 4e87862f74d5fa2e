"""Interrupt latency: another task sends a signal -> the flow's `Interrupted` is returned, for a
step that does nothing but `await ctx.checkpoint()` in a tight loop (so it yields to the loop only
once per yield interval)."""

from __future__ import annotations

import importlib.util
import random
import time
from collections.abc import Callable
from typing import Any

import anyio

import stoppoint as sp
from stoppoint._context import YIELD_INTERVAL

from ._measure import Report, percentile

BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("asyncio", "asyncio", {}),
    ("asyncio+uvloop", "asyncio", {"use_uvloop": True}),
    ("trio", "trio", {}),
]


async def _samples(count: int, plain_stream: bool) -> tuple[list[float], list[float]]:
    """(from the send call, from the moment the sender was due to wake) for `count` runs."""
    spinning = anyio.Event()
    flow = sp.Flow("spin")

    @flow.step()
    async def spin(ctx: sp.StepContext) -> None:
        spinning.set()
        while True:
            await ctx.checkpoint()

    rng = random.Random(5)  # the same send moments every run
    from_send, from_due = [], []
    for _ in range(count):
        spinning = anyio.Event()
        interrupt: Callable[[], object]
        if plain_stream:
            send, receive = anyio.create_memory_object_stream[sp.InterruptSignal](1)
            signal = sp.InterruptSignal(reason="bench", source="bench")

            def interrupt(send: Any = send, signal: sp.InterruptSignal = signal) -> None:
                send.send_nowait(signal)

        else:
            interrupter, receive = sp.interrupt_channel()
            interrupt = interrupter.interrupt
        async with anyio.create_task_group() as tg:
            run = await flow.start(tg, interrupts=receive)
            await spinning.wait()
            # A random moment within two yield intervals, so the send falls anywhere in the
            # step's time slice.
            delay = rng.uniform(0, 2 * YIELD_INTERVAL)
            due = time.perf_counter() + delay
            await anyio.sleep(delay)
            sent = time.perf_counter()
            interrupt()
            outcome = await run.outcome()
            end = time.perf_counter()
        assert isinstance(outcome, sp.Interrupted), outcome
        from_send.append(end - sent)
        from_due.append(end - max(due, 0.0))
    return from_send, from_due


def measure(report: Report, count: int) -> None:
    section = report.section(
        f"Interrupt latency: send -> Interrupted returned ({count} runs each; yield interval "
        f"{YIELD_INTERVAL * 1e3:g} ms)"
    )
    limit = YIELD_INTERVAL + 0.0005
    for label, backend, options in BACKENDS:
        if options.get("use_uvloop") and importlib.util.find_spec("uvloop") is None:
            section.add(f"{label}: skipped", 0.0, note="uvloop is not installed (pip install -e '.[bench]')")
            report.target(f"latency p99 <= yield interval + 0.5 ms ({label})", None, None, why="uvloop not installed")
            continue
        for plain, kind in [(False, "interrupt_channel()"), (True, "plain anyio stream")]:
            from_send, from_due = anyio.run(_samples, count, plain, backend=backend, backend_options=options)
            p99 = percentile(from_send, 99)
            section.add(f"{label}, {kind}: from the send", percentile(from_send, 50), p99=p99)
            section.add(
                f"{label}, {kind}: from when the sender was due",
                percentile(from_due, 50),
                p99=percentile(from_due, 99),
                note="includes the wait for the step to yield",
            )
            report.target(f"latency p99 <= yield interval + 0.5 ms ({label}, {kind})", p99, limit, unit="s")
