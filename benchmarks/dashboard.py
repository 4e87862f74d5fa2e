"""What an open dashboard costs a run (issue 17, item 3): a persisted chain's per-step cost on `SQLiteStore`,
alone and while `stoppoint ui` (its own process, as it is deployed) serves viewers that poll it.

An open page fetches its live part once a second: a read of the run (its head, step rows and up to 1,000
events) or of the runs list. The dashboard never takes a lease nor writes, and SQLite's WAL lets a reader and
the run's writer go on together, so the run should pay only for the CPU the other processes take. Rows: one
viewer and 20 viewers, each polling as an open page does (once a second, less often when a page takes long:
`dashboard.js`), each ratio against the run alone, measured in the same rounds; and the time a viewer waits
for a page (the run's page grows to 1,000 steps and 300 events: about 580 KB of HTML).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio

import stoppoint as sp

from ._measure import Report, percentile
from .steps import chain

LOADS = {"alone": None, "1 viewer": (1, 1.0), "20 viewers": (20, 1.0)}


@contextlib.contextmanager
def _ui(db: Path) -> Iterator[str]:
    """`stoppoint ui` over `db` on a free port; its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "stoppoint", "ui", "--store", str(db), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert " at http://" in line, line
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def _viewers(url: str, count: int, rate: float, times: list[float]) -> Iterator[None]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._dashboard_child", url, str(count), str(rate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdin is not None
        assert process.stdout.readline().strip() == "ready"
        yield
        process.stdin.close()
        times += json.loads(process.stdout.readline())
    finally:
        if process.poll() is None and not process.stdin.closed:  # left early: an error above
            process.kill()
        process.wait(timeout=30)


async def measure(report: Report, steps: int, repeats: int) -> None:
    section = report.section(
        f"Dashboard: a persisted chain of {steps:,} steps on SQLiteStore, per step, while `stoppoint ui` serves "
        f"viewers polling it (median of {repeats})"
    )
    flow = chain(steps)  # flow "chain", which the viewers watch
    samples: dict[str, list[float]] = {name: [] for name in LOADS}
    waits: dict[str, list[float]] = {name: [] for name in LOADS if LOADS[name] is not None}
    big: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "runs.db"
        async with sp.SQLiteStore(db) as store:
            await flow.run(store=store, run_id="warm-up")  # the file and its tables exist before the ui opens it
        with _ui(db) as url:
            async with sp.SQLiteStore(db) as store:
                for _ in range(repeats):
                    for name, load in LOADS.items():
                        await store.delete(flow.name, "watched")
                        with contextlib.ExitStack() as stack:
                            if load is not None:
                                stack.enter_context(_viewers(url, load[0], load[1], waits[name]))
                            t0 = time.perf_counter()
                            outcome = await flow.run(store=store, run_id="watched")
                            samples[name].append((time.perf_counter() - t0) / steps)
                        assert isinstance(outcome, sp.Completed), outcome
                # The page of the last run, completed: 1,000 steps and its last 1,000 events (300 shown)
                with _viewers(url, 1, 10.0, big):
                    await anyio.sleep(3)
    for name in LOADS:
        section.add(name, statistics.median(samples[name]), baseline="alone")
    for name, times in waits.items():
        section.add(
            f"a viewer's request, {name}",
            statistics.median(times),
            p99=percentile(times, 99),
            note=f"{len(times):,} requests",
        )
    section.add(
        f"a viewer's request, a completed run of {steps:,} steps (its page, and the runs list, in turn)",
        statistics.median(big),
        p99=percentile(big, 99),
        note=f"{len(big):,} requests",
    )
    report.target("a persisted step with one dashboard viewer <= 1.1x alone", section.get("1 viewer").ratio, 1.1)
