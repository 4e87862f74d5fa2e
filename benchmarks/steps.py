"""What a step costs: a long linear chain, and a wide fan-out, against the same bodies run bare."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

import stoppoint as sp

from ._measure import Report, per_item


async def trivial() -> None:
    pass


async def trivial_step(ctx: sp.StepContext) -> None:
    pass


def chain(steps: int, body: Callable[..., Awaitable[None]] = trivial_step, name: str = "chain") -> sp.Flow:
    """`steps` steps, each after the one before."""
    flow = sp.Flow(name)
    previous: tuple[str, ...] = ()
    for i in range(steps):
        flow.step(name=f"s{i}", after=previous)(body)
        previous = (f"s{i}",)
    return flow


def fan_out(width: int, body: Callable[..., Awaitable[None]] = trivial_step) -> sp.Flow:
    """`width` independent steps: all start at once."""
    flow = sp.Flow("fan-out")
    for i in range(width):
        flow.step(name=f"s{i}")(body)
    return flow


async def run_completed(flow: sp.Flow) -> None:
    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed), outcome


async def measure(report: Report, steps: int, width: int, repeats: int) -> None:
    section = report.section(f"Per step: a {steps:,}-step chain (median of {repeats})")
    with_ctx, bare = chain(steps, trivial_step), chain(steps, trivial)

    async def plain_loop(n: int) -> None:
        for _ in range(n):
            await trivial()

    async def task_per_body(n: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(trivial)

    async def task_group_per_body(n: int) -> None:
        for _ in range(n):
            async with anyio.create_task_group() as tg:
                tg.start_soon(trivial)

    async def flow_with_ctx(n: int) -> None:
        await run_completed(with_ctx)

    async def flow_bare(n: int) -> None:
        await run_completed(bare)

    spawn = "spawn one anyio task per body"
    times = await per_item(
        {
            "plain loop awaiting the bodies": plain_loop,
            spawn: task_per_body,
            "a task group and a task per body": task_group_per_body,
            "chain, steps take ctx": flow_with_ctx,
            "chain, steps take nothing": flow_bare,
        },
        steps,
        repeats,
    )
    for name, seconds in times.items():
        section.add(name, seconds, baseline=None if name in (spawn, "plain loop awaiting the bodies") else spawn)
    plain = section.get("plain loop awaiting the bodies").value
    section.add(
        "overhead per step (chain with ctx - plain loop)",
        section.get("chain, steps take ctx").value - plain,
        baseline=spawn,
    )
    report.target(
        "chain: overhead per step <= 0.15x spawning an anyio task",
        section.get("overhead per step (chain with ctx - plain loop)").ratio,
        0.15,
    )

    section = report.section(f"Per step: a {width:,}-wide fan-out (median of {repeats})")
    wide_ctx, wide_bare = fan_out(width, trivial_step), fan_out(width, trivial)
    dummy = sp.StepContext(run_id="r", flow="f", step="s")

    async def task_group_spawning(n: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(trivial_step, dummy)

    async def fan_out_ctx(n: int) -> None:
        await run_completed(wide_ctx)

    async def fan_out_bare(n: int) -> None:
        await run_completed(wide_bare)

    group = "a task group spawning the same coroutines"
    times = await per_item(
        {
            group: task_group_spawning,
            "fan-out, steps take ctx": fan_out_ctx,
            "fan-out, steps take nothing": fan_out_bare,
        },
        width,
        repeats,
    )
    for name, seconds in times.items():
        section.add(name, seconds, baseline=None if name == group else group)
    report.target(
        "fan-out: per step <= 1.5x a task group spawning the same coroutines",
        section.get("fan-out, steps take ctx").ratio,
        1.5,
    )
