"""Hot-path benchmarks, each as a ratio against a baseline measured in the same run.

    python -m benchmarks            # full run (about half a minute)
    python -m benchmarks --quick    # smoke run for CI (seconds; timings are not asserted)

Absolute times on shared machines are noisy; the ratios are what the targets use. Targets from
issue 5 (Performance) are printed as met / not met.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

import stoppoint as sp


async def _trivial() -> None:
    pass


async def _per_call(body: Callable[[int], Awaitable[None]], n: int, repeats: int) -> float:
    """Median seconds per call of a loop of n calls, over `repeats` runs."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await body(n)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


async def stopping_point(n: int, repeats: int) -> dict[str, float]:
    ctx = sp.StepContext(run_id="bench", flow="bench", step="bench")
    send, receive = anyio.create_memory_object_stream[int](1)

    class Holder:
        flag = False

    holder = Holder()

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

    async def empty_loop(n: int) -> None:
        for _ in range(n):
            pass

    results = {}
    with send, receive:
        for name, body in [
            ("empty loop", empty_loop),
            ("bare await of a trivial coroutine", bare_await),
            ("await ctx.checkpoint()", checkpoint),
            ("receive_nowait() + WouldBlock", receive_nowait),
            ("plain attribute read", attribute),
            ("ctx.stop_requested", stop_requested),
        ]:
            results[name] = await _per_call(body, n, repeats)
    return results


async def _trivial_step(ctx: sp.StepContext) -> None:
    pass


def _chain(steps: int, body: Callable[..., Awaitable[None]]) -> sp.Flow:
    flow = sp.Flow("chain")
    previous: tuple[str, ...] = ()
    for i in range(steps):
        flow.step(name=f"s{i}", after=previous)(body)
        previous = (f"s{i}",)
    return flow


async def linear_flow(steps: int, repeats: int) -> dict[str, float]:
    bare = _chain(steps, _trivial)
    with_ctx = _chain(steps, _trivial_step)

    async def run_flow(n: int) -> None:
        outcome = await with_ctx.run()
        assert isinstance(outcome, sp.Completed)

    async def run_bare_flow(n: int) -> None:
        outcome = await bare.run()
        assert isinstance(outcome, sp.Completed)

    async def plain_loop(n: int) -> None:
        for _ in range(n):
            await _trivial()

    async def spawn_each(n: int) -> None:
        for _ in range(n):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_trivial)

    async def spawn_all(n: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(_trivial)

    return {
        "plain loop of the step bodies": await _per_call(plain_loop, steps, repeats),
        "linear flow, per step (steps take ctx)": await _per_call(run_flow, steps, repeats),
        "linear flow, per step (steps take nothing)": await _per_call(run_bare_flow, steps, repeats),
        "spawn one anyio task per body (all in one group)": await _per_call(spawn_all, steps, repeats),
        "one task group + task per body": await _per_call(spawn_each, steps, repeats),
    }


async def persisted_flow(steps: int, repeats: int) -> dict[str, float]:
    """A chain saved after every step: what durability costs per step (a save writes the whole
    checkpoint and report, so it grows with the number of steps)."""
    flow = _chain(steps, _trivial_step)
    with tempfile.TemporaryDirectory() as tmp:
        runs = 0

        async def with_store(make: Callable[[], Any]) -> Callable[[int], Awaitable[None]]:
            async def run(n: int) -> None:
                nonlocal runs
                runs += 1
                async with contextlib.AsyncExitStack() as stack:
                    store = make()
                    if isinstance(store, sp.SQLiteStore):
                        await stack.enter_async_context(store)
                    outcome = await flow.run(store=store, run_id=f"run-{runs}")
                    assert isinstance(outcome, sp.Completed)

            return run

        async def no_store(n: int) -> None:
            await flow.run()

        sqlite = await with_store(lambda: sp.SQLiteStore(Path(tmp) / f"{runs}.db"))
        memory = await with_store(sp.MemoryStore)
        return {
            "no store": await _per_call(no_store, steps, repeats),
            "MemoryStore": await _per_call(memory, steps, repeats),
            "SQLiteStore (WAL, synchronous=FULL)": await _per_call(sqlite, steps, repeats),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    n, steps, repeats = (20_000, 1_000, 3) if args.quick else (1_000_000, 10_000, 7)

    sp_results = anyio.run(stopping_point, n, repeats, backend=args.backend)
    flow_results = anyio.run(linear_flow, steps, repeats, backend=args.backend)
    persisted = anyio.run(persisted_flow, 20, repeats, backend=args.backend)

    print(f"backend: {args.backend}; {n:,} stopping points, {steps:,}-step chain; medians of {repeats}")
    print()
    floor = sp_results["bare await of a trivial coroutine"]
    for name, seconds in sp_results.items():
        print(f"  {name:<48} {seconds * 1e9:8.1f} ns   {seconds / floor:5.2f}x bare await")
    spawn = flow_results["spawn one anyio task per body (all in one group)"]
    print()
    for name, seconds in flow_results.items():
        print(f"  {name:<48} {seconds * 1e6:8.2f} µs   {seconds / spawn:5.2f}x spawning a task")
    print()
    print("  a 20-step chain saved after every step, per step:")
    for name, seconds in persisted.items():
        print(f"  {name:<48} {seconds * 1e6:8.1f} µs   {seconds / persisted['no store']:7.1f}x no store")
    print()
    checkpoint = sp_results["await ctx.checkpoint()"]
    per_step = flow_results["linear flow, per step (steps take ctx)"] - flow_results["plain loop of the step bodies"]
    targets = [
        ("stopping point <= 1.5x a bare await", checkpoint <= 1.5 * floor, f"{checkpoint / floor:.2f}x"),
        (
            "stopping point < receive_nowait()+WouldBlock",
            checkpoint < sp_results["receive_nowait() + WouldBlock"],
            f"{checkpoint / sp_results['receive_nowait() + WouldBlock']:.2f}x",
        ),
        (
            "linear flow: overhead per step <= 0.15x spawning a task",
            per_step <= 0.15 * spawn,
            f"{per_step / spawn:.2f}x",
        ),
    ]
    for label, met, ratio in targets:
        print(f"  [{'met' if met else 'NOT MET'}] {label}: {ratio}")


if __name__ == "__main__":
    main()
