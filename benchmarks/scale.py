"""Scale: many flows parked at once (time and memory per flow), and how time grows with the
number of steps of a chain and with the number of concurrent flows."""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel

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


async def measure(report: Report, flows: int, step_sizes: list[int], flow_counts: list[int], repeats: int) -> None:
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
            f"{label}: memory per flow",
            held / flows,
            unit="bytes",
            baseline=base and base + ": memory per flow",
            note="includes the channel's own anyio memory stream" if kind == "channel" else "",
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

    chains = {size: chain(size) for size in step_sizes}
    await _scaling(
        report,
        "steps of a chain",
        "steps",
        step_sizes,
        chains,
        lambda flow, size: run_completed(flow),
        repeats,
    )

    async def two_steps(ctx: sp.StepContext) -> None:
        await ctx.checkpoint()

    small_flow = chain(2, two_steps, name="small")

    async def concurrent_flows(flow: sp.Flow, count: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(run_completed, flow)

    async def concurrent_tasks(flow: sp.Flow, count: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(_two_checkpoints)

    await _scaling(
        report,
        "concurrent flows (2-step chains, a checkpoint each)",
        "flows",
        flow_counts,
        dict.fromkeys(flow_counts, small_flow),
        concurrent_flows,
        repeats,
        floor=("anyio tasks doing two loop yields each", "tasks", concurrent_tasks),
    )


async def _two_checkpoints() -> None:
    await anyio.lowlevel.checkpoint()
    await anyio.lowlevel.checkpoint()


async def _once(body: Callable[[sp.Flow, int], Awaitable[None]], flow: sp.Flow, size: int, collect: bool) -> float:
    """Seconds of one `await body(flow, size)`, with the collector on (`collect`) or paused."""
    gc.collect()
    if not collect:
        gc.disable()
    try:
        t0 = time.perf_counter()
        await body(flow, size)
        return time.perf_counter() - t0
    finally:
        gc.enable()


async def _scaling(
    report: Report,
    what: str,
    unit: str,
    sizes: list[int],
    flows: dict[int, sp.Flow],
    run: Callable[[sp.Flow, int], Awaitable[None]],
    repeats: int,
    floor: tuple[str, str, Callable[[sp.Flow, int], Awaitable[None]]] | None = None,
) -> None:
    """Time `run(flow, size)` per size, with the collector on and paused; the target compares
    the two largest sizes with the collector on (what users get)."""
    section = report.section(f"Scale: time against the number of {what} (median of {repeats})")
    for flow in set(flows.values()):
        await run(flow, 1)  # the first run of a flow plans it (a topological sort): not timed
    kinds: list[tuple[str, str, Callable[[sp.Flow, int], Awaitable[None]]]] = [("", unit, run)]
    if floor is not None:
        kinds.append(floor)
    # Every round times each case once, in turn, so that the machine's drift affects all alike.
    cases = [
        (label, noun, body, collect, size) for label, noun, body in kinds for collect in (True, False) for size in sizes
    ]
    samples: dict[tuple[str, bool, int], list[float]] = {(c[0], c[3], c[4]): [] for c in cases}
    for _ in range(repeats):
        for label, _noun, body, collect, size in cases:
            samples[(label, collect, size)].append(await _once(body, flows[size], size, collect))
    times = {key: statistics.median(values) for key, values in samples.items()}
    previous: str | None = None
    for label, noun, _body, collect, size in cases:
        name = f"{size:,} {noun}" + (f" ({label})" if label else "") + ("" if collect else ", collector paused")
        section.add(name, times[(label, collect, size)], baseline=previous if size != sizes[0] else None)
        previous = name
    if len(sizes) > 1:
        big, small = sizes[-1], sizes[-2]
        limit = big / small * 1.2
        ratio = times[("", True, big)] / times[("", True, small)]
        why = f"(collector paused: {times[('', False, big)] / times[('', False, small)]:.2f}x"
        if floor is not None:
            label = floor[0]
            why += f"; {label}: {times[(label, True, big)] / times[(label, True, small)]:.2f}x"
        report.target(
            f"{big:,} {unit} <= {limit:g}x the {small:,}-{unit.rstrip('s')} time", ratio, limit, why=why + ")"
        )
