"""The `Store` protocol, rule by rule (the docstrings of `stoppoint/_store.py` are the contract), against every
store of stoppoint, on both anyio backends. A store joins by one line in `STORES`.

No test orders things by sleeping: a lease expires on the store's own clock, and a test waits for the store to
say so (`wait_orphaned`), every wait bounded by `anyio.fail_after`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from stoppoint import Checkpoint, InterruptSignal, RunReport, StepProgressEvent, StepReport, StepStatus
from stoppoint._errors import LeaseLost, RunOwned, StoreError
from stoppoint._lease import Claim, Lease, Queue
from stoppoint._memory import MemoryStore
from stoppoint._sqlite import SQLiteStore
from stoppoint._store import (
    EVENTS_KEPT,
    EventStore,
    LabelStore,
    RunRecord,
    RunState,
    RunStatus,
    StepRow,
    Store,
    StoredEvents,
    StoredRun,
)
from tests.pg import PgTarget

pytestmark = pytest.mark.anyio

A = "host-a:1/aaaa"
B = "host-b:2/bbbb"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SHORT = 0.2  # seconds: a lease that expires within a test
STEPS = ("a", "b", "c")


@asynccontextmanager
async def memory_store(directory: Path, lease: float) -> AsyncIterator[Store]:
    yield MemoryStore(lease=lease)


@asynccontextmanager
async def sqlite_store(directory: Path, lease: float) -> AsyncIterator[Store]:
    async with SQLiteStore(directory / "runs.db", lease=lease) as store:
        yield store


def postgres_store(target: PgTarget) -> Callable[[Path, float], AbstractAsyncContextManager[Store]]:
    """PostgresStore in the test's own schema (`pg_schema`: dropped after the test)."""

    @asynccontextmanager
    async def open_store(directory: Path, lease: float) -> AsyncIterator[Store]:
        from stoppoint._postgres import PostgresStore

        async with PostgresStore(target.dsn, lease=lease, schema=target.schema) as store:
            yield store

    return open_store


Opener = Callable[..., AbstractAsyncContextManager[Store]]
STORES: list[Callable[[Path, float], AbstractAsyncContextManager[Store]]] = [memory_store, sqlite_store]
"""Every store of stoppoint that needs no server, opened in a test's directory with a lease: a new store is one
more line here (one that needs a server, as PostgresStore, one more `elif` in `opener`)."""


@pytest.fixture(params=[*STORES, postgres_store], ids=lambda opener: opener.__name__.removesuffix("_store"))
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the store under test: `opener()` with the default lease, `opener(SHORT)` with a short one."""
    make = request.param
    if make is postgres_store:
        make = postgres_store(request.getfixturevalue("pg_schema"))

    def open_store(lease: float = 15.0) -> AbstractAsyncContextManager[Store]:
        return make(tmp_path, lease)  # type: ignore[no-any-return]

    return open_store


@pytest.fixture
async def store(opener: Opener) -> AsyncIterator[Store]:
    async with opener() as opened:
        yield opened


@pytest.fixture
async def short(opener: Opener) -> AsyncIterator[Store]:
    """The store under test with a lease of `SHORT` seconds."""
    async with opener(SHORT) as opened:
        yield opened


# -- what the runtime hands a store -------------------------------------------------------------------------


def state(
    run_id: str = "r1",
    *,
    flow: str = "f",
    status: RunStatus = RunStatus.RUNNING,
    started: datetime = T0,
    finished: datetime | None = None,
    steps: dict[str, StepStatus] | None = None,
    outputs: dict[str, Any] | None = None,
) -> RunState:
    """A run's head: its checkpoint (without the step rows' outputs, unless given) and report."""
    checkpoint = Checkpoint(flow=flow, flow_version="1", run_id=run_id, inputs={"n": 1}, outputs=outputs or {})
    statuses = steps if steps is not None else dict.fromkeys(STEPS, StepStatus.PENDING)
    report = RunReport(
        run_id=run_id,
        flow=flow,
        started_at=started,
        finished_at=finished,
        steps={name: StepReport(name=name, status=status) for name, status in statuses.items()},
    )
    return RunState("1", status, started, finished, checkpoint.to_json(), report.model_dump_json())


def ended(run_id: str = "r1", status: RunStatus = RunStatus.COMPLETED, *, flow: str = "f") -> RunState:
    """The head of an attempt that ended so (completed: every step completed, outputs in its rows)."""
    step = {
        RunStatus.COMPLETED: StepStatus.COMPLETED,
        RunStatus.INTERRUPTED: StepStatus.INTERRUPTED,
        RunStatus.FAILED: StepStatus.FAILED,
    }[status]
    return state(run_id, flow=flow, status=status, finished=T0 + timedelta(seconds=9), steps=dict.fromkeys(STEPS, step))


def done(step: str, output: Any, *, run_id: str = "r1", flow: str = "f", second: int = 1) -> StepRow:
    """The row of a completed step: its output and report."""
    checkpoint = Checkpoint(flow=flow, flow_version="1", run_id=run_id, inputs={"n": 1}, outputs={step: output})
    report = StepReport(name=step, status=StepStatus.COMPLETED, finished_at=T0 + timedelta(seconds=second))
    return StepRow(step, report.model_dump_json(), checkpoint.to_json())


def running(step: str, second: int = 1) -> str:
    """A running step's report (its progress), told apart by `started_at`."""
    return StepReport(name=step, status=StepStatus.RUNNING, started_at=T0 + timedelta(seconds=second)).model_dump_json()


