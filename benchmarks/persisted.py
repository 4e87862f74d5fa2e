"""What durability costs per step: a chain saved after every step (a save writes the whole
checkpoint and report, so it grows with the number of steps)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import stoppoint as sp

from ._measure import Report, per_item
from .steps import chain


async def measure(report: Report, steps: int, repeats: int) -> None:
    section = report.section(f"Persisted: a {steps}-step chain saved after every step, per step (median of {repeats})")
    flow = chain(steps)
    runs = 0

    with tempfile.TemporaryDirectory() as tmp:

        def with_store(make: Callable[[], sp.Store]) -> Callable[[int], Awaitable[None]]:
            async def run(n: int) -> None:
                nonlocal runs
                runs += 1
                async with contextlib.AsyncExitStack() as stack:
                    store = make()
                    if isinstance(store, sp.SQLiteStore):
                        await stack.enter_async_context(store)
                    outcome = await flow.run(store=store, run_id=f"run-{runs}")
                    assert isinstance(outcome, sp.Completed), outcome

            return run

        async def no_store(n: int) -> None:
            await flow.run()

        times = await per_item(
            {
                "no store": no_store,
                "MemoryStore": with_store(sp.MemoryStore),
                "SQLiteStore (WAL, synchronous=FULL)": with_store(lambda: sp.SQLiteStore(Path(tmp) / f"{runs}.db")),
            },
            steps,
            repeats,
        )
        for name, seconds in times.items():
            section.add(name, seconds, baseline=None if name == "no store" else "no store")
