"""`SQLiteStore`'s side of the `Store` protocol that one process cannot show (`test_store_conformance.py` has
the rules, on every store): claims racing across real processes, interrupt requests from another process or
connection, the schema-1 upgrade at the first write, reads that never modify a file, and the cost of a step.

Processes start together on a file barrier (each waits, bounded, for a start file to appear); no test orders
things by sleeping, and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

import stoppoint._sqlite_leases
from stoppoint import Checkpoint, RunReport, StepProgressEvent, StepReport, StepStatus, StoreError
from stoppoint._lease import Lease
from stoppoint._sqlite import SQLiteStore
from stoppoint._store import RunStatus

from .sqlite_v1 import write_schema_1
from .test_hardening_store import wait_for_line
from .test_store_conformance import T0, A, B, claimed, done, outputs, running, state

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# -- claims racing across processes ----------------------------------------------------------------------

CLAIMER = textwrap.dedent(
    """
    import os, sys, time
    from datetime import UTC, datetime

    import anyio

    from stoppoint import Checkpoint, RunReport
    from stoppoint._errors import RunOwned
    from stoppoint._sqlite import SQLiteStore
    from stoppoint._store import RunState, RunStatus

    path, start, owner, backend, new = sys.argv[1:]
    checkpoint = Checkpoint(flow="f", flow_version="1", run_id="r1", inputs={}, outputs={})
    report = RunReport(run_id="r1", flow="f", started_at=datetime.now(UTC), steps={})
    state = RunState("1", RunStatus.RUNNING, report.started_at, None, checkpoint.to_json(), report.model_dump_json())

    async def main() -> None:
        async with SQLiteStore(path) as store:  # opened (and checked) before the race
            print("ready", flush=True)
            deadline = time.monotonic() + 30
            while not os.path.exists(start):  # the barrier
                if time.monotonic() > deadline:
                    sys.exit("no start file within 30 s")
                time.sleep(0.0005)
            try:
                claim = await store.claim("f", "r1", owner, new=state if new == "new" else None)
            except RunOwned as exc:
                print(f"owned {exc.owner}", flush=True)
            else:
                print(f"won {claim.lease.epoch}", flush=True)

    anyio.run(main, backend=backend)
    """
)


@contextmanager
def children(*argvs: list[str]) -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes running `python -c ...` with these arguments, killed if the test leaves early."""
    started = [
        subprocess.Popen(
            [sys.executable, "-c", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for argv in argvs
    ]
    try:
        yield started
    finally:
        for child in started:
            child.kill()
            child.communicate()


@pytest.mark.parametrize("processes", [2, 5])
@pytest.mark.parametrize("new", ["new", "stored"], ids=["a new run", "a stored run"])
def test_of_processes_racing_for_a_run_exactly_one_wins(tmp_path: Path, processes: int, new: str) -> None:
    path, start = tmp_path / "runs.db", tmp_path / "start"

    async def submit() -> None:
        async with SQLiteStore(path) as store:
            assert await store.submit("f", "r1", state())

    if new == "stored":
        anyio.run(submit)
    owners = [f"host:{i}/race" for i in range(processes)]
    backends = ["asyncio", "trio"]
    argvs = [[CLAIMER, str(path), str(start), owner, backends[i % 2], new] for i, owner in enumerate(owners)]
    with children(*argvs) as racers:
        for racer in racers:
            assert racer.stdout is not None
            assert wait_for_line(racer.stdout) == "ready\n", racer.stderr.read() if racer.stderr else ""
        start.touch()  # go
        outs = []
        for racer in racers:
            out, err = racer.communicate(timeout=60)
            assert racer.returncode == 0, err
            outs.append(out)
    winners = [owner for owner, out in zip(owners, outs, strict=True) if out == "won 1\n"]
    assert len(winners) == 1, outs
    assert sorted(outs) == sorted(["won 1\n"] + [f"owned {winners[0]}\n"] * (processes - 1))

    async def check() -> None:
        async with SQLiteStore(path) as store:
            [record] = await store.list_runs()
            assert (record.owner, record.epoch, record.status) == (winners[0], 1, RunStatus.RUNNING)

    anyio.run(check)


async def test_of_twenty_connections_racing_for_a_run_exactly_one_wins(tmp_path: Path) -> None:
    """Twenty store objects of one process: twenty connections, each claim in its own worker thread."""
    path = tmp_path / "runs.db"
    stores = [SQLiteStore(path) for _ in range(20)]
    try:
        for store in stores:
            await store.__aenter__()
        won: list[Lease] = []
        owned: list[str] = []

        async def race(i: int) -> None:
            try:
                claim = await stores[i].claim("f", "r1", f"host:{i}/x", new=state())
            except stoppoint.RunOwned as exc:
                owned.append(exc.owner)
            else:
                assert claim is not None
                assert claim.lease is not None
                won.append(claim.lease)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(race, i)
        [lease] = won
        assert owned == [lease.owner] * 19
    finally:
        for store in stores:
            await store.aclose()


# -- interrupt requests from elsewhere -------------------------------------------------------------------

INTERRUPTER = textwrap.dedent(
    """
    import sys
    import anyio
    from stoppoint._sqlite import SQLiteStore

    async def main() -> None:
        async with SQLiteStore(sys.argv[1]) as store:
            print(await store.interrupt("f", "r1", "from afar", force=True, source="cli"))

    anyio.run(main)
    """
)


async def wait_for_requests(store: SQLiteStore, lease: Lease) -> list[Any]:
    """Poll as an owner does, every `interrupt_poll` seconds, bounded, until a request comes."""
    with anyio.fail_after(10):
        while not (requests := await store.interrupts(lease)):  # noqa: ASYNC110 (the store is what is polled)
            await anyio.sleep(store.interrupt_poll)
    return requests


async def test_an_interrupt_from_another_process_reaches_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        lease = await claimed(store)
        assert await store.interrupts(lease) == []
        done_process = await anyio.run_process([sys.executable, "-c", INTERRUPTER, str(path)], env=ENV)
        assert done_process.stdout == b"True\n", done_process.stderr
        [(number, signal)] = await wait_for_requests(store, lease)
        assert (signal.reason, signal.force, signal.source) == ("from afar", True, "cli")
        assert number > 0


async def test_polling_reads_the_requests_only_when_the_file_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PRAGMA data_version` moves when another connection commits; this store's own writes it counts itself."""
    reads: list[str] = []
    read_requests = stoppoint._sqlite_leases._requests

    def counted(file: Any, lease: Lease) -> Any:
        reads.append(lease.run_id)
        return read_requests(file, lease)

    monkeypatch.setattr(stoppoint._sqlite_leases, "_requests", counted)
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store, SQLiteStore(path) as other:
        lease = await claimed(store)
        for _ in range(10):
            assert await store.interrupts(lease) == []
        assert reads == ["r1"]  # then data_version alone, unchanged
        assert await store.interrupt("f", "r1", "own")  # this store's own connection writes
        assert [signal.reason for _, signal in await store.interrupts(lease)] == ["own"]
        assert await store.interrupts(lease, after=10**9) == []
        assert len(reads) == 2
        assert await other.interrupt("f", "r1", "other")  # another connection commits
        assert [signal.reason for _, signal in await store.interrupts(lease)] == ["own", "other"]
        assert len(reads) == 3
        await other.release(lease)  # any change another connection makes is seen: the lease is gone
        with pytest.raises(stoppoint.LeaseLost, match=r"interrupts\(\): the run is at epoch 1, held by nobody"):
            await store.interrupts(lease)


# -- schema 1, and reads that never modify a file ----------------------------------------------------------


def fingerprint(path: Path) -> tuple[bytes, int, list[Any]]:
    """The file's bytes and mtime, and what SQLite reads of its schema and header in the file itself (immutable:
    without the log, and leaving no -wal or -shm file behind; `log_frames` tells whether the log holds pages)."""
    db = sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True)
    try:
        pragmas = [db.execute(f"PRAGMA {name}").fetchone()[0] for name in ("schema_version", "user_version")]
    finally:
        db.close()
    return path.read_bytes(), path.stat().st_mtime_ns, pragmas


def log_frames(path: Path) -> int:
    """How many pages the file's write-ahead log holds (0 if there is none)."""
    log = path.with_name(path.name + "-wal")
    if not log.exists() or log.stat().st_size <= 32:
        return 0
    data = log.read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    return (len(data) - 32) // (24 + page_size)


def schema_1_runs() -> list[tuple[Checkpoint, RunReport]]:
    """A run that was running when 0.1 stopped (a crash: never finished) and one that completed."""
    runs = []
    for run_id, finished, outputs_ in (
        ("running", None, {"a": 1}),
        ("completed", T0 + timedelta(seconds=5), {"a": 1, "b": 2}),
    ):
        checkpoint = Checkpoint(flow="f", flow_version="1", run_id=run_id, inputs={"n": 1}, outputs=outputs_)
        b = StepStatus.COMPLETED if finished else StepStatus.RUNNING
        steps = {"a": StepReport(name="a", status=StepStatus.COMPLETED), "b": StepReport(name="b", status=b)}
        runs.append((checkpoint, RunReport(run_id=run_id, flow="f", started_at=T0, finished_at=finished, steps=steps)))
    return runs


async def read_everything(store: SQLiteStore) -> list[Any]:
    records = await store.list_runs()
    return [
        records,
        await store.list_runs("f"),
        *[await store.load(record.flow, record.run_id) for record in records],
        await store.load("f", "missing"),
        *[await store.labels(record.flow, record.run_id) for record in records],
    ]


async def test_a_schema_1_file_is_read_as_it_is_and_upgraded_by_its_first_write(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    target = {"stoppoint.target": "/srv/flows.py:f"}
    write_schema_1(path, schema_1_runs(), labels={("f", "running"): target})
    before = fingerprint(path)
    async with SQLiteStore(path) as store:
        read = await read_everything(store)
        assert fingerprint(path) == before  # reading modified nothing
        assert log_frames(path) == 0
    assert fingerprint(path) == before  # nor did closing
    records = read[0]
    assert [(r.run_id, r.status, r.owner, r.epoch, r.queue) for r in records] == [
        ("running", RunStatus.RUNNING, None, 0, None),  # never claimed: a run saved running stays running
        ("completed", RunStatus.COMPLETED, None, 0, None),
    ]
    assert read[-2] == target

    async with SQLiteStore(path) as store:
        lease = await claimed(store, "new")  # the first write: a claim of another run
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
            columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
            assert columns[-5:] == ["owner", "epoch", "lease_expires_at", "claimed_at", "queue"]
            assert {"steps", "interrupts"} <= {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        db.close()
        after = await read_everything(store)
        assert after[0] == [*records, after[0][2]]  # the runs as they were, and the new one
        assert after[2:4] == read[2:4]  # loaded as before: checkpoints, reports, records
        assert after[-3:-1] == read[-2:]  # and their labels
        claim = await store.claim("f", "running", B)  # an 0.1 run is claimed like any other
        assert claim is not None
        assert claim.lease is not None
        assert claim.lease.epoch == 1
        assert claim.stored == read[2]
        await store.commit_step(claim.lease, done("b", 2, run_id="running"))
        assert outputs(await store.load("f", "running")) == {"a": 1, "b": 2}
        await store.commit_step(lease, done("a", 1, run_id="new"))


def test_the_command_reads_a_schema_1_file_without_modifying_it(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    write_schema_1(path, schema_1_runs(), labels={("f", "running"): {"stoppoint.target": "/srv/flows.py:f"}})
    before = fingerprint(path)
    for args in (("runs",), ("runs", "--flow", "f"), ("show", "running"), ("show", "completed", "--json")):
        done_command = subprocess.run(
            [sys.executable, "-m", "stoppoint", *args, "--store", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
            env=ENV,
        )
        assert done_command.returncode == 0, done_command.stderr
        assert "running" in done_command.stdout or "completed" in done_command.stdout
        assert fingerprint(path) == before, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.db"]


async def test_a_first_write_that_fails_leaves_a_schema_1_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    write_schema_1(path, schema_1_runs())
    before = fingerprint(path)
    async with SQLiteStore(path) as store:
        with pytest.raises(StoreError, match="is a run of flow 'f', not of flow 'g'"):
            await store.claim("g", "running", A, new=state("running", flow="g"))  # refused: rolled back
        assert fingerprint(path) == before
        assert [r.epoch for r in await store.list_runs()] == [0, 0]


async def test_reading_never_modifies_a_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        lease = await claimed(store)
        await store.commit_step(lease, done("a", 1))
        await store.progress(lease, "b", running("b"))
        assert isinstance(store, SQLiteStore)
        await store.set_labels("f", "r1", {"k": "v"})
        assert await store.submit("f", "queued", state("queued"))
        assert await store.interrupt("f", "r1", "pending")
    before = fingerprint(path)
    async with SQLiteStore(path) as store:
        read = await read_everything(store)
        [(_, signal)] = await store.interrupts(lease)  # an owner's poll reads too
        assert signal.reason == "pending"
        assert fingerprint(path) == before
        assert log_frames(path) == 0
    assert fingerprint(path) == before
    assert [r.run_id for r in read[0]] == ["r1", "queued"]


async def test_a_step_row_damaged_in_the_file_is_a_store_error_naming_the_run(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        lease = await claimed(store)
        await store.commit_step(lease, done("a", 1))
        with sqlite3.connect(path) as db:
            db.execute("UPDATE steps SET report = 'not json'")
        db.close()
        with pytest.raises(StoreError, match=r"run 'r1' of flow 'f': the stored row of step 'a': its report is not"):
            await store.load("f", "r1")
        assert [r.run_id for r in await store.list_runs()] == ["r1"]  # the record alone is fine


# -- the cost of a step --------------------------------------------------------------------------------------


async def pages_of_one_step(directory: Path, steps: int) -> int:
    """How many pages one `commit_step` writes (frames it adds to an emptied log) when the run's head lists
    `steps` steps and all but one are stored."""
    names = [f"s{i:05d}" for i in range(steps)]
    async with SQLiteStore(directory / f"{steps}.db") as store:
        lease = await claimed(store, steps=dict.fromkeys(names, StepStatus.PENDING))
        await store.write(
            lease, state(steps=dict.fromkeys(names, StepStatus.PENDING)), [done(n, i) for i, n in enumerate(names[:-1])]
        )
        connection = store._connection
        assert connection is not None
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # (no operation is going on)
        assert log_frames(directory / f"{steps}.db") == 0
        await store.commit_step(lease, done(names[-1], "last"))
        stored = await store.load("f", "r1")
        assert stored is not None
        assert len(json.loads(stored.checkpoint_json)["outputs"]) == steps
        return log_frames(directory / f"{steps}.db")


async def test_a_step_costs_the_same_at_20_and_at_5000_steps(tmp_path: Path) -> None:
    """The head (its report lists every step: about 1 MB at 5,000) is not rewritten: the step's row and the
    page of the run row that holds `updated_at` are (and a deeper index, a page more)."""
    small = await pages_of_one_step(tmp_path, 20)
    large = await pages_of_one_step(tmp_path, 5000)
    assert small <= 4
    assert large <= small + 2


async def test_a_file_made_before_events_reads_none_and_gets_their_table_at_its_first_write(tmp_path: Path) -> None:
    """The events table is additive (schema 2 stays): reading does not add it; the first write does, and a new
    run's name loses the stale events an older stoppoint's `delete()` left."""
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await claimed(store)
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE events")
    connection.close()
    async with SQLiteStore(path) as store:
        found = await store.events("f", "r1")
        assert (list(found), found.dropped) == ([], 0)
        with sqlite3.connect(path) as connection:
            assert connection.execute("SELECT name FROM sqlite_master WHERE name = 'events'").fetchall() == []
        connection.close()
        await store.set_labels("f", "r1", {"k": "v"})  # any write
        event = StepProgressEvent(run_id="r2", flow="f", at=T0, step="a", done=1).model_dump_json()
        with sqlite3.connect(path) as connection:
            connection.execute("INSERT INTO events VALUES ('f', 'r2', 1, ?)", (event,))
            version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        connection.close()
        assert version == ("2",)
        assert len(await store.events("f", "r2")) == 1
        await claimed(store, "r2")
        assert list(await store.events("f", "r2")) == []