def outputs(stored: StoredRun | None) -> dict[str, Any]:
    assert stored is not None
    return dict(json.loads(stored.checkpoint_json)["outputs"])


def report(stored: StoredRun | None) -> RunReport:
    assert stored is not None
    return RunReport.model_validate_json(stored.report_json)


async def record(store: Store, run_id: str = "r1", flow: str = "f") -> RunRecord:
    stored = await store.load(flow, run_id)
    assert stored is not None
    return stored.record


async def claimed(store: Store, run_id: str = "r1", owner: str = A, *, flow: str = "f", **more: Any) -> Lease:
    """A new run, claimed (created owned)."""
    claim = await store.claim(flow, run_id, owner, new=state(run_id, flow=flow, **more))
    assert claim is not None
    assert claim.lease is not None
    return claim.lease


async def wait_orphaned(store: Store, run_id: str = "r1", flow: str = "f") -> RunRecord:
    """Wait, bounded, until the store lists the run as orphaned: its lease expired on the store's clock."""
    with anyio.fail_after(10):
        while True:
            [found] = [r for r in await store.list_runs(flow) if r.run_id == run_id]
            if found.status is RunStatus.ORPHANED:
                return found
            await anyio.sleep(SHORT / 10)


def is_lease_of(lease: Lease, run_id: str, owner: str, epoch: int, flow: str = "f") -> bool:
    return (lease.flow, lease.run_id, lease.owner, lease.epoch) == (flow, run_id, owner, epoch)


# -- claim --------------------------------------------------------------------------------------------------


async def test_a_store_is_a_store(store: Store) -> None:
    assert isinstance(store, Store)
    assert isinstance(store, LabelStore)
    assert store.lease == 15.0
    assert 0 < store.interrupt_poll <= 0.25  # an owner notices a request within 250 ms


@pytest.mark.parametrize("lease", [0, -1, float("inf"), float("nan"), True, "15", None])
async def test_a_lease_that_is_not_seconds_is_refused(opener: Opener, lease: object) -> None:
    with pytest.raises(TypeError, match=r"\(lease=\.\.\.\): lease must be a number of seconds > 0"):
        async with opener(lease):
            pass


async def test_a_new_run_is_created_owned_at_epoch_1(store: Store) -> None:
    before = datetime.now(UTC)
    claim = await store.claim("f", "r1", A, new=state(), labels={"k": "v"})
    assert claim is not None
    assert claim.stored is None
    lease = claim.lease
    assert lease is not None
    assert is_lease_of(lease, "r1", A, 1)
    assert before + timedelta(seconds=store.lease) <= lease.expires_at <= datetime.now(UTC) + timedelta(seconds=15)
    found = await record(store)
    assert (found.status, found.owner, found.epoch, found.queue) == (RunStatus.RUNNING, A, 1, None)
    assert found.lease_expires_at == lease.expires_at
    assert (found.started_at, found.finished_at) == (T0, None)
    assert isinstance(store, LabelStore)
    assert await store.labels("f", "r1") == {"k": "v"}
    assert await store.list_runs() == [found]


async def test_a_claim_of_no_run_without_new_is_none_and_stores_nothing(store: Store) -> None:
    assert await store.claim("f", "r1", A) is None
    assert await store.list_runs() == []


async def test_a_claim_of_a_completed_run_returns_it_claiming_nothing(store: Store) -> None:
    lease = await claimed(store)
    await store.finish(lease, ended(), [done(step, 1) for step in STEPS])
    stored = await store.load("f", "r1")
    claim = await store.claim("f", "r1", B, new=state())
    assert claim == Claim(None, stored)
    assert stored is not None
    assert stored.record.status is RunStatus.COMPLETED
    assert await store.load("f", "r1") == stored  # nothing claimed, nothing written


