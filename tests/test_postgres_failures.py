"""`PostgresStore` under failure, against a real server, in real processes (API.md §9-§10, issue 15): an owner
killed mid-step, an owner stopped past its lease, an owner cut off from the server, and a server restarted
under a running run.

Every owner and worker is a child process (`tests/pg_child.py`, a 1 s lease) that appends `EVENT NAME PID
EPOCH WALLTIME` lines to a side log (tests/lease_child.py's `note()`); the test orders things by those
lines, by files it writes (go files), and by what the server holds, read directly (`steps` rows and their
epochs). The only waits are bounded ones, for states only another process or the lease's clock changes
(`until()`), and every child is killed in a `finally`. Latencies are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, LiteralString

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import stoppoint as sp

from . import pg, pg_child
from .conftest import until
from .pg import PgTarget
from .test_hardening_store import wait_for_line
from .test_leases_processes import HANG_GUARD, LEASE, Side, children, ended, other

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

Rows = dict[str, tuple[int, str | None]]
"""A run's `steps` rows as the server holds them: (epoch, checkpoint) by step."""


def run_child(
    flow: str, target: PgTarget, run_id: str, backend: str, *options: str, dsn: str | None = None
) -> tuple[str, ...]:
    """The argv of a child that runs `flow` with `run_id` on the store at `target` (connecting with `dsn`
    instead of the target's own, if given: another role); `options`: `--after FILE`, `--hold FILE`."""
    return ("-m", "tests.pg_child", "run", flow, dsn or target.dsn, target.schema, run_id, backend, *options)


def ready(child: subprocess.Popen[str]) -> None:
    """Wait (bounded) for a child started with `--after` to say it is ready (its store open)."""
    assert child.stdout is not None
    line = wait_for_line(child.stdout, HANG_GUARD)
    assert line == "ready\n", (line, child.stderr.read() if child.stderr and child.poll() is not None else "")


def worker_child(target: PgTarget, backend: str) -> tuple[str, ...]:
    return ("-m", "tests.pg_child", "worker", target.dsn, target.schema, backend)


@contextlib.asynccontextmanager
async def opened(target: PgTarget) -> AsyncIterator[sp.PostgresStore]:
    """The test's own store on the target (as the target's user), with the children's lease."""
    async with sp.PostgresStore(target.dsn, schema=target.schema, lease=LEASE) as store:
        yield store


async def status_of(store: sp.Store, run_id: str) -> sp.RunStatus | None:
    return next((found.status for found in await store.list_runs() if found.run_id == run_id), None)


def execute(dsn: str, *statements: sql.Composable | LiteralString) -> list[tuple[Any, ...]]:
    """Run `statements` on a connection of its own (autocommit); the rows of the last one."""
    rows: list[tuple[Any, ...]] = []
    with psycopg.connect(dsn, connect_timeout=pg.CONNECT_TIMEOUT, autocommit=True) as conn:
        for statement in statements:
            cursor = conn.execute(statement)
            rows = cursor.fetchall() if cursor.description is not None else []
    return rows


def step_rows(target: PgTarget, run_id: str) -> Rows:
    """The run's `steps` rows, read directly from the server."""
    query = sql.SQL("SELECT step, epoch, checkpoint FROM {}.steps WHERE run_id = {}").format(
        sql.Identifier(target.schema), sql.Literal(run_id)
    )
    return {step: (epoch, checkpoint) for step, epoch, checkpoint in execute(target.dsn, query)}


def outputs(store_run: sp.StoredRun | None, flow: sp.Flow) -> dict[str, Any]:
    assert store_run is not None
    return dict(flow.load_checkpoint(store_run.checkpoint_json).outputs)


# -- 1. a killed owner's run, recovered by a worker --------------------------------------------------------------


