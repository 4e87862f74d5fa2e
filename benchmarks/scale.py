"""Scale: many flows parked at once (time and memory per flow), and how time grows with the
number of steps of a chain and with the number of concurrent flows."""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

import stoppoint as sp

from ._measure import Report
from .steps import chain, run_completed


def _parking_flow(gate: list[anyio.Event], parked: Callable[[], None]) -> sp.Flow:
    flow = sp.Flow("parked")

    @flow.step()
    async def park(ctx: sp.StepContext) -> None:
        await ctx.checkpoint()
        parked()
        await gate[0].wait()

    return flow


Starter = Callable[[anyio.Event], Coroutine[Any, Any, None]]


async def _park(count: int, start: Starter, traced: bool) -> tuple[float, float, int]:
    """Start `count` tasks running `start(all_parked)` (each calls `parked()` once waiting);
    returns (seconds until all wait, seconds for all to finish once released, bytes held while
    they wait, as tracemalloc sees them when `traced`)."""
    gc.collect()
    if traced:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0] if traced else 0
        all_parked = anyio.Event()
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(start, all_parked)
            await all_parked.wait()
            t1 = time.perf_counter()
            held = tracemalloc.get_traced_memory()[0] - base if traced else 0
            release[0].set()
        t2 = time.perf_counter()
    finally:
        if traced:
            tracemalloc.stop()
    return t1 - t0, t2 - t1, held


release: list[anyio.Event] = []  # the gate every parked task waits on (set per measurement)


async def _parked(count: int, kind: str, traced: bool) -> tuple[float, float, int]:
    release[:] = [anyio.Event()]
    waiting = 0

    def parked(all_parked: anyio.Event) -> None:
        nonlocal waiting
        waiting += 1
        if waiting == count:
            all_parked.set()

    if kind == "task":

        async def start(all_parked: anyio.Event) -> None:
            parked(all_parked)
            await release[0].wait()

    else:
        holder: list[anyio.Event] = []

        async def start(all_parked: anyio.Event) -> None:
            if not holder:
                holder.append(all_parked)
            if kind == "flow":
                await flow.run()
            else:
                interrupter, receiver = sp.interrupt_channel()
                with interrupter:
                    await flow.run(interrupts=receiver)

        flow = _parking_flow(release, lambda: parked(holder[0]))
    return await _park(count, start, traced)


async def measure(report: Report, flows: int, step_sizes: list[int], flow_counts: list[int]) -> None:
    section = report.section(f"Scale: {flows:,} flows parked inside a step at once")
    idle = "idle anyio task"
    for kind, label in [
        ("task", idle),
        ("flow", "flow.run(), parked in its step"),
        ("channel", "flow.run(interrupts=<its own interrupt_channel()>)"),
    ]:
        start, finish, _ = await _parked(flows, kind, traced=False)
        _, _, held = await _parked(flows, kind, traced=True)
        base = None if kind == "task" else idle
        section.add(
            f"{label}: memory per flow", held / flows, unit="bytes", baseline=base and base + ": memory per flow"
        )
        section.add(
            f"{label}: start and park, per flow", start / flows, baseline=base and base + ": start and park, per flow"
        )
        section.add(f"{label}: release and finish, per flow", finish / flows)
    report.target(
        "memory per parked flow <= 3x an idle anyio task",
        section.get("flow.run(), parked in its step: memory per flow").ratio,
        3,
    )
    report.target(
        "memory per parked flow with its own interrupt channel <= 3x an idle anyio task",
        section.get("flow.run(interrupts=<its own interrupt_channel()>): memory per flow").ratio,
        3,
    )

    section = report.section("Scale: time against the number of steps of a chain")
    times = {}
    for steps in step_sizes:
        flow = chain(steps)
        gc.collect()
        t0 = time.perf_counter()
        await run_completed(flow)
        times[steps] = time.perf_counter() - t0
        smaller = [s for s in step_sizes if s < steps]
        section.add(f"{steps:,} steps", times[steps], baseline=f"{smaller[-1]:,} steps" if smaller else None)
    if len(step_sizes) > 1:
        big, small = step_sizes[-1], step_sizes[-2]
        factor = big // small
        report.target(
            f"{big:,} steps <= {factor * 1.2:g}x the {small:,}-step time",
            times[big] / times[small],
            factor * 1.2,
        )

    section = report.section("Scale: time against the number of concurrent flows (2-step chains, a checkpoint each)")

    async def two_steps(ctx: sp.StepContext) -> None:
        await ctx.checkpoint()

    small_flow = chain(2, two_steps, name="small")
    times = {}
    for count in flow_counts:
        gc.collect()
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(run_completed, small_flow)
        times[count] = time.perf_counter() - t0
        smaller = [c for c in flow_counts if c < count]
        section.add(f"{count:,} flows", times[count], baseline=f"{smaller[-1]:,} flows" if smaller else None)
    if len(flow_counts) > 1:
        big, small = flow_counts[-1], flow_counts[-2]
        factor = big // small
        report.target(
            f"{big:,} flows <= {factor * 1.2:g}x the {small:,}-flow time",
            times[big] / times[small],
            factor * 1.2,
        )
