"""`PostgresStore` across real processes (API.md §9-§10): workers racing for orphaned runs, interrupts that
must arrive although the owner's LISTEN connection was killed, a queue limit across worker processes,
interrupts from another process, racing claims.

Every child runs `tests/pg_race_child.py` on the test's own schema (the `pg_schema` fixture: dropped after the
test) and appends `EVENT NAME PID EPOCH WALLTIME [MORE]` lines to a side log (`tests/lease_child.py`'s
format, read with `test_leases_processes.Side`). The test orders things by those lines, by files it writes
(start barriers, go files, a gate the child's listener waits for), and by what the store and
`pg_stat_activity` show; the only waits are bounded ones, and every child is killed in a `finally`. The
timings measured are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import psycopg
import pytest

import stoppoint as sp

from . import lease_child, pg_race_child
from .conftest import until
from .pg import PgTarget
from .test_hardening_store import wait_for_line
from .test_leases_processes import HANG_GUARD, Line, Side, children, ended, other

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

DEAD_OWNER = "gone-host:1/deadbeef"
"""The owner of the orphaned runs: a process that claimed them and died."""


def run_child(target: PgTarget, flow: str, lease: float, run_id: str, backend: str, *barrier: Path) -> tuple[str, ...]:
    """The argv of a child that runs `flow` with `run_id` on the test's schema."""
    args = (flow, target.dsn, target.schema, str(lease), run_id, backend, *map(str, barrier))
    return ("-m", "tests.pg_race_child", "run", *args)


def worker_child(
    target: PgTarget, lease: float, backend: str, max_runs: int, queue: str, flows: str, *barrier: Path
) -> tuple[str, ...]:
    """The argv of a child serving `flows` (comma-separated) from `queue` (`name` or `name=limit`)."""
    args = (target.dsn, target.schema, str(lease), backend, str(max_runs), queue, flows, *map(str, barrier))
    return ("-m", "tests.pg_race_child", "worker", *args)


async def records(target: PgTarget) -> list[sp.RunRecord]:
    async with sp.PostgresStore(target.dsn, schema=target.schema) as store:
        return await store.list_runs()


async def record(target: PgTarget, run_id: str) -> sp.RunRecord:
    [found] = [found for found in await records(target) if found.run_id == run_id]
    return found


def serving(workers: list[subprocess.Popen[str]]) -> None:
    """Wait (bounded) until every worker has opened its store."""
    for worker in workers:
        assert worker.stdout is not None
        assert wait_for_line(worker.stdout, HANG_GUARD) == "serving\n", worker.stderr.read() if worker.stderr else ""


