"""PostgresStore (issue 15), on the server `STOPPOINT_BENCH_PG_DSN` names (default: the local one below):

- Per step: chains of 20, 1,000 and 10,000 steps run with `store=PostgresStore(...)` (a fresh run id each),
  against the floor: one single-row `INSERT` in autocommit (one statement, one round trip, one commit) into a
  table shaped like the store's steps table, on the same server, with psycopg's synchronous API, measured in
  the same run; and the same floor with each insert awaited in an anyio worker thread, as the store does.
- Across processes, as `benchmarks.across` on SQLite: interrupt latency with 10 runs active in another
  process (the owners hear of a request by `NOTIFY`), and the recovery of an orphaned run after a `kill -9`
  of its owner (lease 2 s).

Everything lives in schemas of its own, `stoppoint_bench_<hex>_...`, dropped at the end. Without a server
(or without psycopg) the section says it was skipped.
"""

from __future__ import annotations

import gc
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread

import stoppoint as sp

from . import across
from ._across_child import pg_spec
from ._measure import Report, percentile
from .steps import chain

DSN_ENV = "STOPPOINT_BENCH_PG_DSN"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"

STEPS_TABLE = (  # the store's steps table (`_postgres_schema`), so the floor writes rows of the same shape
    "CREATE TABLE steps (flow text NOT NULL, run_id text NOT NULL, step text NOT NULL, epoch bigint NOT NULL,"
    " checkpoint text, report text NOT NULL, seq bigint GENERATED ALWAYS AS IDENTITY,"
    " PRIMARY KEY (flow, run_id, step))"
)


def _connect(dsn: str, schema: str | None = None) -> Any:
    """A psycopg connection in autocommit (as the store's), its search_path set to `schema`."""
    import psycopg
    from psycopg import sql

    connection = psycopg.Connection.connect(dsn, autocommit=True, connect_timeout=3)
    if schema is not None:
        connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return connection


def _unavailable(dsn: str) -> tuple[str, str] | None:
    """Why the benchmark cannot run on `dsn`, in short and in full (None: it can)."""
    try:
        import psycopg
        import psycopg_pool  # noqa: F401  (the store needs it)
    except ImportError:
        return "skipped: psycopg not installed", "pip install 'psycopg[binary]' psycopg_pool"
    try:
        _connect(dsn).close()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"skipped: no server (set {DSN_ENV})", first
    return None


def _drop(dsn: str, schemas: list[str]) -> None:
    from psycopg import sql

    with _connect(dsn) as connection:
        for schema in schemas:
            connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _open_floor(dsn: str, schema: str) -> tuple[Any, Callable[[int], None]]:
    """A connection to a scratch `schema` holding a fresh steps table, and one single-row INSERT into it
    (autocommit: one statement, one round trip, one commit, as the store's `commit_step`)."""
    from psycopg import sql

    with _connect(dsn) as setup:
        setup.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    connection = _connect(dsn, schema)
    connection.execute(STEPS_TABLE)
    checkpoint = '{"flow":"chain","flow_version":"1","run_id":"floor","inputs":{},"outputs":{"s0":null}}'
    report = '{"status":"completed","started_at":"2026-01-01T00:00:00Z","finished_at":"2026-01-01T00:00:00Z"}'

    def insert(i: int) -> None:
        connection.execute(
            "INSERT INTO steps (flow, run_id, step, epoch, checkpoint, report) VALUES (%s, %s, %s, %s, %s, %s)",
            ("chain", "floor", f"s{i}", 1, checkpoint, report),
        )

    return connection, insert


async def floor_batch(
    bare: Callable[[int], None], threaded: Callable[[int], None], first: int, count: int
) -> tuple[list[float], list[float]]:
    """Seconds of each of `count` single-row INSERTs run in the calling thread (`bare`) and of `count` awaited
    in a worker thread (`threaded`, through `anyio.to_thread.run_sync`, as the store's), the two alternating
    so that the server's and the machine's drift affect both alike."""
    bare_times, thread_times = [], []
    for i in range(first, first + count):
        t0 = time.perf_counter()
        bare(i)
        t1 = time.perf_counter()
        await anyio.to_thread.run_sync(threaded, i)
        t2 = time.perf_counter()
        bare_times.append(t1 - t0)
        thread_times.append(t2 - t1)
    return bare_times, thread_times