async def test_an_owner_killed_mid_step_is_resumed_by_a_worker_in_another_process(
    pg_schema: PgTarget, tmp_path: Path, anyio_backend: str
) -> None:
    """An owner SIGKILLed while its step `b` runs: a worker in another process (`sp.Worker` on the server)
    claims the orphaned run within lease + 2 s of the kill and runs `b` again under the next epoch, then `c`;
    `a`, committed before the kill, is not run again, and its row stays the dead owner's."""
    side = Side(tmp_path)
    with children(side) as spawn:
        worker = spawn(*worker_child(pg_schema, anyio_backend))
        owner = spawn(*run_child("chain", pg_schema, "killed", other(anyio_backend)))
        # The worker serves before the kill: its start-up is not part of what is measured.
        assert worker.stdout is not None
        assert wait_for_line(worker.stdout, HANG_GUARD) == "serving\n"
        await side.wait("START", "b", owner.pid)
        side.go.touch()  # b goes on in whoever runs it next (the owner dies first: it is killed right now)
        os.kill(owner.pid, signal.SIGKILL)
        killed_at = time.time()
        ended(owner)
        async with opened(pg_schema) as store:

            async def completed() -> bool:
                return await status_of(store, "killed") is sp.RunStatus.COMPLETED

            await until(completed, within=LEASE + HANG_GUARD)
            done_at = time.time()
            [done] = await store.list_runs("chain")
            stored = await store.load("chain", "killed")
        worker.send_signal(signal.SIGTERM)
        code, _, err = ended(worker)
        assert code == 0, err
    assert (done.status, done.epoch, done.owner) == (sp.RunStatus.COMPLETED, 2, None)
    assert side.where("WORKER", "stopped", worker.pid)
    [taken] = side.where("START", "b", worker.pid)
    assert taken.epoch == 2
    assert [(line.pid, line.epoch) for line in side.where("START", "a")] == [(owner.pid, 1)]  # not run again
    assert [(line.pid, line.epoch) for line in side.where("START", "b")] == [(owner.pid, 1), (worker.pid, 2)]
    assert [(line.pid, line.epoch) for line in side.where("START", "c")] == [(worker.pid, 2)]
    assert {step: epoch for step, (epoch, _) in step_rows(pg_schema, "killed").items()} == {"a": 1, "b": 2, "c": 2}
    assert outputs(stored, pg_child.chain) == {
        "a": f"a@{owner.pid}/1",
        "b": f"b@{worker.pid}/2",
        "c": f"a@{owner.pid}/1 b@{worker.pid}/2 c@{worker.pid}/2",
    }
    claim_delay = taken.at - killed_at
    print(
        f"killed owner ({anyio_backend} worker): b resumed {claim_delay:.2f} s after the kill, "
        f"run completed {done_at - killed_at:.2f} s after it (lease {LEASE:g} s)"
    )
    assert claim_delay <= LEASE + 2.0  # API.md §9: within lease + 2 s of its owner's death


# -- 2. a stopped owner is fenced ------------------------------------------------------------------------------


async def test_an_owner_stopped_past_its_lease_writes_nothing_after_another_claimed(
    pg_schema: PgTarget, tmp_path: Path, anyio_backend: str
) -> None:
    """Owner A SIGSTOPped in step `b` past its lease; B (another process, the other backend) claims the run
    (epoch 2) and finishes it; A is SIGCONTed: it starts no step, its run ends with LeaseLost, and the server's
    rows are exactly as B left them: `a` of epoch 1 (committed before the stop, not run again), `b` and `c`
    of epoch 2. A may finish the step it was in (its code runs on after SIGCONT), but that END is never
    stored."""
    side = Side(tmp_path)
    with children(side) as spawn:
        zombie = spawn(*run_child("chain", pg_schema, "zombie", anyio_backend))
        take = tmp_path / "take"
        taker = spawn(*run_child("chain", pg_schema, "zombie", other(anyio_backend), "--after", str(take)))
        await side.wait("START", "b", zombie.pid)
        os.kill(zombie.pid, signal.SIGSTOP)
        before = step_rows(pg_schema, "zombie")  # what A committed before it stopped (it writes nothing now)
        assert before["a"][0] == 1
        assert before["a"][1] is not None  # a's output
        async with opened(pg_schema) as store:

            async def orphaned() -> bool:
                return await status_of(store, "zombie") is sp.RunStatus.ORPHANED

            await until(orphaned, within=LEASE + HANG_GUARD)
            side.go.touch()
            ready(taker)
            take.touch()
            code, _, err = ended(taker)
            assert code == 0, err
            [completed] = side.where("OUTCOME", "completed")
            assert completed.pid == taker.pid
            after_takeover = step_rows(pg_schema, "zombie")
            woke_at = time.time()
            os.kill(zombie.pid, signal.SIGCONT)
            code, _, err = ended(zombie)
            assert code == 0, err
            [done] = await store.list_runs("chain")
            stored = await store.load("chain", "zombie")
    [lost] = side.where("OUTCOME", "lease_lost", zombie.pid)
    assert lost.epoch == 1
    zombie_lines = side.where(pid=zombie.pid)
    assert not [line for line in zombie_lines if line.name == "c"]
    assert not [line for line in zombie_lines if line.at >= woke_at and line.event == "START"]
    assert (done.status, done.epoch, done.owner) == (sp.RunStatus.COMPLETED, 2, None)
    rows = step_rows(pg_schema, "zombie")
    assert rows == after_takeover, "the fenced owner wrote to the server after it woke"
    assert {step: epoch for step, (epoch, _) in rows.items()} == {"a": 1, "b": 2, "c": 2}
    assert rows["a"] == before["a"]
    assert outputs(stored, pg_child.chain) == {
        "a": f"a@{zombie.pid}/1",
        "b": f"b@{taker.pid}/2",
        "c": f"a@{zombie.pid}/1 b@{taker.pid}/2 c@{taker.pid}/2",
    }
    assert [line.pid for line in side.where("START", "a")] == [zombie.pid]
    woke = [f"{line.event} {line.name}" for line in zombie_lines if line.at >= woke_at]
    print(f"fenced ({anyio_backend}): after SIGCONT the zombie logged {woke}")
    print(f"fenced: the zombie reported LeaseLost {lost.at - woke_at:.3f} s after SIGCONT")