async def test_a_claim_with_reopen_takes_a_completed_run_like_an_unfinished_one(store: Store) -> None:
    """(`run()` reopens a completed run of a flow that gained steps at the same version.)"""
    lease = await claimed(store)
    await store.finish(lease, ended(), [done(step, 1) for step in STEPS])
    before = await store.load("f", "r1")
    claim = await store.claim("f", "r1", B, reopen=True)
    assert claim is not None
    assert claim.stored == before  # as it was stored
    assert claim.lease is not None
    assert is_lease_of(claim.lease, "r1", B, 2)
    after = await record(store)
    assert (after.status, after.owner, after.finished_at) == (RunStatus.RUNNING, B, None)
    assert outputs(await store.load("f", "r1")) == dict.fromkeys(STEPS, 1)
    with pytest.raises(RunOwned):  # held now, reopen or not
        await store.claim("f", "r1", A, reopen=True)
    await store.finish(claim.lease, ended())
    assert await store.claim("f", "r1", A) == Claim(None, await store.load("f", "r1"))  # completed again


async def leave_unheld(store: Store, how: str) -> None:
    """Store run r1 of flow f unfinished, held by nobody, in the way `how` says."""
    if how == "queued":
        assert await store.submit("f", "r1", state(), queue="q")
        return
    if how == "saved":  # by a BasicStore save alone (never claimed: epoch 0)
        checkpoint = Checkpoint(flow="f", flow_version="1", run_id="r1", inputs={"n": 1}, outputs={"a": 1})
        await store.save(checkpoint, RunReport(run_id="r1", flow="f", started_at=T0, steps={}))
        return
    lease = await claimed(store)
    await store.commit_step(lease, done("a", 1))
    if how == "released":
        await store.release(lease)
    else:
        await store.finish(lease, ended(status=RunStatus(how)))


@pytest.mark.parametrize("how", ["queued", "saved", "released", "interrupted", "failed"])
async def test_a_claim_of_an_unfinished_run_nobody_holds_takes_it_at_the_next_epoch(store: Store, how: str) -> None:
    await leave_unheld(store, how)
    before = await store.load("f", "r1")
    assert before is not None
    claim = await store.claim("f", "r1", B, new=state(started=T0 + timedelta(hours=1)))
    assert claim is not None
    assert claim.stored == before  # as it was stored
    assert claim.lease is not None
    assert is_lease_of(claim.lease, "r1", B, before.record.epoch + 1)
    after = await record(store)
    assert (after.status, after.owner, after.epoch, after.finished_at) == (
        RunStatus.RUNNING,
        B,
        claim.lease.epoch,
        None,
    )
    assert after.started_at == before.record.started_at  # `new` is for a new run only
    assert outputs(await store.load("f", "r1")) == outputs(before)


@pytest.mark.parametrize("owner", [B, A], ids=["another owner", "the same owner"])
async def test_a_claim_of_a_live_lease_is_refused_whoever_asks(store: Store, owner: str) -> None:
    await claimed(store)
    before = await store.load("f", "r1")
    for new in (None, state()):
        with pytest.raises(RunOwned) as caught:
            await store.claim("f", "r1", owner, new=new)
        assert (caught.value.flow, caught.value.run_id, caught.value.owner) == ("f", "r1", A)
        assert caught.value.since is not None
        assert A in str(caught.value)
        assert isinstance(caught.value, StoreError)
    assert await store.load("f", "r1") == before


async def test_a_claim_after_the_lease_expired_takes_the_run(short: Store) -> None:
    lease = await claimed(short)
    await short.commit_step(lease, done("a", 1))
    orphan = await wait_orphaned(short)
    assert (orphan.owner, orphan.epoch) == (A, 1)  # the dead owner stays until the run is claimed again
    claim = await short.claim("f", "r1", B)
    assert claim is not None
    assert claim.stored is not None
    assert claim.stored.record.status is RunStatus.ORPHANED
    assert claim.lease is not None
    assert is_lease_of(claim.lease, "r1", B, 2)
    with pytest.raises(LeaseLost):  # the first owner, back from its pause, writes nothing more
        await short.commit_step(lease, done("b", 2))
    assert outputs(await short.load("f", "r1")) == {"a": 1}


async def test_a_new_owner_gets_the_requests_the_old_one_left(store: Store) -> None:
    lease = await claimed(store)
    assert await store.interrupt("f", "r1", "stop")
    [(number, _)] = await store.interrupts(lease)
    await store.release(lease)  # (as a lease that expired: the run is claimed by the next owner)
    claim = await store.claim("f", "r1", B)
    assert claim is not None
    assert claim.lease is not None
    [(kept, signal)] = await store.interrupts(claim.lease)
    assert (kept, signal.reason) == (number, "stop")


async def test_a_run_id_of_another_flow_is_refused(store: Store) -> None:
    await claimed(store, flow="g")
    for attempt in (
        store.claim("f", "r1", B, new=state()),
        store.claim("f", "r1", B),
        store.submit("f", "r1", state()),
    ):
        with pytest.raises(StoreError, match=r"run 'r1' is a run of flow 'g', not of flow 'f'"):
            await attempt
    assert [(r.flow, r.run_id) for r in await store.list_runs()] == [("g", "r1")]


