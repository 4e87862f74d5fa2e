"""What durability costs per step (issue 14, item 8): chains of 20, 1,000 and 10,000 steps run with
`store=` (a fresh run id each), per step, on `MemoryStore` (against the same chain with no store) and
on `SQLiteStore` (against the floor: one single-row `INSERT` + `COMMIT` in SQLite with the store's
pragmas, on the same disk, measured in the same run).

A `Store` commits one step row per completed step (`commit_step`), so its per-step cost should not
grow with the steps already stored. For comparison ("before"), the same chains through stoppoint
0.1's whole-save path: a `BasicStore` wrapper (save/load/list_runs/delete only) around each store,
so that the runtime saves the whole checkpoint and report after every step; that is quadratic, so
it runs at 20 and 1,000 steps only.
"""

from __future__ import annotations

import gc
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread

import stoppoint as sp
from stoppoint._checkpoint import Checkpoint
from stoppoint._outcome import RunReport
from stoppoint._sqlite_file import _SYNCHRONOUS
from stoppoint._store import RunRecord, StoredRun

from ._measure import Report
from .steps import chain

WHOLE_SAVE_MAX = 1_000  # whole saves are quadratic: not at 10,000 steps

STEPS_TABLE = (  # the store's steps table (`_sqlite_schema`), so the floor writes rows of the same shape
    "CREATE TABLE steps (flow TEXT NOT NULL, run_id TEXT NOT NULL, step TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " checkpoint TEXT, report TEXT NOT NULL, PRIMARY KEY (flow, run_id, step))"
)


class WholeSaves:
    """Only the `BasicStore` methods of `store`: the runtime saves whole checkpoints (stoppoint 0.1)."""

    def __init__(self, store: sp.MemoryStore | sp.SQLiteStore) -> None:
        self.store = store

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        await self.store.save(checkpoint, report)

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        return await self.store.load(flow, run_id)

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        return await self.store.list_runs(flow)

    async def delete(self, flow: str, run_id: str) -> None:
        await self.store.delete(flow, run_id)


def _open_floor(path: Path) -> tuple[sqlite3.Connection, Callable[[int], None]]:
    """A fresh file at `path`, opened as `_sqlite_file.open_file` opens a store (WAL, `synchronous` as the
    store's), and one single-row INSERT + COMMIT into it (BEGIN IMMEDIATE, as the store writes)."""
    connection = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
    assert str(mode).lower() == "wal", mode
    connection.execute(f"PRAGMA synchronous = {_SYNCHRONOUS}")
    connection.execute(STEPS_TABLE)
    checkpoint = '{"flow":"chain","flow_version":"1","run_id":"floor","inputs":{},"outputs":{"s0":null}}'
    report = '{"status":"completed","started_at":"2026-01-01T00:00:00Z","finished_at":"2026-01-01T00:00:00Z"}'

    def insert(i: int) -> None:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT INTO steps (flow, run_id, step, epoch, checkpoint, report) VALUES (?, ?, ?, ?, ?, ?)",
            ("chain", "floor", f"s{i}", 1, checkpoint, report),
        )
        connection.execute("COMMIT")

    return connection, insert


def floor(path: Path, count: int) -> list[float]:
    """Seconds of each of `count` single-row INSERT + COMMITs, run in the calling thread."""
    connection, insert = _open_floor(path)
    try:
        times = []
        for i in range(count):
            t0 = time.perf_counter()
            insert(i)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        connection.close()


async def floor_in_thread(path: Path, count: int) -> list[float]:
    """Seconds of each of `count` single-row INSERT + COMMITs, each awaited in a worker thread
    (`anyio.to_thread.run_sync`): the floor of a store that keeps the disk off the event loop, as
    API.md §6 asks of `SQLiteStore`."""
    connection, insert = _open_floor(path)
    try:
        times = []
        for i in range(count):
            t0 = time.perf_counter()
            await anyio.to_thread.run_sync(insert, i)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        connection.close()