# -- 3. an owner cut off from the server ---------------------------------------------------------------------------


@contextlib.contextmanager
def own_role(target: PgTarget) -> Iterator[tuple[str, str]]:
    """A login role of its own with the rights a store needs on the target's schema (created first, by the
    test's own store), and a DSN connecting as it; the role is dropped (its backends ended first) after."""
    role = f"stoppoint_part_{uuid.uuid4().hex[:16]}"
    name, schema = sql.Identifier(role), sql.Identifier(target.schema)
    execute(target.dsn, sql.SQL("CREATE ROLE {} LOGIN").format(name))
    try:
        execute(
            target.dsn,
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, name),
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}").format(schema, name),
            sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(schema, name),
        )
        yield role, make_conninfo(target.dsn, user=role)
    finally:
        execute(
            target.dsn,
            sql.SQL("ALTER ROLE {} NOLOGIN").format(name),
            sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {}").format(
                sql.Literal(role)
            ),
            sql.SQL("DROP OWNED BY {}").format(name),  # (its grants)
            sql.SQL("DROP ROLE {}").format(name),
        )


def cut_off(dsn: str, role: str) -> int:
    """The partition: `role` may not log in any more, and its connections are ended. How many were."""
    name = sql.Identifier(role)
    rows = execute(
        dsn,
        sql.SQL("ALTER ROLE {} NOLOGIN").format(name),
        sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {}").format(sql.Literal(role)),
    )
    return sum(1 for (ended_,) in rows if ended_)