async def test_of_twenty_claims_racing_for_a_new_run_exactly_one_wins(store: Store) -> None:
    won: list[Lease] = []
    owned: list[RunOwned] = []

    async def race(i: int) -> None:
        try:
            claim = await store.claim("f", "r1", f"host:{i}/x", new=state())
        except RunOwned as exc:
            owned.append(exc)
        else:
            assert claim is not None
            assert claim.lease is not None
            won.append(claim.lease)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(race, i)
    [lease] = won
    assert len(owned) == 19
    assert {exc.owner for exc in owned} == {lease.owner}
    assert (await record(store)).owner == lease.owner


async def test_of_twenty_claims_racing_for_a_stored_run_exactly_one_wins(store: Store) -> None:
    await leave_unheld(store, "queued")
    results: list[Claim | RunOwned | None] = []

    async def race(i: int) -> None:
        try:
            results.append(await store.claim("f", "r1", f"host:{i}/x"))
        except RunOwned as exc:
            results.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(race, i)
    [claim] = [result for result in results if isinstance(result, Claim)]
    assert claim.lease is not None
    assert claim.lease.epoch == 1
    assert sum(isinstance(result, RunOwned) for result in results) == 19


# -- fencing --------------------------------------------------------------------------------------------------


async def stale(store: Store) -> tuple[Lease, Lease]:
    """A's lease of r1, which B's claim (after A released it) made stale, and B's."""
    lease = await claimed(store)
    await store.write(lease, state(), [done("a", 1)])
    await store.release(lease)
    claim = await store.claim("f", "r1", B)
    assert claim is not None
    assert claim.lease is not None
    return lease, claim.lease


FENCED: dict[str, Callable[[Store, Lease], Any]] = {
    "write": lambda store, lease: store.write(lease, state(steps={}), [done("b", 2)]),
    "commit_step": lambda store, lease: store.commit_step(lease, done("b", 2)),
    "progress": lambda store, lease: store.progress(lease, "a", running("a", 5)),
    "finish": lambda store, lease: store.finish(lease, ended(), [done("c", 3)]),
    "renew": lambda store, lease: store.renew(lease),
    "interrupts": lambda store, lease: store.interrupts(lease),
}


@pytest.mark.parametrize("method", list(FENCED))
async def test_every_fenced_method_refuses_a_stale_lease_and_writes_nothing(store: Store, method: str) -> None:
    old, new = await stale(store)
    forged = Lease("f", "r1", A, new.epoch, new.expires_at)  # the current epoch, another owner
    before = await store.load("f", "r1")
    for lease in (old, forged):
        with pytest.raises(LeaseLost, match=rf"{method}\(\): the run is at epoch 2, held by {B}") as caught:
            await FENCED[method](store, lease)
        assert (caught.value.flow, caught.value.run_id, caught.value.epoch) == ("f", "r1", lease.epoch)
        assert isinstance(caught.value, StoreError)
    assert await store.load("f", "r1") == before
    await FENCED[method](store, new)  # the holder's own goes through


@pytest.mark.parametrize("method", list(FENCED))
async def test_every_fenced_method_refuses_a_lease_of_a_deleted_run(store: Store, method: str) -> None:
    lease = await claimed(store)
    await store.delete("f", "r1")
    with pytest.raises(LeaseLost, match=rf"{method}\(\): the run is no longer stored"):
        await FENCED[method](store, lease)
    assert await store.list_runs() == []


async def test_a_release_of_a_stale_lease_does_nothing(store: Store) -> None:
    old, _ = await stale(store)
    before = await store.load("f", "r1")
    await store.release(old)
    assert await store.load("f", "r1") == before
    assert (await record(store)).owner == B


# -- writes and load() -------------------------------------------------------------------------------------


async def test_write_replaces_the_head_and_the_rows_it_names_and_keeps_the_others(store: Store) -> None:
    lease = await claimed(store)
    await store.write(lease, state(steps={"a": StepStatus.RUNNING}), [done("a", 1)])
    await store.commit_step(lease, done("b", 2))
    later = state(started=T0 + timedelta(hours=1), steps={"a": StepStatus.PENDING, "z": StepStatus.PENDING})
    await store.write(lease, later, [done("a", 10)])
    stored = await store.load("f", "r1")
    assert outputs(stored) == {"a": 10, "b": 2}
    steps = report(stored).steps
    assert set(steps) == {"a", "b", "z"}
    assert (steps["a"].status, steps["b"].status, steps["z"].status) == (
        StepStatus.COMPLETED,
        StepStatus.COMPLETED,
        StepStatus.PENDING,
    )
    assert report(stored).started_at == T0 + timedelta(hours=1)  # the head's
    assert (await record(store)).started_at == T0  # the record keeps the first


