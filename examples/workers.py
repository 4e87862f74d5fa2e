"""Two worker processes share a queue; one is killed mid-run, the other finishes its run; a run is stopped by id.

Run it with `python examples/workers.py`. In a temporary directory, with one SQLite file as the store:

1. it starts this same script twice more as **worker processes** (`python examples/workers.py worker DB NAME`:
   an `sp.Worker` serving the `orders` flow, on a store with a 2-second lease, until SIGTERM);
2. it **submits** run `order-1` and watches the store: once a worker owns the run and its `fetch` step is
   committed, it kills that worker with SIGKILL, in the middle of `transform`. Nobody renews the lease any
   more: two seconds later the run is orphaned, and the other worker claims it (epoch 2) and finishes it;
   `fetch` is not run again (its output comes from the store), `transform` starts over;
3. it submits a long run, `order-2`, and once it is running, stops it by id from a third process, the
   `stoppoint interrupt order-2` command: the worker running it gets the request as an ordinary interrupt,
   `transform` stops at its next stopping point, and the run is stored interrupted;
4. it stops the remaining worker with SIGTERM (it exits 0 once its runs have ended).

It prints the timeline it sees in the store (who owns each run, at which epoch) and the workers print each step.
The same from a shell: `stoppoint worker FILE.py:orders --store DB` (the command's store has the default
15-second lease), `stoppoint submit FILE.py:orders --store DB`, `stoppoint interrupt RUN_ID --store DB`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from pydantic import BaseModel

import stoppoint as sp

LEASE = 2.0  # seconds: a dead worker's runs are claimed by another about this long after its death
WORKER = "submitter"  # this process's name in what the steps print (a worker process gets its own)


class Batch(BaseModel):
    rows: list[int]
    fetched_by: str


orders = sp.Flow("orders")


def say(ctx: sp.StepContext, what: str) -> None:
    print(f"  [{WORKER}] {ctx.run_id} epoch {ctx.epoch}: {what}", flush=True)


@orders.step
async def fetch(ctx: sp.StepContext, parts: int) -> Batch:
    say(ctx, "fetch")
    await anyio.sleep(0.3)
    return Batch(rows=list(range(1, parts + 1)), fetched_by=f"{WORKER} at epoch {ctx.epoch}")


@orders.step
async def transform(ctx: sp.StepContext, fetch: Batch) -> int:
    say(ctx, f"transform, {len(fetch.rows)} parts")
    total = 0
    async for row in ctx.iterate(fetch.rows):  # a stopping point before each part
        ctx.progress(row - 1, len(fetch.rows), f"part {row}")
        await anyio.sleep(0.1)  # pretend to work on it
        total += row * row
    ctx.progress(len(fetch.rows), len(fetch.rows), "done")
    return total


@orders.step
async def publish(ctx: sp.StepContext, fetch: Batch, transform: int) -> str:
    say(ctx, "publish")
    await anyio.sleep(0.3)
    return f"total {transform} published by {WORKER} at epoch {ctx.epoch} (fetched by {fetch.fetched_by})"


# -- a worker process ------------------------------------------------------------------------------------------


async def serve(db: Path) -> None:
    """Serve `orders` until SIGTERM (or Ctrl-C), which stops the worker gracefully."""
    async with sp.SQLiteStore(db, lease=LEASE) as store, sp.Worker(store, [orders], max_runs=2) as worker:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:

                async def obey() -> None:
                    async for _ in signals:
                        print(f"  [{WORKER}] stopping", flush=True)
                        worker.stop()
                        return

                tg.start_soon(obey)
                print(f"  [{WORKER}] pid {os.getpid()}: serving flow orders (lease {LEASE:g} s)", flush=True)
                await worker.run()
                tg.cancel_scope.cancel()
    print(f"  [{WORKER}] stopped", flush=True)


# -- the narrator: submits, watches, kills, interrupts ---------------------------------------------------------


class Narrator:
    def __init__(self, db: Path, workers: dict[str, subprocess.Popen[str]]) -> None:
        self.db = db
        self.workers = workers
        self.t0 = time.monotonic()
        self.seen: dict[str, tuple[sp.RunStatus, str | None, int]] = {}  # what was printed last, by run

    def say(self, what: str) -> None:
        print(f"{time.monotonic() - self.t0:5.1f} s  {what}", flush=True)

    def owner_name(self, owner: str | None) -> str:
        """The worker's name for an owner `host:pid/token`."""
        if owner is None:
            return "nobody"
        pid = int(owner.rpartition(":")[2].partition("/")[0])
        return next((name for name, proc in self.workers.items() if proc.pid == pid), owner)

    async def watch(
        self, store: sp.SQLiteStore, run_id: str, *, until: set[sp.RunStatus] | None = None, need: str | None = None
    ) -> sp.StoredRun:
        """Print each change of the run's status, owner and epoch; return it once its status is in `until`,
        or, with `need`, once it is owned and step `need` is committed (bounded: 30 s)."""
        with anyio.fail_after(30):
            while True:
                stored = await store.load(orders.name, run_id)
                assert stored is not None
                record = stored.record
                now = (record.status, record.owner, record.epoch)
                if now != self.seen.get(run_id):
                    self.seen[run_id] = now
                    owner = f", owner {self.owner_name(record.owner)}" if record.owner else ""
                    self.say(f"{run_id}: {record.status.value}{owner}, epoch {record.epoch}")
                if until is not None and record.status in until:
                    return stored
                if need is not None and record.owner and need in orders.load_checkpoint(stored.checkpoint_json).outputs:
                    return stored
                await anyio.sleep(0.05)

    async def interrupt_from_a_third_process(self, run_id: str) -> None:
        command = [sys.executable, "-m", "stoppoint", "interrupt", run_id, "--store", str(self.db)]
        self.say(f"$ stoppoint interrupt {run_id} --store {self.db.name} --reason ...")
        done = await anyio.run_process([*command, "--reason", "customer cancelled"], check=False)
        for line in done.stdout.decode().splitlines():
            self.say(f"  {line}")
        if done.returncode != 0:
            raise SystemExit(f"stoppoint interrupt failed: {done.stderr.decode()}")