def stop_all(workers: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    return [ended(worker) for worker in workers]


def peak_running(starts: list[Line], ends: list[Line]) -> int:
    """The most steps running at once, from their START and END times (an END before a START at a tie)."""
    running = peak = 0
    for _, change in sorted([(line.at, +1) for line in starts] + [(line.at, -1) for line in ends]):
        running += change
        peak = max(peak, running)
    return peak


# -- 1. workers racing for orphaned runs -----------------------------------------------------------------


# The four workers alternate backends (asyncio, trio, ...); this process only prepares and watches.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_four_workers_racing_for_200_orphaned_runs_run_each_step_once(
    tmp_path: Path, anyio_backend: str, pg_schema: PgTarget
) -> None:
    """200 runs claimed (epoch 1) by an owner that died, their leases expired: four worker processes
    (`sp.Worker`, 10 runs at a time each), let go at once, take them all with `claim_next` (`FOR UPDATE SKIP
    LOCKED`): every run is claimed once more (epoch 2), every step of every run runs exactly once, every run
    completes, and each worker gets a share."""
    side = Side(tmp_path)
    barrier = tmp_path / "start"
    runs = 200
    ids = [f"r{n:03}" for n in range(runs)]
    with children(side) as spawn:
        # The workers start first (their start-up overlaps the setup; they open the store, creating or checking
        # its schema as the test's store does, then wait for the start file). Their lease (5 s) is far above
        # what a renewal may take on a loaded machine: no run may be lost and run again (which would be right,
        # at least once, but not what this test counts).
        backends = [anyio_backend if i % 2 == 0 else other(anyio_backend) for i in range(4)]
        workers = [
            spawn(*worker_child(pg_schema, 5.0, backend, 10, "default", "pair", barrier)) for backend in backends
        ]
        async with sp.PostgresStore(pg_schema.dsn, schema=pg_schema.schema, lease=0.5) as store:

            async def orphan(run_id: str) -> None:
                await pg_race_child.pair.submit(store, run_id=run_id)
                claim = await store.claim("pair", run_id, DEAD_OWNER)
                assert claim is not None
                assert claim.lease is not None
                assert claim.lease.epoch == 1

            async with anyio.create_task_group() as tg:
                for run_id in ids:
                    tg.start_soon(orphan, run_id)

            async def all_are(status: sp.RunStatus) -> bool:
                return [found.status for found in await store.list_runs()] == [status] * runs

            await until(lambda: all_are(sp.RunStatus.ORPHANED), within=HANG_GUARD, every=0.05)
            assert {(found.owner, found.epoch) for found in await store.list_runs()} == {(DEAD_OWNER, 1)}
            serving(workers)
            went = time.time()
            barrier.touch()
            await until(lambda: all_are(sp.RunStatus.COMPLETED), within=HANG_GUARD, every=0.05)
            done = time.time()
        exits = stop_all(workers)
    assert [code for code, _, _ in exits] == [0] * 4, [err for _, _, err in exits]
    for found in await records(pg_schema):
        assert (found.status, found.epoch, found.owner) == (sp.RunStatus.COMPLETED, 2, None), found
    for event in ("START", "END"):
        counts = Counter((line.more, line.name) for line in side.where(event))
        assert counts == Counter({(run_id, step): 1 for run_id in ids for step in ("one", "two")}), event
    assert not side.where("STOP")
    assert {line.epoch for line in side.where("START")} == {2}
    ran = Counter(line.pid for line in side.where("START", "one"))
    assert set(ran) == {worker.pid for worker in workers}, ran  # every worker took part in the race
    print(f"200 orphaned runs, 4 workers: all completed {done - went:.2f} s after the start; per worker {ran}")


# -- 2. the listener's connection killed ------------------------------------------------------------------