async def test_commit_step_adds_one_row_and_replaces_that_steps_row(store: Store) -> None:
    lease = await claimed(store)
    before = await record(store)
    await store.commit_step(lease, done("a", 1))
    await store.commit_step(lease, done("b", [1, {"x": None}]))
    await store.commit_step(lease, done("a", "again", second=7))
    stored = await store.load("f", "r1")
    assert outputs(stored) == {"a": "again", "b": [1, {"x": None}]}
    assert report(stored).steps["a"].finished_at == T0 + timedelta(seconds=7)
    assert report(stored).steps["c"].status is StepStatus.PENDING  # the head's
    assert stored is not None
    assert stored.record.updated_at >= before.updated_at
    assert stored.record.status is RunStatus.RUNNING


async def test_progress_replaces_the_report_and_keeps_the_rows_output(store: Store) -> None:
    lease = await claimed(store)
    await store.progress(lease, "b", running("b", 1))
    stored = await store.load("f", "r1")
    assert outputs(stored) == {}  # a row of progress alone has no output
    assert report(stored).steps["b"].started_at == T0 + timedelta(seconds=1)
    await store.progress(lease, "b", running("b", 2))
    assert report(await store.load("f", "r1")).steps["b"].started_at == T0 + timedelta(seconds=2)
    await store.commit_step(lease, done("a", 1))
    await store.progress(lease, "a", running("a", 3))  # (a step row's report, whatever the runtime sends)
    stored = await store.load("f", "r1")
    assert outputs(stored) == {"a": 1}
    assert report(stored).steps["a"].status is StepStatus.RUNNING


async def test_load_uses_the_reports_of_the_current_epochs_rows_only(store: Store) -> None:
    lease = await claimed(store)
    await store.commit_step(lease, done("a", 1))
    await store.progress(lease, "b", running("b", 1))
    await store.release(lease)
    claim = await store.claim("f", "r1", B)
    assert claim is not None
    assert claim.lease is not None
    stored = await store.load("f", "r1")
    assert outputs(stored) == {"a": 1}  # outputs of every row
    assert {name: step.status for name, step in report(stored).steps.items()} == dict.fromkeys(
        STEPS, StepStatus.PENDING
    )  # the head's reports: the rows are the last attempt's
    await store.commit_step(claim.lease, done("c", 3))
    steps = report(await store.load("f", "r1")).steps
    assert (steps["a"].status, steps["b"].status, steps["c"].status) == (
        StepStatus.PENDING,
        StepStatus.PENDING,
        StepStatus.COMPLETED,
    )


async def test_an_include_steps_row_holds_its_nested_checkpoint_until_it_completes(store: Store) -> None:
    lease = await claimed(store)
    inner = Checkpoint(flow="inner", flow_version="1", run_id="r1", inputs={}, outputs={"x": 1})
    outer = Checkpoint(flow="f", flow_version="1", run_id="r1", inputs={"n": 1}, outputs={}, nested={"inc": inner})
    started = StepReport(name="inc", status=StepStatus.RUNNING).model_dump_json()
    await store.commit_step(lease, StepRow("inc", started, outer.to_json()))
    stored = await store.load("f", "r1")
    assert stored is not None
    checkpoint = json.loads(stored.checkpoint_json)
    assert (checkpoint["outputs"], checkpoint["nested"]["inc"]["outputs"]) == ({}, {"x": 1})
    await store.commit_step(lease, done("inc", 2))
    stored = await store.load("f", "r1")
    assert stored is not None
    checkpoint = json.loads(stored.checkpoint_json)
    assert (checkpoint["outputs"], checkpoint["nested"]) == ({"inc": 2}, {})


async def test_renew_extends_the_lease(store: Store) -> None:
    lease = await claimed(store)
    renewed = await store.renew(lease)
    assert is_lease_of(renewed, "r1", A, 1)
    assert renewed.expires_at >= lease.expires_at
    assert (await record(store)).lease_expires_at == renewed.expires_at
    await store.commit_step(renewed, done("a", 1))  # the same lease: the old value works too
    await store.commit_step(lease, done("b", 2))


async def test_finish_writes_the_end_gives_the_run_up_and_drops_its_requests(store: Store) -> None:
    lease = await claimed(store)
    assert await store.interrupt("f", "r1", "stop")
    [(first, _)] = await store.interrupts(lease)
    await store.finish(lease, ended(status=RunStatus.INTERRUPTED), [done("a", 1)])
    found = await record(store)
    assert (found.status, found.owner, found.epoch, found.lease_expires_at) == (RunStatus.INTERRUPTED, None, 1, None)
    assert found.finished_at == T0 + timedelta(seconds=9)
    assert outputs(await store.load("f", "r1")) == {"a": 1}
    with pytest.raises(LeaseLost):  # given up: the lease is over
        await store.commit_step(lease, done("b", 2))
    claim = await store.claim("f", "r1", B)
    assert claim is not None
    assert claim.lease is not None
    assert await store.interrupts(claim.lease) == []  # the attempt that received it is over
    assert await store.interrupt("f", "r1", "again")
    [(second, _)] = await store.interrupts(claim.lease)
    assert second > first  # numbers only grow