async def narrate(db: Path, workers: dict[str, subprocess.Popen[str]]) -> None:
    story = Narrator(db, workers)
    async with sp.SQLiteStore(db, lease=LEASE) as store:
        # 1. A run that loses its worker half-way.
        await orders.submit(store, {"parts": 10}, run_id="order-1")
        story.say("submitted order-1 (10 parts)")
        stored = await story.watch(store, "order-1", need="fetch")
        victim = story.owner_name(stored.record.owner)
        story.say(f"killing {victim} (pid {workers[victim].pid}) with SIGKILL: it owns order-1, in transform")
        workers[victim].kill()
        workers[victim].wait()
        stored = await story.watch(store, "order-1", until={sp.RunStatus.COMPLETED})
        report = sp.RunReport.model_validate_json(stored.report_json)
        value = orders.load_checkpoint(stored.checkpoint_json).outputs["publish"]
        story.say(f"order-1: {stored.record.status.value} at epoch {stored.record.epoch}: {value}")
        resumed = [name for name, step in report.steps.items() if step.resumed]
        story.say(f"order-1: steps taken from the store, not run again: {', '.join(resumed)}")
        survivor = next(name for name in workers if name != victim)
        story.say(f"the killed worker's run was completed by {survivor} at epoch {stored.record.epoch}")

        # 2. A run stopped by id, from another process.
        await orders.submit(store, {"parts": 100}, run_id="order-2")
        story.say("submitted order-2 (100 parts)")
        await story.watch(store, "order-2", need="fetch")
        await story.interrupt_from_a_third_process("order-2")
        stored = await story.watch(store, "order-2", until={sp.RunStatus.INTERRUPTED})
        report = sp.RunReport.model_validate_json(stored.report_json)
        step = report.steps["transform"]
        progress = step.progress
        where = f" after {progress.done:g} of {progress.total or 0:g} parts" if progress is not None else ""
        [request] = report.interrupts
        story.say(
            f"order-2: stored {stored.record.status.value}: transform {step.status.value}{where}, "
            f"'{request.reason}' (from {request.source})"
        )

    # 3. The survivor stops: SIGTERM, graceful.
    story.say(f"stopping {survivor} with SIGTERM")
    workers[survivor].send_signal(signal.SIGTERM)
    code = workers[survivor].wait(timeout=30)
    story.say(f"{survivor} exited with code {code}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "runs.db"
        workers = {
            name: subprocess.Popen([sys.executable, "-u", __file__, "worker", str(db), name], text=True)
            for name in ("worker-1", "worker-2")
        }
        try:
            anyio.run(narrate, db, workers)
        finally:
            for proc in workers.values():
                if proc.poll() is None:
                    proc.kill()
                proc.wait()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        WORKER = sys.argv[3]
        anyio.run(serve, Path(sys.argv[2]))
    else:
        main()
