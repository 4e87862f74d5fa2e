"""Three replicas of one HTTP service share a PostgreSQL store: any replica takes requests for any run.

Run it with `python examples/replicas.py [DSN]` (default `postgresql://postgres@127.0.0.1:5432/postgres`; it
needs `pip install 'stoppoint[postgres,service]'`). Each replica is this same script in a process of its own
(`python examples/replicas.py replica DSN SCHEMA NAME FD`): a Starlette app on uvicorn whose lifespan opens a
`PostgresStore` and runs an `sp.Worker` beside the HTTP routes:

    GET  /runs                  the runs in the store, with their owners and epochs
    GET  /runs/{id}             one run: status, owner, epoch, steps (and the result once completed)
    POST /runs                  submit a run: {"parts": N, "run_id": "..."} -> 201 {"run_id": ...}
    POST /runs/{id}/interrupt   ask the run to stop, wherever it runs: {"reason": "..."} -> 202
    POST /runs/{id}/resume      queue a stopped run again, to go on from its checkpoint -> 202

The runs are the store's, not a replica's: a request to any replica sees and controls every run. This script
starts three replicas on one schema of its own (`replicas_demo_<hex>`, dropped at the end), then:

1. submits `order-1` through replica-1, finds the replica whose worker claimed it, and SIGKILLs that replica in
   the middle of `transform`. Nobody renews the lease any more: two seconds later the run is orphaned, another
   replica claims it (epoch 2) and finishes it; `fetch` is not run again (its output is in the store);
2. submits `order-2`, and sends the stop request to a replica that does NOT run it: the owner hears of it
   through the store (a NOTIFY) and stops at its next stopping point; the run is stored interrupted. A
   `resume` through another replica queues it again, and it completes;
3. submits `order-3` and sends SIGTERM to the replica running it: uvicorn ends the lifespan, whose worker stops
   gracefully: the run stops at a stopping point and is queued again, released (no lease to wait out), and the
   last replica claims it at once and finishes it; then SIGTERM ends the last replica too. (uvicorn, once
   its shutdown is done, ends the process by the signal it got: exit status -15, as a supervisor expects.)

It prints what it sees over HTTP; the replicas print their steps. docs/guides/replicas.md walks through it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from pydantic import BaseModel

import stoppoint as sp

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
LEASE = 2.0  # seconds: a dead replica's runs are claimed by another about this long after its death
REPLICA = "narrator"  # this process's name in what the steps print (a replica gets its own)


# -- the flow ------------------------------------------------------------------------------------------------


class Batch(BaseModel):
    rows: list[int]
    fetched_by: str


orders = sp.Flow("orders")
FLOWS = {orders.name: orders}


def say(ctx: sp.StepContext, what: str) -> None:
    print(f"  [{REPLICA}] {ctx.run_id} epoch {ctx.epoch}: {what}", flush=True)


@orders.step
async def fetch(ctx: sp.StepContext, parts: int) -> Batch:
    say(ctx, "fetch")
    await anyio.sleep(0.2)
    return Batch(rows=list(range(1, parts + 1)), fetched_by=f"{REPLICA} at epoch {ctx.epoch}")


@orders.step
async def transform(ctx: sp.StepContext, fetch: Batch) -> int:
    say(ctx, f"transform, {len(fetch.rows)} parts")
    total = 0
    async for row in ctx.iterate(fetch.rows):  # a stopping point before each part
        ctx.progress(row - 1, len(fetch.rows), f"part {row}")
        await anyio.sleep(0.05)  # pretend to work on it
        total += row * row
    ctx.progress(len(fetch.rows), len(fetch.rows), "done")
    return total


@orders.step
async def publish(ctx: sp.StepContext, fetch: Batch, transform: int) -> str:
    # A step can run more than once: its replica may die after the effect and before the step is stored. The
    # effect is keyed by run and step, so that a second attempt (ctx.epoch > 1) finds it done instead of
    # doing it twice; the epoch only says which attempt this is.
    key = f"{ctx.run_id}:{ctx.step}"
    say(ctx, f"publish (idempotency key {key})")
    return f"total {transform} published by {REPLICA} at epoch {ctx.epoch} (fetched by {fetch.fetched_by})"


# -- a replica: the HTTP service, with a worker in its lifespan ----------------------------------------------


def replica_app(dsn: str, schema: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        """Open the store and start the worker before the first request; on shutdown (SIGTERM, SIGINT: uvicorn
        stops taking requests, then ends the lifespan) stop the worker: its runs stop at their next stopping
        point and are queued again, released, for the other replicas."""
        async with sp.PostgresStore(dsn, schema=schema, lease=LEASE) as store:
            worker = sp.Worker(store, list(FLOWS.values()), max_runs=4)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                print(f"  [{REPLICA}] pid {os.getpid()}: serving HTTP, worker on (lease {LEASE:g} s)", flush=True)
                yield {"store": store}
                print(f"  [{REPLICA}] shutting down: stopping the worker", flush=True)
                worker.stop()  # run() returns once the runs have stopped and are stored queued
            print(f"  [{REPLICA}] worker stopped", flush=True)

    async def find(store: sp.PostgresStore, run_id: str) -> sp.StoredRun | None:
        for flow in FLOWS:
            stored = await store.load(flow, run_id)
            if stored is not None:
                return stored
        return None

    def record_json(record: sp.RunRecord) -> dict[str, Any]:
        return {
            "run_id": record.run_id,
            "flow": record.flow,
            "status": record.status.value,
            "owner": record.owner,
            "epoch": record.epoch,
            "queue": record.queue,
        }

    def not_found(run_id: str) -> JSONResponse:
        return JSONResponse({"error": f"no run {run_id!r}"}, status_code=404)

    async def list_runs(request: Request) -> JSONResponse:
        records = await request.state.store.list_runs()
        return JSONResponse({"replica": REPLICA, "runs": [record_json(record) for record in records]})

    async def get_run(request: Request) -> JSONResponse:
        run_id = request.path_params["run_id"]
        stored = await find(request.state.store, run_id)
        if stored is None:
            return not_found(run_id)
        report = sp.RunReport.model_validate_json(stored.report_json)
        checkpoint = FLOWS[stored.record.flow].load_checkpoint(stored.checkpoint_json)
        steps = {
            name: {
                "status": step.status.value,
                "resumed": step.resumed,
                "progress": step.progress.model_dump() if step.progress is not None else None,
            }
            for name, step in report.steps.items()
        }
        interrupts = [{"reason": signal.reason, "source": signal.source} for signal in report.interrupts]
        result = checkpoint.outputs.get("publish") if stored.record.status is sp.RunStatus.COMPLETED else None
        return JSONResponse(
            {
                **record_json(stored.record),
                "replica": REPLICA,
                "steps": steps,
                "interrupts": interrupts,
                "result": result,
            }
        )

    async def submit_run(request: Request) -> JSONResponse:
        body = await request.json()
        try:
            run_id = await orders.submit(request.state.store, {"parts": body["parts"]}, run_id=body.get("run_id"))
        except (KeyError, sp.FlowInputError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse({"run_id": run_id, "replica": REPLICA}, status_code=201)

    async def interrupt_run(request: Request) -> JSONResponse:
        run_id = request.path_params["run_id"]
        store: sp.PostgresStore = request.state.store
        stored = await find(store, run_id)
        if stored is None:
            return not_found(run_id)
        reason = (await request.json()).get("reason", "stopped over HTTP")
        requested = await store.interrupt(stored.record.flow, run_id, reason, source=f"http via {REPLICA}")
        return JSONResponse({"requested": requested, "replica": REPLICA}, status_code=202 if requested else 409)

    async def resume_run(request: Request) -> JSONResponse:
        run_id = request.path_params["run_id"]
        stored = await find(request.state.store, run_id)
        if stored is None:
            return not_found(run_id)
        await FLOWS[stored.record.flow].submit(request.state.store, run_id=run_id)  # queued again, same inputs
        return JSONResponse({"run_id": run_id, "replica": REPLICA}, status_code=202)

    return Starlette(
        routes=[
            Route("/runs", list_runs, methods=["GET"]),
            Route("/runs", submit_run, methods=["POST"]),
            Route("/runs/{run_id}", get_run, methods=["GET"]),
            Route("/runs/{run_id}/interrupt", interrupt_run, methods=["POST"]),
            Route("/runs/{run_id}/resume", resume_run, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def serve_replica(dsn: str, schema: str, fd: int) -> None:
    """Serve HTTP on the listening socket `fd` (opened by the narrator) until SIGTERM or SIGINT."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(replica_app(dsn, schema), log_level="warning", lifespan="on"))
    server.run(sockets=[socket.socket(fileno=fd)])