async def test_release_gives_the_run_up_as_stored(store: Store) -> None:
    lease = await claimed(store)
    await store.commit_step(lease, done("a", 1))
    before = await store.load("f", "r1")
    await store.release(lease)
    after = await store.load("f", "r1")
    assert after is not None
    assert before is not None
    assert (after.record.owner, after.record.lease_expires_at, after.record.epoch) == (None, None, 1)
    assert after.record.status is RunStatus.ORPHANED  # running, nobody holds it
    assert (after.checkpoint_json, after.report_json) == (before.checkpoint_json, before.report_json)
    await store.release(lease)  # again: nothing happens
    assert await store.load("f", "r1") == after
    claim = await store.claim("f", "r1", B)  # at once
    assert claim is not None
    assert claim.lease is not None


# -- interrupts ---------------------------------------------------------------------------------------------


async def test_an_interrupt_of_a_live_run_is_a_request_its_owner_gets(store: Store) -> None:
    lease = await claimed(store)
    before = await store.load("f", "r1")
    assert await store.interrupts(lease) == []
    assert await store.interrupt("f", "r1", "deploy", source="ops")
    assert await store.interrupt("f", "r1", "now", force=True)
    requests = await store.interrupts(lease)
    assert [(s.reason, s.force, s.source) for _, s in requests] == [("deploy", False, "ops"), ("now", True, "api")]
    (first, signal), (second, _) = requests
    assert 0 < first < second
    assert isinstance(signal, InterruptSignal)
    assert signal.sent_at.tzinfo is not None
    assert await store.interrupts(lease, after=first) == requests[1:]
    assert await store.interrupts(lease, after=second) == []
    assert await store.interrupts(lease) == requests  # pending until the attempt ends
    assert await store.load("f", "r1") == before  # the run itself is unchanged


@pytest.mark.parametrize("how", ["queued", "released", "orphaned"])
async def test_an_interrupt_of_a_run_nobody_holds_marks_it_interrupted_at_once(short: Store, how: str) -> None:
    if how == "queued":
        await leave_unheld(short, "queued")
    else:
        lease = await claimed(short)
        await short.commit_step(lease, done("a", 1))
        await short.progress(lease, "b", running("b", 1))
        if how == "released":
            await short.release(lease)
        else:
            await wait_orphaned(short)
    before = await short.load("f", "r1")
    assert await short.interrupt("f", "r1", "cancelled by ops", source="cli")
    after = await short.load("f", "r1")
    assert after is not None
    assert before is not None
    assert (after.record.status, after.record.owner, after.record.lease_expires_at) == (
        RunStatus.INTERRUPTED,
        None,
        None,
    )
    assert after.record.finished_at is not None
    assert after.checkpoint_json == before.checkpoint_json  # unchanged
    ended_report = report(after)
    assert [(s.reason, s.source) for s in ended_report.interrupts] == [("cancelled by ops", "cli")]
    assert ended_report.finished_at == after.record.finished_at
    statuses = {name: step.status for name, step in ended_report.steps.items()}
    if how != "queued":
        assert statuses == {"a": StepStatus.COMPLETED, "b": StepStatus.INTERRUPTED, "c": StepStatus.NOT_STARTED}
    assert not await short.interrupt("f", "r1")  # ended now: nothing left to stop


@pytest.mark.parametrize("how", ["completed", "interrupted", "failed", "missing", "other flow"])
async def test_an_interrupt_of_a_run_that_ended_or_does_not_exist_is_false(store: Store, how: str) -> None:
    if how == "other flow":
        await claimed(store, flow="g")
    elif how != "missing":
        lease = await claimed(store)
        await store.finish(lease, ended(status=RunStatus(how)))
    before = await store.list_runs()
    assert not await store.interrupt("f", "r1")
    assert await store.list_runs() == before


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"reason": 1}, "reason must be a str, got int"),
        ({"force": "yes"}, "force must be a bool, got str"),
        ({"source": 3}, "source must be a str or None, got int"),
    ],
)
async def test_an_interrupt_of_the_wrong_types_is_a_type_error(
    store: Store, arguments: dict[str, Any], message: str
) -> None:
    await claimed(store)
    with pytest.raises(TypeError, match=rf"interrupt\(\): flow 'f', run 'r1': {message}"):
        await store.interrupt("f", "r1", **arguments)
    with pytest.raises(TypeError, match=r"interrupt\(\): run_id must be a str"):
        await store.interrupt("f", 1)  # type: ignore[arg-type]


# -- submit --------------------------------------------------------------------------------------------------


async def test_submit_queues_a_new_run(store: Store) -> None:
    assert await store.submit("f", "r1", state(), queue="q", labels={"k": "v"})
    found = await record(store)
    assert (found.status, found.owner, found.epoch, found.queue, found.lease_expires_at) == (
        RunStatus.QUEUED,
        None,
        0,
        "q",
        None,
    )
    assert isinstance(store, LabelStore)
    assert await store.labels("f", "r1") == {"k": "v"}
    assert await store.submit("g", "r2", state("r2", flow="g"))
    assert (await record(store, "r2", "g")).queue == "default"


