"""Flows and a child process for tests/test_leases_processes.py (not a test module).

Every step appends lines to a side log (the file named by the environment variable `LEASE_LOG`), with
`os.write` on a file opened for appending, so a line written is in the file whatever happens to the process
next. A line is `EVENT NAME PID EPOCH WALLTIME [MORE]`:

* `START step`, `END step` (the step returned), `STOP step` (the step left by an exception: interrupted,
  cancelled, fenced);
* `OUTCOME completed|interrupted|forced|run_owned|lease_lost`, written by the child process below when its
  `flow.run()` returns or raises (the epoch field is 0 when it has none).

`chain` (a -> b -> c) and `stuck` are run by `python -m tests.lease_child run FLOW DB RUN_ID BACKEND [BARRIER]`
or served by `stoppoint worker tests/lease_child.py:chain`; `b` loops at stopping points (every 10 ms) until
the file named by `LEASE_GO` exists. `heavy` (one step of 0.3 s) is served by workers from a limited queue.
`python -m tests.lease_child worker DB BACKEND` serves `chain` with `sp.Worker` until SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import anyio

import stoppoint as sp

LEASE = 1.0
"""The lease of every store the children open (a killed or stopped owner's run is orphaned a second later)."""


def note(event: str, name: str, epoch: int, more: str = "") -> None:
    """Append one line to the side log."""
    path = os.environ.get("LEASE_LOG")
    if not path:
        return
    line = f"{event} {name} {os.getpid()} {epoch} {time.time():.6f}"
    line = f"{line} {more}\n" if more else f"{line}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def me(ctx: sp.StepContext) -> str:
    """Who ran a step: its output names the process and the claim."""
    return f"{ctx.step}@{os.getpid()}/{ctx.epoch}"


chain = sp.Flow("chain")


@chain.step
async def a(ctx: sp.StepContext) -> str:
    note("START", ctx.step, ctx.epoch)
    note("END", ctx.step, ctx.epoch)
    return me(ctx)


@chain.step
async def b(ctx: sp.StepContext, a: str) -> str:
    note("START", ctx.step, ctx.epoch)
    go = os.environ.get("LEASE_GO")
    ended = False
    try:
        polls = 0
        while go and not await anyio.Path(go).exists():
            polls += 1
            ctx.progress(polls, message="waiting for the go file")
            await ctx.checkpoint()
            await anyio.sleep(0.01)
        ended = True
    finally:
        note("END" if ended else "STOP", ctx.step, ctx.epoch)
    return me(ctx)


@chain.step
async def c(ctx: sp.StepContext, a: str, b: str) -> str:
    note("START", ctx.step, ctx.epoch)
    note("END", ctx.step, ctx.epoch)
    return f"{a} {b} {me(ctx)}"


stuck = sp.Flow("stuck")


@stuck.step
async def forever(ctx: sp.StepContext) -> None:
    note("START", ctx.step, ctx.epoch)
    try:
        await anyio.sleep_forever()  # no stopping point: only a forced stop ends it
    finally:
        note("STOP", ctx.step, ctx.epoch)


heavy = sp.Flow("heavy")


@heavy.step
async def work(ctx: sp.StepContext, n: int) -> int:
    note("START", ctx.step, ctx.epoch, ctx.run_id)
    await anyio.sleep(0.3)
    note("END", ctx.step, ctx.epoch, ctx.run_id)
    return n * n


FLOWS = {"chain": chain, "stuck": stuck, "heavy": heavy}


def wait_for_start(barrier: str) -> None:
    """The barrier: spin (blocking this process on purpose, so that every racer goes at the same moment),
    bounded, until the start file exists."""
    deadline = time.monotonic() + 30
    while not os.path.exists(barrier):
        if time.monotonic() > deadline:
            sys.exit("no start file within 30 s")
        time.sleep(0.0005)


async def run(flow_name: str, db: str, run_id: str, barrier: str | None) -> None:
    flow = FLOWS[flow_name]
    async with sp.SQLiteStore(db, lease=LEASE) as store:
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


async def work_until_sigterm(db: str) -> None:
    """`sp.Worker` serving `chain` until SIGTERM, which stops it gracefully."""
    async with sp.SQLiteStore(db, lease=LEASE) as store, sp.Worker(store, [chain], max_runs=2) as worker:
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


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "run":
        flow_name, db, run_id, backend = sys.argv[2:6]
        barrier = sys.argv[6] if len(sys.argv) > 6 else None
        anyio.run(run, flow_name, db, run_id, barrier, backend=backend)
    elif mode == "worker":
        db, backend = sys.argv[2:4]
        anyio.run(work_until_sigterm, db, backend=backend)
    else:
        sys.exit(f"unknown mode {mode!r}")