async def test_an_owner_cut_off_from_the_server_stops_before_another_claims_and_writes_nothing_stale(
    pg_schema: PgTarget, tmp_path: Path, anyio_backend: str
) -> None:
    """Owner A connects as a role of its own; mid-step its connections are ended and its role may not log in
    again (a partition: A lives on, the server is out of its reach). A stops its step (self-fencing at 0.8 x
    lease, before its lease expires on the server) before B, connecting as postgres, claims the run once the
    lease expired, and its `run()` ends with LeaseLost (or StoreError) within about a lease of the cut, not
    after waiting for a connection it cannot get. B finishes the run; then the partition heals while A is
    still alive (its store open): A connects again and writes nothing (no row of epoch 1 but `a`, committed
    before the cut; the rows are as B left them)."""
    side = Side(tmp_path)
    async with opened(pg_schema) as store:  # (creates the schema, so the role can be granted its tables)
        with own_role(pg_schema) as (role, role_dsn), children(side) as spawn:
            hold = tmp_path / "hold"  # A keeps its store open until this file exists
            owner = spawn(*run_child("chain", pg_schema, "cut", anyio_backend, "--hold", str(hold), dsn=role_dsn))
            take = tmp_path / "take"
            taker = spawn(*run_child("chain", pg_schema, "cut", other(anyio_backend), "--after", str(take)))
            await side.wait("START", "b", owner.pid)
            before = step_rows(pg_schema, "cut")
            assert {step: epoch for step, (epoch, _) in before.items()} == {"a": 1}
            cut_at = time.time()
            assert cut_off(pg_schema.dsn, role) >= 1  # its pool's and its listener's connections

            async def orphaned() -> bool:
                return await status_of(store, "cut") is sp.RunStatus.ORPHANED

            await until(orphaned, within=LEASE + HANG_GUARD)
            orphaned_at = time.time()
            side.go.touch()  # b may now end, in whoever runs it
            ready(taker)
            take.touch()
            code, _, err = ended(taker)
            assert code == 0, err
            after_takeover = step_rows(pg_schema, "cut")
            [outcome] = await side.wait("OUTCOME", pid=owner.pid)  # before the heal
            healed_at = time.time()
            execute(pg_schema.dsn, sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))

            async def reconnected() -> bool:  # A's listener, or its pool, logged in again
                query = sql.SQL("SELECT count(*) FROM pg_stat_activity WHERE usename = {}").format(sql.Literal(role))
                return int(execute(pg_schema.dsn, query)[0][0]) >= 1

            await until(reconnected, within=HANG_GUARD)
            reconnected_at = time.time()
            hold.touch()
            code, _, err = ended(owner)
            assert code == 0, err
            rows = step_rows(pg_schema, "cut")
            [done] = await store.list_runs("chain")
            stored = await store.load("chain", "cut")
    assert outcome.name in ("lease_lost", "store_error"), outcome
    [stopped] = side.where("STOP", "b", owner.pid)
    [taken] = side.where("START", "b", taker.pid)
    assert taken.epoch == 2
    # A stopped its step before B claimed (B's b starts after its claim), and before its lease expired.
    assert stopped.at < orphaned_at <= taken.at
    assert not [line for line in side.where(pid=owner.pid) if line.at >= taken.at and line.event != "OUTCOME"]
    # Its run() did not wait for the pool's connections (it waited 15 s for one): a lease after the fence at most.
    assert outcome.at - stopped.at < 2 * LEASE, f"run() ended {outcome.at - stopped.at:.2f} s after its step stopped"
    # Nothing stale: the rows are as B left them, a (of epoch 1) as it was before the cut.
    assert rows == after_takeover, "the cut-off owner wrote to the server after the partition healed"
    assert {step: epoch for step, (epoch, _) in rows.items()} == {"a": 1, "b": 2, "c": 2}
    assert rows["a"] == before["a"]
    assert (done.status, done.epoch, done.owner) == (sp.RunStatus.COMPLETED, 2, None)
    assert outputs(stored, pg_child.chain) == {
        "a": f"a@{owner.pid}/1",
        "b": f"b@{taker.pid}/2",
        "c": f"a@{owner.pid}/1 b@{taker.pid}/2 c@{taker.pid}/2",
    }
    print(
        f"partition ({anyio_backend}): A stopped b {stopped.at - cut_at:.3f} s after the cut, the lease was seen "
        f"expired {orphaned_at - cut_at:.3f} s after it, B claimed at {taken.at - cut_at:.3f} s; A's run ended "
        f"({outcome.name}) {outcome.at - cut_at:.3f} s after the cut; after the heal A connected again in "
        f"{reconnected_at - healed_at:.3f} s and wrote nothing"
    )