async def measure(report: Report, sizes: list[int], repeats: int, whole_max: int = WHOLE_SAVE_MAX) -> None:
    section = report.section(
        f"Persisted: chains run with store=, per step (median of {repeats}; floor: single-row INSERT+COMMIT, "
        f"WAL, synchronous={_SYNCHRONOUS})"
    )
    flows = {size: chain(size) for size in sizes}
    whole_sizes = [size for size in sizes if size <= whole_max]
    runs = 0
    samples: dict[str, list[float]] = {}
    floor_samples: list[float] = []
    thread_samples: list[float] = []

    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[str, sp.MemoryStore | sp.SQLiteStore] = {}
        for size in sizes:  # one store per size (runs of other sizes do not grow its file), opened untimed
            stores[f"memory {size}"] = sp.MemoryStore()
            stores[f"sqlite {size}"] = sp.SQLiteStore(Path(tmp) / f"steps-{size}.db")
        for size in whole_sizes:
            stores[f"whole memory {size}"] = sp.MemoryStore()
            stores[f"whole sqlite {size}"] = sp.SQLiteStore(Path(tmp) / f"whole-{size}.db")

        def body(size: int, key: str | None) -> Callable[[], Awaitable[None]]:
            flow = flows[size]

            async def run() -> None:
                nonlocal runs
                runs += 1
                if key is None:
                    outcome = await flow.run()
                else:
                    store = stores[key]
                    outcome = await flow.run(
                        store=WholeSaves(store) if key.startswith("whole") else store, run_id=f"run-{runs}"
                    )
                assert isinstance(outcome, sp.Completed), outcome

            return run

        bodies: dict[str, tuple[int, Callable[[], Awaitable[None]]]] = {}
        for size in sizes:
            bodies[f"{size:,} steps: no store"] = (size, body(size, None))
            bodies[f"{size:,} steps: MemoryStore"] = (size, body(size, f"memory {size}"))
            bodies[f"{size:,} steps: SQLiteStore"] = (size, body(size, f"sqlite {size}"))
        for size in whole_sizes:
            bodies[f"{size:,} steps: MemoryStore, whole saves (0.1)"] = (size, body(size, f"whole memory {size}"))
            bodies[f"{size:,} steps: SQLiteStore, whole saves (0.1)"] = (size, body(size, f"whole sqlite {size}"))

        try:
            for store in stores.values():  # open each file and write its first run, untimed
                if isinstance(store, sp.SQLiteStore):
                    await store.__aenter__()
            for key in stores:
                await body(20, key)()
            floor_count = max(sizes[-1] // 10, 500)
            for round_ in range(repeats):
                # Each round runs everything once, in turn, so that the machine's drift affects all alike.
                gc.collect()
                floor_samples += floor(Path(tmp) / f"floor-{round_}.db", floor_count)
                thread_samples += await floor_in_thread(Path(tmp) / f"thread-{round_}.db", floor_count)
                for name, (size, run) in bodies.items():
                    gc.collect()
                    t0 = time.perf_counter()
                    await run()
                    samples.setdefault(name, []).append((time.perf_counter() - t0) / size)
        finally:
            for store in stores.values():
                if isinstance(store, sp.SQLiteStore):
                    await store.aclose()

    floor_name = "floor: one INSERT+COMMIT (same pragmas, same disk)"
    thread_name = "floor in a worker thread: the same, awaited through anyio.to_thread"
    section.add(
        floor_name,
        statistics.median(floor_samples),
        note=f"median of {len(floor_samples):,}; mean {statistics.fmean(floor_samples) * 1e3:.2f} ms",
    )
    section.add(
        thread_name,
        statistics.median(thread_samples),
        baseline=floor_name,
        note=f"median of {len(thread_samples):,}; the hop to the thread and back costs the difference",
    )
    for size in sizes:
        base = f"{size:,} steps: no store"
        section.add(base, statistics.median(samples[base]))
        section.add(
            f"{size:,} steps: MemoryStore", statistics.median(samples[f"{size:,} steps: MemoryStore"]), baseline=base
        )
        sqlite = statistics.median(samples[f"{size:,} steps: SQLiteStore"])
        section.add(f"{size:,} steps: SQLiteStore", sqlite, baseline=floor_name)
        section.add(f"{size:,} steps: SQLiteStore (vs the floor in a thread)", sqlite, baseline=thread_name)
    for size in whole_sizes:
        for kind in ("MemoryStore", "SQLiteStore"):
            name = f"{size:,} steps: {kind}, whole saves (0.1)"
            section.add(name, statistics.median(samples[name]), baseline=f"{size:,} steps: {kind}")

    small, big = sizes[0], sizes[-1]

    def per_step(size: int, kind: str) -> float:
        return section.get(f"{size:,} steps: {kind}").value

    report.target(
        f"SQLiteStore per step, {big:,} vs {small:,} steps <= 1.3x",
        per_step(big, "SQLiteStore") / per_step(small, "SQLiteStore"),
        1.3,
    )
    # The floor runs in the calling thread; SQLiteStore must not (API.md §6: its I/O in a worker thread,
    # so the event loop never waits on the disk), and pays a hop there and back that the floor does not.
    # The target is read against the floor in a worker thread; the ratio to the bare floor is shown too.
    report.target(
        f"SQLiteStore per step <= 2x the floor in a worker thread ({big:,} steps)",
        section.get(f"{big:,} steps: SQLiteStore (vs the floor in a thread)").ratio,
        2.0,
        why=f"({section.get(f'{big:,} steps: SQLiteStore').ratio:.2f}x the bare floor)",
    )
    report.target(
        f"MemoryStore per step flat, {big:,} vs {small:,} steps <= 1.3x",
        per_step(big, "MemoryStore") / per_step(small, "MemoryStore"),
        1.3,
    )
