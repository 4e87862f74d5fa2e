"""A child process for tests/test_postgres_failures.py (not a test module): flows on a `PostgresStore`.

It logs to the side log of `tests/lease_child.py` (`note()`: `EVENT NAME PID EPOCH WALLTIME [MORE]`, one
`os.write` per line, so a line written is in the file whatever happens to the process next) and runs its
`chain` flow (a -> b -> c, `b` waiting at stopping points for the `LEASE_GO` file), or `relay` below.

    python -m tests.pg_child run FLOW DSN SCHEMA RUN_ID BACKEND [--lease SECONDS] [--after FILE] [--hold FILE]
        runs FLOW (`chain` or `relay`) with RUN_ID on `PostgresStore(DSN, schema=SCHEMA, lease=LEASE)` (or
        the `--lease` given), then logs `OUTCOME completed|interrupted|forced|run_owned|lease_lost|store_error`
        (MORE: the value, the owner or the error) and exits 0. With `--after`, it opens the store, prints
        `ready` and waits for FILE before it runs (so its start-up is done before the test lets it go); with
        `--hold`, it keeps the store open after the outcome until FILE exists (so a test can watch what it
        still writes);
    python -m tests.pg_child worker DSN SCHEMA BACKEND
        serves `chain` and `relay` with `sp.Worker` until SIGTERM (prints `serving` once it serves).

`relay` (s1 -> s2 -> s3 -> s4) is a longer chain: step `sN` logs START, waits at stopping points (every
10 ms) for the file `LEASE_GO.sN`, logs END (or STOP, left by an exception) and returns who ran it.
"""

from __future__ import annotations

import argparse
import os
import signal

import anyio

import stoppoint as sp

from .lease_child import LEASE, chain, me, note

relay = sp.Flow("relay")


async def _wait_for_go(ctx: sp.StepContext) -> None:
    """Log START, wait (at stopping points) for this step's go file, log END, or STOP if left by an exception."""
    note("START", ctx.step, ctx.epoch)
    go = anyio.Path(f"{os.environ['LEASE_GO']}.{ctx.step}")
    ended = False
    try:
        while not await go.exists():
            await ctx.checkpoint()
            await anyio.sleep(0.01)
        ended = True
    finally:
        note("END" if ended else "STOP", ctx.step, ctx.epoch)


@relay.step
async def s1(ctx: sp.StepContext) -> str:
    await _wait_for_go(ctx)
    return me(ctx)


@relay.step
async def s2(ctx: sp.StepContext, s1: str) -> str:
    await _wait_for_go(ctx)
    return me(ctx)


@relay.step
async def s3(ctx: sp.StepContext, s2: str) -> str:
    await _wait_for_go(ctx)
    return me(ctx)


@relay.step
async def s4(ctx: sp.StepContext, s1: str, s2: str, s3: str) -> str:
    await _wait_for_go(ctx)
    return f"{s1} {s2} {s3} {me(ctx)}"


FLOWS = {"chain": chain, "relay": relay}


async def wait_for_file(path: str) -> None:
    """Wait (polling, bounded: 30 s) until the file exists."""
    with anyio.fail_after(30):
        while not await anyio.Path(path).exists():  # noqa: ASYNC110 - another process writes it
            await anyio.sleep(0.005)


async def run(
    flow_name: str, dsn: str, schema: str, run_id: str, lease: float, after: str | None, hold: str | None
) -> None:
    flow = FLOWS[flow_name]
    try:
        async with sp.PostgresStore(dsn, schema=schema, lease=lease) as store:
            if after is not None:
                print("ready", flush=True)
                await wait_for_file(after)
            try:
                outcome = await flow.run(store=store, run_id=run_id)
            except sp.RunOwned as exc:
                note("OUTCOME", "run_owned", 0, exc.owner)
            except sp.LeaseLost as exc:
                note("OUTCOME", "lease_lost", exc.epoch, str(exc).replace("\n", " "))
            else:
                if isinstance(outcome, sp.Completed):
                    note("OUTCOME", "completed", 0, str(outcome.value))
                else:
                    note("OUTCOME", "forced" if outcome.forced else "interrupted", 0, outcome.signal.reason)
            if hold is not None:
                await wait_for_file(hold)
    except sp.StoreError as exc:  # (LeaseLost and RunOwned are StoreErrors too: caught above)
        note("OUTCOME", "store_error", 0, f"{type(exc).__name__}: {exc}".replace("\n", " "))


async def work_until_sigterm(dsn: str, schema: str) -> None:
    """`sp.Worker` serving `chain` and `relay` until SIGTERM, which stops it gracefully."""
    async with (
        sp.PostgresStore(dsn, schema=schema, lease=LEASE) as store,
        sp.Worker(store, [chain, relay], max_runs=2) as worker,
    ):
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def obey() -> None:
                    async for _ in signals:
                        worker.stop()
                        return

                tg.start_soon(obey)
                print("serving", flush=True)
                await worker.run()
                tg.cancel_scope.cancel()
    note("WORKER", "stopped", 0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.pg_child")
    modes = parser.add_subparsers(dest="mode", required=True)
    run_ = modes.add_parser("run")
    for name in ("flow", "dsn", "schema", "run_id", "backend"):
        run_.add_argument(name)
    run_.add_argument("--lease", type=float, default=LEASE)
    run_.add_argument("--after")
    run_.add_argument("--hold")
    worker = modes.add_parser("worker")
    for name in ("dsn", "schema", "backend"):
        worker.add_argument(name)
    args = parser.parse_args()
    if args.mode == "run":
        options = (args.lease, args.after, args.hold)
        anyio.run(run, args.flow, args.dsn, args.schema, args.run_id, *options, backend=args.backend)
    else:
        anyio.run(work_until_sigterm, args.dsn, args.schema, backend=args.backend)


if __name__ == "__main__":
    main()
