"""A child process for tests/test_postgres_processes.py (not a test module): flows run, served and interrupted
on a `PostgresStore` in a schema the test gives.

It writes to the same side log as `tests/lease_child.py` (`EVENT NAME PID EPOCH WALLTIME [MORE]`, with
`os.write`, the file named by `LEASE_LOG`), with the flows of that module (`chain`, whose step `b` loops at
stopping points until the file `LEASE_GO` exists; `stuck`; `heavy`, one step of 0.3 s) and `pair` here (two
steps noting `START`/`END` with the run's id). Modes:

* `run FLOW DSN SCHEMA LEASE RUN_ID BACKEND [BARRIER]`: `flow.run(store=..., run_id=...)` once, its outcome
  noted (`OUTCOME completed|interrupted|forced|run_owned|lease_lost`); with BARRIER, the store is opened,
  `ready` printed, and the run started once that file exists (so that racers go at once).
* `worker DSN SCHEMA LEASE BACKEND MAX_RUNS QUEUE[=LIMIT] FLOW[,FLOW...] [BARRIER]`: `sp.Worker` serving those
  flows from that queue until SIGTERM (graceful stop); `serving` printed once its store is open and, with
  BARRIER, it starts claiming once that file exists.

(Interrupts from another process are sent with the real `stoppoint interrupt ... --store postgresql://...`.)

In `run` mode the store is watched: each connection its LISTEN thread makes is noted (`LISTENER connected PID
N BACKEND_PID`, N its count), each reconnection too (`LISTENER reconnecting PID N`); each read of a run's
interrupt requests from the server that the owner keeps as current (`READ interrupts PID GENERATION`: the
owner answers from memory after it, until a notification, a (re)LISTEN or a renewal says to read again); each
renewal (`RENEW renewed PID EPOCH`). With `PG_LISTEN_GATE` set, a reconnection of the listener waits (bounded)
until that file exists; with `PG_LISTEN_DOWN` set, every reconnection fails, so the listener stays down.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import anyio
import anyio.lowlevel
import psycopg

import stoppoint as sp
from tests.lease_child import chain, heavy, note, stuck, wait_for_start

POLL = 0.002
"""How often a held reconnection looks for its gate file (a file another process writes)."""

pair = sp.Flow("pair")


@pair.step
async def one(ctx: sp.StepContext) -> int:
    note("START", ctx.step, ctx.epoch, ctx.run_id)
    await anyio.lowlevel.checkpoint()
    note("END", ctx.step, ctx.epoch, ctx.run_id)
    return 1


@pair.step
async def two(ctx: sp.StepContext, one: int) -> int:
    note("START", ctx.step, ctx.epoch, ctx.run_id)
    await anyio.lowlevel.checkpoint()
    note("END", ctx.step, ctx.epoch, ctx.run_id)
    return one + 1


FLOWS = {"chain": chain, "stuck": stuck, "heavy": heavy, "pair": pair}


def wait_for_file(path: str, within: float = 30.0) -> None:
    """Block this thread, bounded, until `path` exists."""
    deadline = time.monotonic() + within
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise psycopg.OperationalError(f"no {path} within {within:g} s")
        time.sleep(POLL)


def watch_store(store: sp.PostgresStore) -> None:
    """Note the connections of the store's LISTEN thread (holding or refusing its reconnections), its reads of
    interrupt requests, its renewals (see above)."""
    notices: Any = store._notices
    keep, renew = notices.keep, store.renew

    def kept(key: tuple[str, str], generation: int, requests: object) -> None:
        keep(key, generation, requests)
        if generation == notices._generation:  # a read still current (not one overtaken by a reconnection)
            note("READ", "interrupts", generation)

    async def renewed(lease: sp.Lease) -> sp.Lease:
        lease = await renew(lease)
        note("RENEW", "renewed", lease.epoch)
        return lease

    notices.keep = kept
    store.renew = renewed  # type: ignore[method-assign]
    listener: Any = store._listener
    connect = listener._connect
    gate, down = os.environ.get("PG_LISTEN_GATE"), os.environ.get("PG_LISTEN_DOWN")
    made = 0

    def watched() -> psycopg.Connection[Any]:
        nonlocal made
        made += 1
        if made > 1:
            note("LISTENER", "reconnecting", made)
            if down:
                raise psycopg.OperationalError("the listener is kept down by the test")
            if gate:
                wait_for_file(gate)
        connection: psycopg.Connection[Any] = connect()
        note("LISTENER", "connected", made, str(connection.info.backend_pid))
        return connection

    listener._connect = watched


async def run(flow_name: str, dsn: str, schema: str, lease: float, run_id: str, barrier: str | None) -> None:
    flow = FLOWS[flow_name]
    async with sp.PostgresStore(dsn, schema=schema, lease=lease) as store:
        watch_store(store)
        if barrier is not None:  # opened (and checked) before the race
            print("ready", flush=True)
            wait_for_start(barrier)
        try:
            outcome = await flow.run(store=store, run_id=run_id)
        except sp.RunOwned as exc:
            note("OUTCOME", "run_owned", 0, exc.owner)
        except sp.LeaseLost as exc:
            note("OUTCOME", "lease_lost", exc.epoch)
        else:
            if isinstance(outcome, sp.Completed):
                note("OUTCOME", "completed", 0, str(outcome.value))
            else:
                note("OUTCOME", "forced" if outcome.forced else "interrupted", 0, outcome.signal.reason)


async def work_until_sigterm(
    dsn: str, schema: str, lease: float, max_runs: int, queue: sp.Queue, flows: list[sp.Flow], barrier: str | None
) -> None:
    """`sp.Worker` serving `flows` from `queue` until SIGTERM, which stops it gracefully."""
    async with sp.PostgresStore(dsn, schema=schema, lease=lease) as store:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            print("serving", flush=True)
            if barrier is not None:
                wait_for_start(barrier)
            worker = sp.Worker(store, flows, queues=[queue], max_runs=max_runs)
            async with worker, anyio.create_task_group() as tg:

                async def obey() -> None:
                    async for _ in signals:
                        worker.stop()
                        return

                tg.start_soon(obey)
                await worker.run()
                tg.cancel_scope.cancel()
    note("WORKER", "stopped", 0)


def queue_of(text: str) -> sp.Queue:
    name, _, limit = text.partition("=")
    return sp.Queue(name, concurrency=int(limit) if limit else None)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "run":
        flow_name, dsn, schema, lease, run_id, backend = args[:6]
        anyio.run(
            run, flow_name, dsn, schema, float(lease), run_id, args[6] if len(args) > 6 else None, backend=backend
        )
    elif mode == "worker":
        dsn, schema, lease, backend, max_runs, queue, names = args[:7]
        flows = [FLOWS[name] for name in names.split(",")]
        barrier = args[7] if len(args) > 7 else None
        anyio.run(
            work_until_sigterm,
            dsn,
            schema,
            float(lease),
            int(max_runs),
            queue_of(queue),
            flows,
            barrier,
            backend=backend,
        )
    else:
        sys.exit(f"unknown mode {mode!r}")
