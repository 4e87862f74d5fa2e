"""What `ctx.save()` costs per call (issue 16, item 6): one step saving its progress N times, on no store
(the state stays in memory, for the checkpoint of an `Interrupted`), on `MemoryStore` and on `SQLiteStore`,
against the floor of `persisted.py` (one single-row `INSERT` + `COMMIT` in SQLite with the store's pragmas, on
the same disk, measured in the same run, in the calling thread and awaited in a worker thread).

Each save serialises its state to JSON at once and, with a store, commits the step's row (fenced under the
run's lease) before it returns: it is one write, not a throttled one. The state saved is small (a position and
a cursor, as a paginated import saves), and, for the cost of size, a list of 1,000 ints.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import stoppoint as sp
from stoppoint._sqlite_file import _SYNCHRONOUS

from ._measure import Report
from .persisted import floor, floor_in_thread

BIG = list(range(1_000))


def saving_flow(saves: int, big: bool) -> sp.Flow:
    """One step saving `saves` times (a small state, or `BIG`), with a stopping point before each save."""
    flow = sp.Flow(f"saves-{saves}-{'big' if big else 'small'}")

    @flow.step
    async def page(ctx: sp.StepContext) -> int:
        for i in range(saves):
            await ctx.checkpoint()
            await ctx.save(BIG if big else {"done": i, "cursor": f"c{i}"})
        return saves

    return flow


def looping_flow(saves: int) -> sp.Flow:
    """The same loop without saves: what a save's time is measured above."""
    flow = sp.Flow(f"loop-{saves}")

    @flow.step
    async def page(ctx: sp.StepContext) -> int:
        for _ in range(saves):
            await ctx.checkpoint()
        return saves

    return flow


async def measure(report: Report, saves: int, repeats: int) -> None:
    section = report.section(
        f"ctx.save(): per call, one step saving {saves:,} times (median of {repeats}; floor: single-row "
        f"INSERT+COMMIT, WAL, synchronous={_SYNCHRONOUS})"
    )
    samples: dict[str, list[float]] = {}
    floor_samples: list[float] = []
    thread_samples: list[float] = []
    runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        memory = sp.MemoryStore()
        sqlite = sp.SQLiteStore(Path(tmp) / "saves.db")
        await sqlite.__aenter__()
        try:
            loop = looping_flow(saves)

            def body(flow: sp.Flow, store: Any) -> Callable[[], Awaitable[None]]:
                async def run() -> None:
                    nonlocal runs
                    runs += 1
                    outcome = await flow.run(store=store, run_id=f"run-{runs}")
                    assert isinstance(outcome, sp.Completed), outcome

                return run

            bodies: dict[str, Callable[[], Awaitable[None]]] = {"the loop without saves": body(loop, None)}
            for big in (False, True):
                flow = saving_flow(saves, big)
                what = "1,000 ints" if big else "small state"
                bodies[f"{what}: no store"] = body(flow, None)
                bodies[f"{what}: MemoryStore"] = body(flow, memory)
                bodies[f"{what}: SQLiteStore"] = body(flow, sqlite)
            for run in bodies.values():  # warm up, untimed
                await run()
            for round_ in range(repeats):
                gc.collect()
                floor_samples += floor(Path(tmp) / f"floor-{round_}.db", saves)
                thread_samples += await floor_in_thread(Path(tmp) / f"thread-{round_}.db", saves)
                for name, run in bodies.items():
                    gc.collect()
                    t0 = time.perf_counter()
                    await run()
                    samples.setdefault(name, []).append((time.perf_counter() - t0) / saves)
        finally:
            await sqlite.aclose()

    floor_name = "floor: one INSERT+COMMIT (same pragmas, same disk)"
    thread_name = "floor in a worker thread: the same, awaited through anyio.to_thread"
    section.add(floor_name, statistics.median(floor_samples), note=f"median of {len(floor_samples):,}")
    section.add(thread_name, statistics.median(thread_samples), baseline=floor_name)
    loop_time = statistics.median(samples["the loop without saves"])
    section.add("the loop without saves (per iteration)", loop_time)
    for what in ("small state", "1,000 ints"):
        base = f"{what}: no store"
        section.add(base, statistics.median(samples[base]) - loop_time, note="serialising and checking it")
        section.add(f"{what}: MemoryStore", statistics.median(samples[f"{what}: MemoryStore"]) - loop_time)
        section.add(
            f"{what}: SQLiteStore",
            statistics.median(samples[f"{what}: SQLiteStore"]) - loop_time,
            baseline=thread_name,
        )
    report.target(
        "ctx.save() of a small state on SQLiteStore <= 2x the floor in a worker thread",
        section.get("small state: SQLiteStore").ratio,
        2.0,
        why=f"({section.get('small state: SQLiteStore').value / statistics.median(floor_samples):.2f}x the bare floor)",
    )
