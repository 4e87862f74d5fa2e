"""The other process of `benchmarks.across` and `benchmarks.postgres` (python -m benchmarks._across_child MODE
STORE ARG BACKEND), and the flows both processes use (a run is claimed by its flow's name and version, so both
import them from here). STORE is the path of a SQLite file, or a PostgreSQL store as `pg_spec()` writes it
(`open_store` opens either).

- `spin STORE RUNS BACKEND`: keeps RUNS runs of `SPIN` going on the store, each a step looping
  on `await ctx.checkpoint(); await anyio.sleep(0.001)`. Prints `started RUN_ID` once a run's step is
  running, and `stopped RUN_ID TIME` (`time.time()`) when its outcome is returned, then starts another in
  its place, so RUNS are running whenever the other process sends an interrupt. Ends when stdin closes.
- `orphan STORE LEASE BACKEND RUN_ID`: run RUN_ID of `ORPHAN` on the store with `lease=LEASE`; prints
  `running RUN_ID` once its first step runs, which then waits to be killed.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

import anyio
import anyio.to_thread

import stoppoint as sp

PG_PREFIX = "postgres:"


def pg_spec(dsn: str, schema: str) -> str:
    """The STORE argument of a `PostgresStore(dsn, schema=schema)`."""
    return PG_PREFIX + json.dumps({"dsn": dsn, "schema": schema})


def open_store(spec: str, lease: float | None = None) -> Any:
    """The store STORE names: a `PostgresStore` for a `pg_spec()`, else a `SQLiteStore` at that path."""
    options = {} if lease is None else {"lease": lease}
    if spec.startswith(PG_PREFIX):
        where = json.loads(spec[len(PG_PREFIX) :])
        return sp.PostgresStore(where["dsn"], schema=where["schema"], **options)
    return sp.SQLiteStore(spec, **options)


SPIN = sp.Flow("across-spin")


@SPIN.step()
async def spin(ctx: sp.StepContext) -> None:
    print(f"started {ctx.run_id}", flush=True)
    while True:
        await ctx.checkpoint()
        await anyio.sleep(0.001)


ORPHAN = sp.Flow("across-orphan")
resumed: list[float] = []  # time.time() when the first step ran again after a claim (in the worker's process)
on_resumed: anyio.Event | None = None  # set then, if the worker's process put one here


@ORPHAN.step()
async def first(ctx: sp.StepContext) -> None:
    if ctx.epoch == 1:  # the first owner: wait to be killed
        print(f"running {ctx.run_id}", flush=True)
        await anyio.sleep_forever()
    resumed.append(time.time())
    if on_resumed is not None:
        on_resumed.set()


@ORPHAN.step(after="first")
async def second(ctx: sp.StepContext) -> None:
    pass


async def keep_spinning(spec: str, runs: int) -> None:
    ids = (f"spin-{i}" for i in itertools.count())
    async with open_store(spec) as store, anyio.create_task_group() as tg:

        async def one() -> None:
            run_id = next(ids)
            handle = await SPIN.start(tg, store=store, run_id=run_id)
            outcome = await handle.outcome()
            stopped = time.time()
            assert isinstance(outcome, sp.Interrupted), outcome
            print(f"stopped {run_id} {stopped!r}", flush=True)
            tg.start_soon(one)  # another in its place

        for _ in range(runs):
            tg.start_soon(one)
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)  # until the parent closes stdin
        tg.cancel_scope.cancel()


async def orphan(spec: str, lease: float, run_id: str) -> None:
    async with open_store(spec, lease) as store:
        await ORPHAN.run(store=store, run_id=run_id)


if __name__ == "__main__":
    mode, spec, arg, backend = sys.argv[1:5]
    if mode == "spin":
        anyio.run(keep_spinning, spec, int(arg), backend=backend)
    else:
        anyio.run(orphan, spec, float(arg), sys.argv[5], backend=backend)