@pytest.mark.parametrize("how", ["interrupted", "failed", "released", "queued"])
async def test_submit_queues_again_an_unfinished_run_nobody_holds(store: Store, how: str) -> None:
    await leave_unheld(store, how)
    before = await store.load("f", "r1")
    assert await store.submit("f", "r1", state(started=T0 + timedelta(hours=1)), queue="other")
    after = await store.load("f", "r1")
    assert after is not None
    assert before is not None
    assert (after.record.status, after.record.queue, after.record.owner) == (RunStatus.QUEUED, "other", None)
    assert (after.record.finished_at, after.record.started_at) == (None, T0)
    assert after.checkpoint_json == before.checkpoint_json  # it keeps its checkpoint


async def test_submit_of_a_completed_run_is_false(store: Store) -> None:
    lease = await claimed(store)
    await store.finish(lease, ended())
    before = await store.load("f", "r1")
    assert not await store.submit("f", "r1", state())
    assert await store.load("f", "r1") == before


async def test_submit_of_a_live_run_is_refused(store: Store) -> None:
    await claimed(store)
    before = await store.load("f", "r1")
    with pytest.raises(RunOwned) as caught:
        await store.submit("f", "r1", state())
    assert (caught.value.owner, caught.value.run_id) == (A, "r1")
    assert await store.load("f", "r1") == before


# -- claim_next ----------------------------------------------------------------------------------------------


async def test_claim_next_takes_runs_of_the_given_flows_and_queues_only(store: Store) -> None:
    assert await store.submit("f", "f-q", state("f-q"), queue="q")
    assert await store.submit("f", "f-other", state("f-other"), queue="other")
    assert await store.submit("g", "g-q", state("g-q", flow="g"), queue="q")
    claim = await store.claim_next(A, ["f"], [Queue("q")])
    assert claim is not None
    assert claim.lease is not None
    assert is_lease_of(claim.lease, "f-q", A, 1)
    assert claim.stored is not None
    assert claim.stored.record.status is RunStatus.QUEUED  # as it was stored
    assert (await record(store, "f-q")).owner == A
    assert await store.claim_next(A, ["f"], [Queue("q")]) is None
    assert await store.claim_next(A, ["h"], [Queue("q"), Queue("other")]) is None
    assert await store.claim_next(A, ["f", "g"], []) is None


async def test_claim_next_takes_the_oldest_first(store: Store) -> None:
    for run_id, minutes in (("late", 30), ("early", 10), ("middle", 20)):
        assert await store.submit("f", run_id, state(run_id, started=T0 + timedelta(minutes=minutes)), queue="q")
    taken = []
    for _ in range(3):
        claim = await store.claim_next(A, ["f"], [Queue("q")])
        assert claim is not None
        assert claim.lease is not None
        taken.append(claim.lease.run_id)
    assert taken == ["early", "middle", "late"]
    assert await store.claim_next(A, ["f"], [Queue("q")]) is None


async def test_claim_next_takes_orphaned_runs_in_any_queue_or_none(short: Store) -> None:
    assert await short.submit("f", "queued-elsewhere", state("queued-elsewhere"), queue="elsewhere")
    claim = await short.claim_next(A, ["f"], [Queue("elsewhere")])  # (the only run: a lease may expire any time)
    assert claim is not None
    assert claim.lease is not None
    assert claim.lease.run_id == "queued-elsewhere"
    await claimed(short, "direct")  # run directly: no queue
    await wait_orphaned(short, "direct")
    await wait_orphaned(short, "queued-elsewhere")
    taken = set()
    for _ in range(2):
        claim = await short.claim_next(B, ["f"], [Queue("q")])
        assert claim is not None
        assert claim.lease is not None
        assert (claim.lease.owner, claim.lease.epoch) == (B, 2)
        taken.add(claim.lease.run_id)
    assert taken == {"direct", "queued-elsewhere"}


async def test_claim_next_leaves_live_runs_and_runs_saved_running_without_a_claim(store: Store) -> None:
    await claimed(store, "live")
    await leave_unheld(store, "saved")  # its writer may live: nothing tells (status running, epoch 0)
    assert (await record(store)).status is RunStatus.RUNNING
    assert await store.claim_next(B, ["f"], [Queue("default")]) is None