async def per_step(report: Report, dsn: str, prefix: str, sizes: list[int], repeats: int, made: list[str]) -> None:
    """The per-step section and its targets; the schemas it makes are added to `made` first (to be dropped).

    Shared servers drift (other clients' commits, checkpoints) over seconds, so the floor is measured in
    batches right before and right after each size's runs, and each size is compared with the batches
    around its own runs. Short chains are run several times a round (at least `sizes[-1] // 10` steps, or
    1,000), each run a sample, so that one stall of the server does not decide their median.
    """
    section = report.section(
        f"PostgreSQL: chains run with store=PostgresStore, per step ({repeats} rounds; floor: single-row "
        "INSERT in autocommit, same server, in batches around each size's runs)"
    )
    flows = {size: chain(size) for size in sizes}
    made += [f"{prefix}_steps_{size}" for size in sizes]  # one store per size: other sizes do not grow its table
    stores = {size: sp.PostgresStore(dsn, schema=f"{prefix}_steps_{size}") for size in sizes}
    runs = 0
    samples: dict[int, list[float]] = {size: [] for size in sizes}
    floors: dict[int, list[float]] = {size: [] for size in sizes}
    threads: dict[int, list[float]] = {size: [] for size in sizes}
    steps_per_round = min(max(sizes[-1] // 10, 1_000), sizes[-1])
    batch = 200 if sizes[-1] >= 1_000 else 50
    inserts = 0

    def body(size: int, store: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            nonlocal runs
            runs += 1
            outcome = await flows[size].run(store=stores[store], run_id=f"run-{runs}")
            assert isinstance(outcome, sp.Completed), outcome

        return run

    made += [f"{prefix}_floor", f"{prefix}_thread"]
    bare, insert = await anyio.to_thread.run_sync(_open_floor, dsn, f"{prefix}_floor")
    threaded, insert_threaded = await anyio.to_thread.run_sync(_open_floor, dsn, f"{prefix}_thread")
    try:
        for size in sizes:  # open each store (its pool and schema) and write a first run, untimed
            await stores[size].__aenter__()
            await body(sizes[0], size)()
        for _ in range(repeats):
            # Each round runs everything once, in turn, so that the machine's drift affects all alike.
            gc.collect()
            before = await floor_batch(insert, insert_threaded, inserts, batch)
            inserts += batch
            for size in sizes:
                for _ in range(max(1, steps_per_round // size)):
                    gc.collect()
                    t0 = time.perf_counter()
                    await body(size, size)()
                    samples[size].append((time.perf_counter() - t0) / size)
                after = await floor_batch(insert, insert_threaded, inserts, batch)
                inserts += batch
                floors[size] += before[0] + after[0]
                threads[size] += before[1] + after[1]
                before = after
    finally:
        for store in stores.values():
            await store.aclose()
        bare.close()
        threaded.close()

    for size in sizes:
        floor_name = f"{size:,} steps: floor, one INSERT in autocommit (psycopg, same server)"
        thread_name = f"{size:,} steps: floor in a worker thread, the same awaited through anyio.to_thread"
        mean = statistics.fmean(floors[size])
        section.add(
            floor_name,
            statistics.median(floors[size]),
            note=f"median of {len(floors[size]):,} around these runs; mean {mean * 1e3:.2f} ms",
        )
        section.add(
            thread_name,
            statistics.median(threads[size]),
            baseline=floor_name,
            note=f"median of {len(threads[size]):,}, alternating with the floor's inserts",
        )
        value = statistics.median(samples[size])
        note = f"median of {len(samples[size])} runs"
        section.add(f"{size:,} steps: PostgresStore", value, baseline=floor_name, note=note)
        section.add(f"{size:,} steps: PostgresStore (vs the floor in a thread)", value, baseline=thread_name)

    small, big = sizes[0], sizes[-1]
    report.target(
        f"PostgresStore per step, {big:,} vs {small:,} steps <= 1.3x",
        section.get(f"{big:,} steps: PostgresStore").value / section.get(f"{small:,} steps: PostgresStore").value,
        1.3,
    )
    report.target(
        f"PostgresStore per step <= 2x the floor in a worker thread ({big:,} steps)",
        section.get(f"{big:,} steps: PostgresStore (vs the floor in a thread)").ratio,
        2.0,
        why=f"({section.get(f'{big:,} steps: PostgresStore').ratio:.2f}x the bare floor)",
    )


async def across_processes(
    report: Report, dsn: str, prefix: str, rounds: int, recoveries: int, backend: str, made: list[str]
) -> None:
    """The cross-process sections and their targets (`benchmarks.across`'s scenarios); the schemas they make
    are added to `made` first."""
    runs, lease = 10, 2.0
    schemas = [f"{prefix}_across", f"{prefix}_orphan"]
    made += schemas
    latencies, calls = await across.interrupt_latency(pg_spec(dsn, schemas[0]), runs, rounds * runs, backend)
    section = report.section(
        f"PostgreSQL across processes: interrupt latency, {runs} runs active, {len(latencies)} interrupts "
        f"(NOTIFY; owners look every {sp.PostgresStore.interrupt_poll * 1e3:g} ms)"
    )
    p99 = percentile(latencies, 99)
    section.add("store.interrupt() -> Interrupted returned in the other process", percentile(latencies, 50), p99=p99)
    section.add("the store.interrupt() call itself", percentile(calls, 50), p99=percentile(calls, 99))
    report.target(
        f"PostgresStore cross-process interrupt latency p99 <= 100 ms ({runs} runs active)", p99, 0.1, unit="s"
    )

    delays = await across.orphan_recovery(pg_spec(dsn, schemas[1]), lease, recoveries, backend)
    section = report.section(
        f"PostgreSQL across processes: recovery of an orphaned run, lease {lease:g} s ({len(delays)} kills)"
    )
    section.add(
        "kill -9 of the owner -> its step runs again in a Worker",
        statistics.median(delays),
        p99=max(delays),
        note="p99: the worst",
    )
    report.target(
        f"PostgresStore orphaned run recovered <= lease + 2 s (lease {lease:g} s; worst of {len(delays)})",
        max(delays),
        lease + 2.0,
        unit="s",
    )


async def measure(report: Report, sizes: list[int], repeats: int, rounds: int, recoveries: int, backend: str) -> None:
    dsn = os.environ.get(DSN_ENV) or DEFAULT_DSN
    why = await anyio.to_thread.run_sync(_unavailable, dsn)
    if why is not None:
        short, detail = why
        report.section(f"PostgreSQL: {short}: {detail}")
        for label in ("PostgresStore per step", "PostgresStore interrupt latency", "PostgresStore orphan recovery"):
            report.target(label, None, None, why=short)
        return
    prefix = f"stoppoint_bench_{secrets.token_hex(4)}"
    made: list[str] = []
    try:
        await per_step(report, dsn, prefix, sizes, repeats, made)
        await across_processes(report, dsn, prefix, rounds, recoveries, backend, made)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_drop, dsn, made)