async def listen_backend(target: PgTarget, side: Side, pid: int) -> int:
    """The server process of the owner `pid`'s LISTEN connection (its first), once it is listening: the
    child notes the connection's backend pid, `pg_stat_activity` shows what it is."""
    [connected] = await side.wait("LISTENER", "connected", pid)
    backend = int(connected.more)

    async def listening() -> bool:
        with psycopg.connect(target.dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT application_name, query FROM pg_stat_activity WHERE pid = %s", (backend,))
            found = row.fetchone()
        assert found is not None, "the listener's connection is gone"
        assert found[0] == f"stoppoint listen {target.schema}"[:63]  # (the server keeps 63 bytes of it)
        return bool(found[1].startswith("LISTEN"))

    await until(listening, within=HANG_GUARD)
    return backend


async def deaf(side: Side, pid: int) -> None:
    """Wait (bounded) until the owner `pid`'s listener has lost its connection and the owner has read its run's
    requests since (the read every run gets when the listener fails): from then on it answers from memory,
    and only a (re)LISTEN, a notification or a renewal makes it read the server again."""
    [lost] = await side.wait("LISTENER", "reconnecting", pid)

    async def read_since() -> bool:
        return any(line.at > lost.at for line in side.where("READ", pid=pid))

    await until(read_since, within=HANG_GUARD)


def first_after(lines: list[Line], moment: float) -> Line:
    return min((line for line in lines if line.at > moment), key=lambda line: line.at)


def terminate(target: PgTarget, backend: int) -> None:
    with psycopg.connect(target.dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (backend,)).fetchone()
    assert row == (True,)


@pytest.mark.parametrize("gated", [False, True], ids=["at-once", "while-reconnecting"])
async def test_an_interrupt_sent_as_the_listener_connection_is_killed_is_delivered_by_the_catch_up(
    tmp_path: Path, anyio_backend: str, pg_schema: PgTarget, gated: bool
) -> None:
    """The owner's LISTEN connection is terminated on the server (`pg_terminate_backend`) and an interrupt
    requested at once: the owner stops at its stopping point, interrupted, long before its first renewal
    (its lease is 30 s: the first renewal, the fallback, comes 10 s after the claim). At once: the request
    may race the kill. While reconnecting: the child's listener holds its reconnection until a gate file
    exists, the request is made while nobody listens (its NOTIFY is lost; nothing delivers it meanwhile),
    and the re-LISTEN's catch-up read delivers it once the gate opens."""
    side = Side(tmp_path)
    lease = 30.0
    gate = tmp_path / "gate"
    if gated:
        side.env["PG_LISTEN_GATE"] = str(gate)
    with children(side) as spawn:
        owner = spawn(*run_child(pg_schema, "chain", lease, "listen", anyio_backend))
        [started] = await side.wait("START", "b", owner.pid)
        backend = await listen_backend(pg_schema, side, owner.pid)
        terminate(pg_schema, backend)
        if gated:
            await deaf(side, owner.pid)
        async with sp.PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as store:
            asked = time.time()
            assert await store.interrupt("chain", "listen", "while deaf", source="test")
        if gated:
            assert not side.where("STOP", "b"), "delivered with no one listening and no renewal due"
            opened = time.time()
            gate.touch()
        code, _, err = ended(owner)
        assert code == 0, err
    [stop] = side.where("STOP", "b", owner.pid)
    [outcome] = side.where("OUTCOME", pid=owner.pid)
    assert (outcome.name, outcome.more) == ("interrupted", "while deaf")
    assert not side.where("START", "c")
    assert stop.at - started.at < lease / 3  # before the first renewal: not delivered by the fallback
    assert side.where("LISTENER", "reconnecting", owner.pid)  # the listener saw its connection end
    if gated:
        # Delivered after the new connection was made (to another server process): by the catch-up read.
        [_, reconnected] = side.where("LISTENER", "connected", owner.pid)
        assert reconnected.more != str(backend)
        assert first_after(side.where("READ", pid=owner.pid), asked).at > reconnected.at
    done = await record(pg_schema, "listen")
    assert (done.status, done.owner) == (sp.RunStatus.INTERRUPTED, None)
    print(
        f"listener killed ({'while reconnecting' if gated else 'at once'}, {anyio_backend}): delivered "
        f"{(stop.at - asked) * 1000:.0f} ms after the request"
        + (f", {(stop.at - opened) * 1000:.0f} ms after the gate opened" if gated else "")
    )


async def test_an_interrupt_is_delivered_by_the_renewal_while_the_listener_stays_down(
    tmp_path: Path, anyio_backend: str, pg_schema: PgTarget
) -> None:
    """The owner's LISTEN connection is terminated and every reconnection refused (patched in the child):
    no notification can arrive, and the request is made after the owner's read that followed the failure,
    so the owner answers from memory. The renewal (every lease / 3 = 0.5 s) finds the request the owner has
    not read: the owner's next read of the server comes after it, and the owner stops, interrupted, within
    about one renewal period."""
    side = Side(tmp_path)
    lease = 1.5
    side.env["PG_LISTEN_DOWN"] = "1"
    with children(side) as spawn:
        owner = spawn(*run_child(pg_schema, "chain", lease, "deaf", anyio_backend))
        await side.wait("START", "b", owner.pid)
        backend = await listen_backend(pg_schema, side, owner.pid)
        terminate(pg_schema, backend)
        await deaf(side, owner.pid)  # down, and staying down
        async with sp.PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as store:
            asked = time.time()
            assert await store.interrupt("chain", "deaf", "by renewal", source="test")
        code, _, err = ended(owner)
        assert code == 0, err
    [stop] = side.where("STOP", "b", owner.pid)
    [outcome] = side.where("OUTCOME", pid=owner.pid)
    assert (outcome.name, outcome.more) == ("interrupted", "by renewal")
    assert len(side.where("LISTENER", "connected", owner.pid)) == 1  # it never listened again
    # The owner read the server again only after a renewal since the request, which found it.
    renewal = first_after(side.where("RENEW", pid=owner.pid), asked)
    assert first_after(side.where("READ", pid=owner.pid), asked).at > renewal.at
    assert renewal.at < stop.at
    latency = stop.at - asked
    print(f"listener down ({anyio_backend}): the renewal delivered the interrupt in {latency * 1000:.0f} ms")
    assert 0 <= latency < lease  # one renewal period (0.5 s) and the time to stop, with slack
    done = await record(pg_schema, "deaf")
    assert (done.status, done.owner) == (sp.RunStatus.INTERRUPTED, None)


# -- 3. a queue limit across three worker processes ------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the workers: asyncio, trio, asyncio
async def test_a_queue_limit_of_3_holds_across_three_worker_processes(
    tmp_path: Path, anyio_backend: str, pg_schema: PgTarget
) -> None:
    """Three workers, each allowed 3 runs at once (9 in all), serve `Queue("limited", concurrency=3)`; 12
    runs of a 0.3 s step are queued before they are let go at once. Only the store's count of the queue's
    live leases (under its advisory lock), across the three processes, keeps them to 3: the steps' START/END
    intervals never overlap more than 3 deep, reach 3, and every run's step runs once."""
    side = Side(tmp_path)
    barrier = tmp_path / "start"
    async with sp.PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as store:
        ids = [await lease_child.heavy.submit(store, {"n": n}, run_id=f"h{n:02}", queue="limited") for n in range(12)]
    with children(side) as spawn:
        backends = [anyio_backend if i % 2 == 0 else other(anyio_backend) for i in range(3)]
        workers = [
            spawn(*worker_child(pg_schema, 2.0, backend, 3, "limited=3", "heavy", barrier)) for backend in backends
        ]
        serving(workers)
        went = time.time()
        barrier.touch()

        async def all_completed() -> bool:
            return [found.status for found in await records(pg_schema)] == [sp.RunStatus.COMPLETED] * 12

        await until(all_completed, within=HANG_GUARD, every=0.05)
        done = time.time()
        exits = stop_all(workers)
    assert [code for code, _, _ in exits] == [0] * 3, [err for _, _, err in exits]
    starts, ends = side.where("START", "work"), side.where("END", "work")
    assert sorted(line.more for line in starts) == sorted(ids)  # each run's step ran once
    assert sorted(line.more for line in ends) == sorted(ids)
    peak = peak_running(starts, ends)
    by_worker = Counter(line.pid for line in starts)
    print(f"queue limited=3 over 3 workers: peak {peak}; runs per worker {by_worker}; all in {done - went:.2f} s")
    assert peak == 3


# -- 4. interrupts from another process ---------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["graceful", "forced"])
async def test_an_interrupt_from_another_process_stops_the_owner(
    tmp_path: Path, anyio_backend: str, pg_schema: PgTarget, force: bool
) -> None:
    """`stoppoint interrupt RUN_ID --store postgresql://... --schema S` asks for a run another process owns.
    Graceful: the step
    `b` stops at its stopping point, the run is interrupted, `c` never starts. Forced: the step `forever`,
    with no stopping point, is cancelled. Either way the owner stores the run interrupted, the request among
    its report's interrupts, and the delivery (from the request to the step's stop) is measured."""
    side = Side(tmp_path)
    flow, step = ("stuck", "forever") if force else ("chain", "b")
    with children(side) as spawn:
        owner = spawn(*run_child(pg_schema, flow, 1.0, "stop-me", anyio_backend))
        await side.wait("START", step, owner.pid)
        how = "force" if force else "graceful"
        store_args = ("--store", pg_schema.dsn, "--schema", pg_schema.schema, "--reason", "stop from afar")
        interrupter = spawn("-m", "stoppoint", "interrupt", "stop-me", *store_args, *(["--force"] if force else []))
        code, out, err = ended(interrupter)
        assert code == 0, err
        assert out.startswith("asked "), out
        assert f"to stop run stop-me of flow {flow}" in out, out
        code, _, err = ended(owner)
        assert code == 0, err
    [stop] = side.where("STOP", step, owner.pid)
    [outcome] = side.where("OUTCOME", pid=owner.pid)
    assert (outcome.name, outcome.more) == ("forced" if force else "interrupted", "stop from afar")
    async with sp.PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as store:
        stored = await store.load(flow, "stop-me")
    assert stored is not None
    assert (stored.record.status, stored.record.owner) == (sp.RunStatus.INTERRUPTED, None)
    report = sp.RunReport.model_validate_json(stored.report_json)
    [signal_] = report.interrupts
    assert (signal_.reason, signal_.force, signal_.source) == ("stop from afar", force, "cli")
    assert report.steps[step].status is (sp.StepStatus.CANCELLED if force else sp.StepStatus.INTERRUPTED)
    if not force:
        assert report.steps["a"].status is sp.StepStatus.COMPLETED
        assert report.steps["c"].status is sp.StepStatus.NOT_STARTED
    latency = stop.at - signal_.sent_at.timestamp()
    print(f"interrupt ({how}, {anyio_backend}) from another process: delivered in {latency * 1000:.0f} ms")
    assert 0 <= latency < 1.0  # API.md: within 100 ms (p99) on PostgresStore; a loaded test machine gets slack


# -- 5. racing claims ---------------------------------------------------------------------------------------


# The racers alternate backends (asyncio, trio, ...), so each count runs with this process on one backend only.
@pytest.mark.parametrize(("processes", "anyio_backend"), [(2, "asyncio"), (5, "trio")])
async def test_of_processes_racing_to_run_one_id_exactly_one_runs_its_steps(
    tmp_path: Path, anyio_backend: str, pg_schema: PgTarget, processes: int
) -> None:
    """`processes` processes call `flow.run(store=PostgresStore, run_id=same)` at once (a start file): the
    claim (`FOR UPDATE` on the run's row, or the insert of a new one) lets exactly one run the steps; every
    other gets `RunOwned` naming the winner, since the winner holds the run (its step b waits for the go file)
    until they have all given up."""
    side = Side(tmp_path)
    barrier = tmp_path / "start"
    with children(side) as spawn:
        backends = [anyio_backend if i % 2 == 0 else other(anyio_backend) for i in range(processes)]
        racers = [spawn(*run_child(pg_schema, "chain", 1.0, "race", backend, barrier)) for backend in backends]
        for racer in racers:
            assert racer.stdout is not None
            assert wait_for_line(racer.stdout, HANG_GUARD) == "ready\n", racer.stderr.read() if racer.stderr else ""
        barrier.touch()
        owned = await side.wait("OUTCOME", "run_owned", count=processes - 1)
        [started] = await side.wait("START", "b")
        side.go.touch()
        exits = [ended(racer) for racer in racers]
    assert [code for code, _, _ in exits] == [0] * processes, [err for _, _, err in exits]
    winner = started.pid
    assert {line.pid for line in owned} == {racer.pid for racer in racers} - {winner}
    assert all(line.more.split(":")[1].split("/")[0] == str(winner) for line in owned)  # RunOwned names the winner
    starts = side.where("START")
    assert sorted(line.name for line in starts) == ["a", "b", "c"]  # each step ran once
    assert {line.pid for line in starts} == {winner}
    [completed] = side.where("OUTCOME", "completed")
    assert completed.pid == winner
    assert len(side.where("OUTCOME")) == processes
    done = await record(pg_schema, "race")
    assert (done.status, done.epoch, done.owner) == (sp.RunStatus.COMPLETED, 1, None)