# -- 4. the server restarted mid-run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def restartable() -> Iterator[pg.ThrowawayCluster]:
    """A throwaway cluster for this module's restarts (each test in a schema of its own), or the test skips
    (fails in CI) saying why there is none."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(pg.throwaway_cluster())
        except pg.NoServer as error:
            pg.unavailable(error)
        yield cluster


@pytest.mark.parametrize(
    ("lease", "anyio_backend"),
    [(LEASE, "asyncio"), (LEASE, "trio"), (5.0, "asyncio")],
    ids=["short-lease-asyncio", "short-lease-trio", "long-lease-asyncio"],
)
async def test_a_server_restart_mid_run_is_survived_or_stops_the_run_and_a_resume_finishes_it(
    restartable: pg.ThrowawayCluster, tmp_path: Path, anyio_backend: str, lease: float
) -> None:
    """A run of `relay` (s1 -> s2 -> s3 -> s4) in a child process, in s2 with s1's row committed, when its
    server (a throwaway cluster) is restarted (`pg_ctl restart -m fast`). The run either goes on after
    reconnecting or stops with LeaseLost or StoreError; then `relay.run(store=..., run_id=...)` in another
    process finishes it (or returns it completed): no step whose row was committed runs again. With a 5 s
    lease the run must go on: the restart and the reconnection fit in 0.8 x lease. (With the 1 s lease they
    do not: psycopg_pool waits about a second before it connects again, so the owner self-fences.)"""
    side = Side(tmp_path)
    go = {step: side.go.with_name(f"go.{step}") for step in ("s1", "s2", "s3", "s4")}
    target = PgTarget(restartable.dsn, pg.unique_schema())
    with children(side) as spawn:
        first = spawn(*run_child("relay", target, "restart", anyio_backend, "--lease", str(lease)))
        go["s1"].touch()
        await side.wait("START", "s2", first.pid)  # s2 starts once s1's row is committed
        before = step_rows(target, "restart")
        assert {step: epoch for step, (epoch, _) in before.items()} == {"s1": 1}
        restart_began = time.time()
        await anyio.to_thread.run_sync(restartable.restart)
        restarted_at = time.time()
        go["s2"].touch()
        resume = tmp_path / "resume"  # (started now, it is ready by the time the first run is over)
        resumer = spawn(*run_child("relay", target, "restart", other(anyio_backend), "--after", str(resume)))

        async def went_on_or_stopped() -> bool:
            return bool(side.where("START", "s3", first.pid) or side.where("OUTCOME", pid=first.pid))

        await until(went_on_or_stopped, within=HANG_GUARD)
        go["s3"].touch()
        go["s4"].touch()
        [outcome] = await side.wait("OUTCOME", pid=first.pid)
        code, _, err = ended(first)
        assert code == 0, err
        assert outcome.name in ("completed", "lease_lost", "store_error"), outcome
        async with opened(target) as store:

            async def not_held() -> bool:  # a self-fenced owner leaves its lease to expire
                return await status_of(store, "restart") is not sp.RunStatus.RUNNING

            await until(not_held, within=LEASE + HANG_GUARD)
            committed = step_rows(target, "restart")
            ready(resumer)
            resume.touch()
            code, _, err = ended(resumer)
            assert code == 0, err
            [done] = await store.list_runs("relay")
            stored = await store.load("relay", "restart")
    [resumed] = side.where("OUTCOME", pid=resumer.pid)
    assert resumed.name == "completed"  # it finished the run, or found it completed
    assert done.status is sp.RunStatus.COMPLETED
    starts = {step: [(line.pid, line.epoch) for line in side.where("START", step)] for step in go}
    assert starts["s1"] == [(first.pid, 1)]  # committed before the restart: never run again
    for step, (epoch, checkpoint) in committed.items():
        if checkpoint is not None:  # a committed output: the resume did not run its step again
            assert (resumer.pid, 2) not in starts[step], f"{step} (committed at epoch {epoch}) ran again"
    value = outputs(stored, pg_child.relay)["s4"]
    print(
        f"restart ({anyio_backend}, lease {lease:g} s): pg_ctl restart took {restarted_at - restart_began:.2f} s; "
        f"the first owner's run: {outcome.name} {outcome.more!r}; steps' rows before the resume: "
        f"{ {step: epoch for step, (epoch, _) in committed.items()} }; who ran each: {value}"
    )
    if lease > LEASE:
        assert outcome.name == "completed", outcome
    if outcome.name == "completed":  # the resume returned the stored outcome: it ran nothing
        assert done.epoch == 1
        assert all(runs == [(first.pid, 1)] for runs in starts.values()), starts
        assert resumed.more == outcome.more
    else:
        assert done.epoch == 2
        assert starts["s4"] == [(resumer.pid, 2)]


async def test_after_a_server_restart_an_operation_retried_on_a_new_connection_succeeds(
    restartable: pg.ThrowawayCluster, anyio_backend: str
) -> None:
    """A restart ends every pooled connection, not just the one an operation is given. An operation that is
    retried on a new connection when its connection was broken (a read, a renewal, a step's commit) must
    succeed at its first call after the restart, whatever number of broken connections the pool held: the
    retry is not made on the next broken one (which would fail a run's renewal or commit for nothing)."""
    target = PgTarget(restartable.dsn, pg.unique_schema())
    query = sql.SQL("SELECT count(*) FROM pg_stat_activity WHERE application_name = {}").format(
        sql.Literal(f"stoppoint pool {target.schema}")  # the store's pooled connections
    )
    async with opened(target) as store:

        async def pool_grew() -> bool:  # loads at once, until the pool holds 3 connections
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(store.list_runs)
            return int(execute(target.dsn, query)[0][0]) >= 3

        await until(pool_grew, within=HANG_GUARD)
        await anyio.to_thread.run_sync(restartable.restart)
        assert execute(target.dsn, query) == [(0,)]  # none of them survived
        assert await store.list_runs() == []
        assert await store.load("relay", "nothing") is None