# -- the narrator: starts the replicas, talks to them over HTTP, kills one --------------------------------------


class Replicas:
    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        self.t0 = time.monotonic()

    def start(self, name: str) -> None:
        sock = socket.create_server(("127.0.0.1", 0))  # listening before the replica starts: no port race
        fd = sock.fileno()
        command = [sys.executable, "-u", __file__, "replica", self.dsn, self.schema, name, str(fd)]
        self.procs[name] = subprocess.Popen(command, pass_fds=[fd])
        self.urls[name] = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sock.close()  # the replica's copy listens; a killed replica's port then refuses connections

    def say(self, what: str) -> None:
        print(f"{time.monotonic() - self.t0:5.1f} s  {what}", flush=True)

    def name_of(self, owner: str | None) -> str:
        """The replica's name for an owner `host:pid/token`."""
        if owner is None:
            return "nobody"
        pid = int(owner.rpartition(":")[2].partition("/")[0])
        return next((name for name, proc in self.procs.items() if proc.pid == pid), owner)

    def alive(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]


async def narrate(replicas: Replicas) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        seen: dict[str, tuple[str, str | None, int]] = {}

        async def get(name: str, run_id: str) -> dict[str, Any]:
            response = await http.get(f"{replicas.urls[name]}/runs/{run_id}")
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            now = (data["status"], data["owner"], data["epoch"])
            if now != seen.get(run_id):
                seen[run_id] = now
                owner = f", owner {replicas.name_of(data['owner'])}" if data["owner"] else ""
                replicas.say(f"{run_id}: {data['status']}{owner}, epoch {data['epoch']} (asked {name})")
            return data

        async def wait(
            name: str, run_id: str, *, until: str | None = None, epoch: int = 0, step: str | None = None
        ) -> dict[str, Any]:
            """Ask replica `name` about the run until its status is `until` (at `epoch` or later), or it is
            running with `step` completed (bounded: 30 s)."""
            with anyio.fail_after(30):
                while True:
                    data = await get(name, run_id)
                    if data["status"] == until and data["epoch"] >= epoch:
                        return data
                    if step and data["status"] == "running" and data["steps"][step]["status"] == "completed":
                        return data
                    await anyio.sleep(0.05)

        async def post(name: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = await http.post(f"{replicas.urls[name]}{path}", json=body)
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data

        with anyio.fail_after(30):  # each replica answers once its lifespan has opened the store
            for name in replicas.urls:
                (await http.get(f"{replicas.urls[name]}/runs")).raise_for_status()
        replicas.say(f"3 replicas up: {', '.join(f'{n} {u}' for n, u in replicas.urls.items())}")

        # 1. A replica dies in the middle of a run.
        await post("replica-1", "/runs", {"parts": 40, "run_id": "order-1"})
        replicas.say("POST /runs to replica-1: submitted order-1 (40 parts)")
        data = await wait("replica-1", "order-1", step="fetch")
        victim = replicas.name_of(data["owner"])
        replicas.say(f"killing {victim} (pid {replicas.procs[victim].pid}) with SIGKILL: it runs order-1, in transform")
        replicas.procs[victim].kill()
        replicas.procs[victim].wait()
        asked = next(name for name in replicas.alive())
        data = await wait(asked, "order-1", until="completed")
        replicas.say(f"order-1: completed at epoch {data['epoch']}: {data['result']}")
        resumed = [name for name, step in data["steps"].items() if step["resumed"]]
        replicas.say(f"order-1: steps taken from the store, not run again: {', '.join(resumed)}")

        # 2. Stopped through a replica that does not run it; resumed through another.
        await post(asked, "/runs", {"parts": 40, "run_id": "order-2"})
        replicas.say(f"POST /runs to {asked}: submitted order-2 (40 parts)")
        data = await wait(asked, "order-2", step="fetch")
        owner = replicas.name_of(data["owner"])
        other = next(name for name in replicas.alive() if name != owner)
        replicas.say(f"order-2 runs on {owner}; POST /runs/order-2/interrupt to {other}")
        answer = await post(other, "/runs/order-2/interrupt", {"reason": "customer cancelled"})
        replicas.say(f"{other} answered: requested {answer['requested']}")
        data = await wait(other, "order-2", until="interrupted")
        progress = data["steps"]["transform"]["progress"]
        [request] = data["interrupts"]
        replicas.say(
            f"order-2: stored interrupted: transform {data['steps']['transform']['status']} after "
            f"{progress['done']:g} of {progress['total']:g} parts, '{request['reason']}' ({request['source']})"
        )
        await post(owner, "/runs/order-2/resume", {})
        replicas.say(f"POST /runs/order-2/resume to {owner}")
        data = await wait(other, "order-2", until="completed")
        replicas.say(f"order-2: completed at epoch {data['epoch']}: {data['result']}")

        # 3. Graceful shutdown: SIGTERM hands the replica's run over at once.
        await post(other, "/runs", {"parts": 40, "run_id": "order-3"})
        replicas.say(f"POST /runs to {other}: submitted order-3 (40 parts)")
        data = await wait(other, "order-3", step="fetch")
        leaving = replicas.name_of(data["owner"])
        staying = next(name for name in replicas.alive() if name != leaving)
        replicas.say(f"sending SIGTERM to {leaving}: it runs order-3")
        replicas.procs[leaving].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        data = await wait(staying, "order-3", until="running", epoch=2)  # queued again, claimed by staying
        replicas.say(
            f"order-3: handed over to {replicas.name_of(data['owner'])} {time.monotonic() - sent:.1f} s after SIGTERM "
            f"(the lease is {LEASE:g} s: released, not left to expire)"
        )
        data = await wait(staying, "order-3", until="completed")
        replicas.say(f"order-3: completed at epoch {data['epoch']}: {data['result']}")
        for name in (leaving, staying):
            if name == staying:
                replicas.say(f"sending SIGTERM to {staying}")
                replicas.procs[staying].send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(replicas.procs[name].wait, 30)
            replicas.say(f"{name} exited: {'on SIGTERM' if code == -signal.SIGTERM else f'code {code}'}")


def drop_schema(dsn: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def main(dsn: str) -> None:
    replicas = Replicas(dsn, f"replicas_demo_{uuid.uuid4().hex[:12]}")
    try:
        for name in ("replica-1", "replica-2", "replica-3"):
            replicas.start(name)
        anyio.run(narrate, replicas)
    finally:
        for proc in replicas.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        drop_schema(dsn, replicas.schema)
        print(f"dropped schema {replicas.schema}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "replica":
        REPLICA = sys.argv[4]
        serve_replica(sys.argv[2], sys.argv[3], int(sys.argv[5]))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DSN)