async def test_a_queue_limit_holds_across_claims(store: Store) -> None:
    heavy = Queue("heavy", concurrency=2)
    for i in range(4):
        assert await store.submit("f", f"h{i}", state(f"h{i}", started=T0 + timedelta(minutes=i)), queue="heavy")
    assert await store.submit("f", "light", state("light", started=T0 + timedelta(hours=1)), queue="light")
    first = await store.claim_next(A, ["f"], [heavy])
    second = await store.claim_next(B, ["f"], [heavy, Queue("light")])
    assert first is not None
    assert second is not None
    assert first.lease is not None
    assert second.lease is not None
    assert [first.lease.run_id, second.lease.run_id] == ["h0", "h1"]
    assert await store.claim_next(A, ["f"], [heavy]) is None  # two of heavy's runs hold live leases
    light = await store.claim_next(A, ["f"], [heavy, Queue("light")])  # another queue is not held back
    assert light is not None
    assert light.lease is not None
    assert light.lease.run_id == "light"
    await store.finish(first.lease, ended("h0"))
    third = await store.claim_next(A, ["f"], [heavy])
    assert third is not None
    assert third.lease is not None
    assert third.lease.run_id == "h2"
    assert await store.claim_next(B, ["f"], [heavy]) is None  # h1 and h2 now
    unlimited = await store.claim_next(B, ["f"], [Queue("heavy")])  # the limit is what the claimer says
    assert unlimited is not None
    assert unlimited.lease is not None
    assert unlimited.lease.run_id == "h3"


# -- events (EventStore) ------------------------------------------------------------------------------------


def progress_event(done: float, run_id: str = "r1", flow: str = "f") -> str:
    """One event's JSON, as the runtime appends it."""
    return StepProgressEvent(run_id=run_id, flow=flow, at=T0, step="a", done=done).model_dump_json()


async def test_a_store_is_an_event_store(store: Store) -> None:
    assert isinstance(store, EventStore)


async def test_events_are_kept_in_the_order_appended(store: Store) -> None:
    assert isinstance(store, EventStore)
    lease = await claimed(store)
    await store.append_events(lease, [progress_event(1), progress_event(2)])
    await store.append_events(lease, [])
    await store.append_events(lease, [progress_event(3)])
    found = await store.events("f", "r1")
    assert isinstance(found, StoredEvents)
    assert [event.done for event in found if isinstance(event, StepProgressEvent)] == [1, 2, 3]
    assert found.dropped == 0
    assert found[0] == StepProgressEvent(run_id="r1", flow="f", at=T0, step="a", done=1)


async def test_an_unknown_run_has_no_events(store: Store) -> None:
    assert isinstance(store, EventStore)
    lease = await claimed(store)
    await store.append_events(lease, [progress_event(1)])
    for flow, run_id in (("f", "r2"), ("g", "r1")):
        found = await store.events(flow, run_id)
        assert (list(found), found.dropped) == ([], 0)


async def test_a_store_keeps_the_last_events_of_a_run_and_counts_the_dropped(store: Store) -> None:
    assert isinstance(store, EventStore)
    lease = await claimed(store)
    await store.append_events(lease, [progress_event(n) for n in range(1, EVENTS_KEPT - 2)])
    await store.append_events(lease, [progress_event(n) for n in range(EVENTS_KEPT - 2, EVENTS_KEPT + 6)])
    found = await store.events("f", "r1")
    assert len(found) == EVENTS_KEPT
    assert found.dropped == 5
    assert [event.done for event in found if isinstance(event, StepProgressEvent)] == list(range(6, EVENTS_KEPT + 6))


async def test_deleting_a_run_deletes_its_events(store: Store) -> None:
    assert isinstance(store, EventStore)
    lease = await claimed(store)
    await store.append_events(lease, [progress_event(1)])
    await store.delete("f", "r1")
    assert list(await store.events("f", "r1")) == []
    lease = await claimed(store)  # the same id again: a history of its own
    await store.append_events(lease, [progress_event(2)])
    assert [event.done for event in await store.events("f", "r1") if isinstance(event, StepProgressEvent)] == [2]


async def test_events_are_fenced_by_the_claim(store: Store) -> None:
    """The attempt that finished may still append (its end is told after `finish`); an earlier one may not."""
    assert isinstance(store, EventStore)
    lease = await claimed(store)
    await store.finish(lease, ended(status=RunStatus.INTERRUPTED))
    await store.append_events(lease, [progress_event(1)])
    claim = await store.claim("f", "r1", B)
    assert claim is not None
    assert claim.lease is not None
    with pytest.raises(LeaseLost, match="append_events"):
        await store.append_events(lease, [progress_event(2)])
    await store.append_events(claim.lease, [progress_event(3)])  # a resumed run appends to the same history
    assert [event.done for event in await store.events("f", "r1") if isinstance(event, StepProgressEvent)] == [1, 3]
    stranger = Lease("f", "r9", A, 1, claim.lease.expires_at)
    with pytest.raises(LeaseLost, match="no longer stored"):
        await store.append_events(stranger, [progress_event(4)])


async def test_events_must_be_json_texts(store: Store) -> None:
    assert isinstance(store, EventStore)
    lease = await claimed(store)
    for bad in ("{}", [1], None):
        with pytest.raises(TypeError, match="append_events"):
            await store.append_events(lease, bad)  # type: ignore[arg-type]
