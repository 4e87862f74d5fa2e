"""A run with a `Store` has one owner: claims, fencing, lease loss, interrupts by run id (API.md §9),
within one process on MemoryStore (tests/test_leases_processes.py has the real processes)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

import stoppoint as sp

from .conftest import a_then_b, until
from .hooks import HookedStore, Write

pytestmark = pytest.mark.anyio


async def orphaned(store: sp.Store) -> bool:
    return (await store.list_runs())[0].status is sp.RunStatus.ORPHANED


def gated_flow(entered: anyio.Event, release: anyio.Event, calls: list[str]) -> sp.Flow:
    """a -> b -> c; b waits at stopping points until `release` is set."""
    flow = sp.Flow("gated", version="1")

    @flow.step
    async def a() -> int:
        calls.append("a")
        return 1

    @flow.step
    async def b(a: int, ctx: sp.StepContext) -> int:
        calls.append("b")
        entered.set()
        while not release.is_set():
            await ctx.checkpoint()
            await anyio.sleep(0.005)
        return a + 1

    @flow.step
    async def c(b: int) -> int:
        calls.append("c")
        return b + 1

    return flow


async def test_a_second_start_of_a_running_run_id_raises_run_owned_and_runs_nothing() -> None:
    store = sp.MemoryStore()
    entered, release, calls = anyio.Event(), anyio.Event(), []
    flow = gated_flow(entered, release, calls)
    async with anyio.create_task_group() as tg:
        first = await flow.start(tg, store=store, run_id="r")
        with anyio.fail_after(5):
            await entered.wait()
        with pytest.raises(sp.RunOwned) as caught:
            await flow.start(tg, store=store, run_id="r")
        assert caught.value.run_id == "r"
        assert caught.value.flow == "gated"
        assert caught.value.owner == (await store.list_runs())[0].owner
        release.set()
        outcome = await first.outcome()
    assert isinstance(outcome, sp.Completed)
    assert calls == ["a", "b", "c"]


async def test_of_ten_runs_racing_for_one_id_exactly_one_runs() -> None:
    store = sp.MemoryStore()
    entered, release, calls = anyio.Event(), anyio.Event(), []
    flow = gated_flow(entered, release, calls)
    results: list[object] = []

    async def one() -> None:
        try:
            results.append(await flow.run(store=store, run_id="r"))
        except sp.RunOwned as exc:
            results.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
            await entered.wait()
            # every loser has given up by the time the winner's step b is running and the others are blocked
            await anyio.wait_all_tasks_blocked()
            release.set()
    assert sum(isinstance(r, sp.Completed) for r in results) == 1
    assert sum(isinstance(r, sp.RunOwned) for r in results) == 9
    assert calls == ["a", "b", "c"]


async def test_epochs_count_claims_and_a_resume_sees_the_next_one() -> None:
    store = sp.MemoryStore()
    seen: list[int] = []
    interrupter, receiver = sp.interrupt_channel()
    flow = sp.Flow("epochs", version="1")

    @flow.step
    async def a(ctx: sp.StepContext) -> int:
        seen.append(ctx.epoch)
        return 1

    @flow.step
    async def b(a: int, ctx: sp.StepContext) -> int:
        seen.append(ctx.epoch)
        if ctx.epoch == 1:
            interrupter.interrupt("stop once")
            await ctx.checkpoint()
        return a + 1

    with interrupter, receiver:
        first = await flow.run(store=store, run_id="r", interrupts=receiver)
    assert isinstance(first, sp.Interrupted)
    second = await flow.run(store=store, run_id="r")
    assert isinstance(second, sp.Completed)
    assert seen == [1, 1, 2]
    record = (await store.list_runs())[0]
    assert (record.epoch, record.owner, record.status) == (2, None, sp.RunStatus.COMPLETED)
    outside = sp.StepContext(run_id="x", flow="f", step="s")
    assert outside.epoch == 0


async def test_an_interrupt_by_run_id_reaches_the_live_owner_as_a_graceful_signal() -> None:
    store = sp.MemoryStore()
    entered, release, calls = anyio.Event(), anyio.Event(), []
    flow = gated_flow(entered, release, calls)
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r")
        with anyio.fail_after(5):
            await entered.wait()
        assert await store.interrupt("gated", "r", "from elsewhere", source="ops") is True
        with anyio.fail_after(5):
            outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert not outcome.forced
    assert (outcome.signal.reason, outcome.signal.source) == ("from elsewhere", "ops")
    assert outcome.report.steps["b"].status is sp.StepStatus.INTERRUPTED
    assert outcome.report.steps["b"].stopped_at is not None
    stored = await store.load("gated", "r")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.INTERRUPTED
    assert stored.record.owner is None
    assert json.loads(stored.checkpoint_json)["outputs"] == {"a": 1}
    assert calls == ["a", "b"]
    assert await store.interrupt("gated", "r") is False  # it ended: nothing to stop


async def test_a_forced_interrupt_by_run_id_cancels_a_step_that_never_reaches_a_stopping_point() -> None:
    store = sp.MemoryStore()
    entered = anyio.Event()
    flow = sp.Flow("stuck", version="1")

    @flow.step
    async def a() -> int:
        entered.set()
        await anyio.sleep_forever()
        return 1

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r")
        with anyio.fail_after(5):
            await entered.wait()
        assert await store.interrupt("stuck", "r", "now", force=True)
        with anyio.fail_after(5):
            outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.steps["a"].status is sp.StepStatus.CANCELLED


async def test_a_run_nobody_holds_is_marked_interrupted_at_once_and_resumes_later() -> None:
    store = sp.MemoryStore(lease=0.2)
    flow = sp.Flow("left", version="1")
    calls: list[str] = []

    @flow.step
    async def a() -> int:
        calls.append("a")
        return 1

    @flow.step
    async def b(a: int) -> int:
        calls.append("b")
        return a + 1

    # An owner that claimed the run and died: its lease expires, nobody renews it.
    new = sp.RunState(
        flow_version="1",
        status=sp.RunStatus.RUNNING,
        started_at=datetime.now(UTC),
        finished_at=None,
        checkpoint_json=sp.Checkpoint(flow="left", flow_version="1", run_id="r", inputs={}, outputs={}).to_json(),
        report_json=sp.RunReport(
            run_id="r",
            flow="left",
            started_at=datetime.now(UTC),
            steps={},
        ).model_dump_json(),
    )
    claim = await store.claim("left", "r", "dead:1/x", new=new)
    assert claim is not None
    assert claim.lease is not None
    await until(lambda: orphaned(store))
    assert await store.interrupt("left", "r", "give up") is True
    stored = await store.load("left", "r")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.INTERRUPTED
    assert sp.RunReport.model_validate_json(stored.report_json).interrupts[-1].reason == "give up"
    out = await flow.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert calls == ["a", "b"]


class StuckRenewals(sp.MemoryStore):
    """Renewals that hang until released: the owner cannot keep its lease."""

    def __init__(self, lease: float) -> None:
        super().__init__(lease=lease)
        self.renewals = anyio.Event()
        self.unstick = anyio.Event()
        self.writes: list[tuple[str, int]] = []

    async def renew(self, lease: sp.Lease) -> sp.Lease:
        self.renewals.set()
        await self.unstick.wait()
        return await super().renew(lease)

    async def commit_step(self, lease: sp.Lease, step: sp.StepRow) -> None:
        self.writes.append((step.step, lease.epoch))
        await super().commit_step(lease, step)


async def test_an_owner_whose_renewals_stall_stops_itself_with_lease_lost_before_it_expires() -> None:
    store = StuckRenewals(lease=0.6)
    entered, release, calls = anyio.Event(), anyio.Event(), []
    flow = gated_flow(entered, release, calls)
    with anyio.fail_after(10), pytest.raises(sp.LeaseLost) as caught:
        await flow.run(store=store, run_id="r")
    assert caught.value.epoch == 1
    assert "0.8" in str(caught.value)
    assert calls == ["a", "b"]  # b was cancelled at once; c never started
    assert store.writes == [("a", 1)]
    store.unstick.set()
    # Nothing more was written: the stored run is as the last fenced write left it, claimable by another.
    stored = await store.load("gated", "r")
    assert stored is not None
    assert json.loads(stored.checkpoint_json)["outputs"] == {"a": 1}


class UnheldRenewals(StuckRenewals):
    """Renewals that answer at once without extending the lease (an owner whose clock runs slow, say): its
    own fence is content, so only the store's fencing can stop its writes once another claims the run. Its
    polls for interrupt requests are not fenced either: the refused write, not a poll that happened to come
    first (every 20 ms), is what stops the run."""

    async def renew(self, lease: sp.Lease) -> sp.Lease:
        return lease

    async def interrupts(self, lease: sp.Lease, after: int = 0) -> list[tuple[int, sp.InterruptSignal]]:
        return []


async def test_a_write_after_another_claim_is_refused_and_the_run_raises_lease_lost() -> None:
    store = UnheldRenewals(lease=0.3)
    entered, release, calls = anyio.Event(), anyio.Event(), []
    flow = gated_flow(entered, release, calls)

    async def taker() -> None:
        # Wait for the lease to expire, claim the run as another owner, then let the first one go on.
        await entered.wait()
        await until(lambda: orphaned(store))
        claim = await store.claim("gated", "r", "other:2/y")
        assert claim is not None
        assert claim.lease is not None
        assert claim.lease.epoch == 2
        release.set()

    outcome: list[Any] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(taker)
            try:
                await flow.run(store=store, run_id="r")
            except sp.LeaseLost as exc:
                outcome.append(exc)
    assert len(outcome) == 1
    assert "held by other:2/y" in str(outcome[0])  # refused by the store, not by the owner's own fence
    assert store.writes == [("a", 1), ("b", 1)]  # b's commit was tried, and refused
    record = (await store.list_runs())[0]
    assert (record.owner, record.epoch) == ("other:2/y", 2)
    assert ("c", 1) not in store.writes
    stored = await store.load("gated", "r")
    assert stored is not None
    assert "c" not in json.loads(stored.checkpoint_json)["outputs"]


async def test_a_bad_option_with_a_store_claims_nothing() -> None:
    store = sp.MemoryStore()
    flow = sp.Flow("opts", version="1")

    @flow.step
    async def a() -> int:
        return 1

    with pytest.raises(TypeError):
        await flow.run(store=store, run_id="r", strategy="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grace"):
        await flow.run(store=store, run_id="r", grace=-1)
    assert await store.list_runs() == []


async def test_inputs_that_differ_from_the_stored_runs_leave_it_claimable_at_once() -> None:
    store = sp.MemoryStore()
    interrupter, receiver = sp.interrupt_channel()
    flow = sp.Flow("inputs", version="1")

    @flow.step
    async def a(x: int) -> int:
        interrupter.interrupt()
        return x

    @flow.step
    async def b(a: int) -> int:
        return a + 1

    with interrupter, receiver:
        assert isinstance(await flow.run({"x": 1}, store=store, run_id="r", interrupts=receiver), sp.Interrupted)
    with pytest.raises(sp.CheckpointMismatch):
        await flow.run({"x": 2}, store=store, run_id="r")
    record = (await store.list_runs())[0]
    assert (record.status, record.owner) == (sp.RunStatus.INTERRUPTED, None)
    out = await flow.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert out.value == 2


async def test_a_running_steps_progress_reaches_the_store() -> None:
    store = sp.MemoryStore()
    reported, release = anyio.Event(), anyio.Event()
    flow = sp.Flow("progress", version="1")

    @flow.step
    async def a(ctx: sp.StepContext) -> int:
        ctx.progress(3, 10, "three")
        reported.set()
        await release.wait()
        return 1

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r")
        await reported.wait()

        async def shows_progress() -> bool:
            stored = await store.load("progress", "r")
            assert stored is not None
            return sp.RunReport.model_validate_json(stored.report_json).steps["a"].progress is not None

        await until(shows_progress)
        stored = await store.load("progress", "r")
        assert stored is not None
        step = sp.RunReport.model_validate_json(stored.report_json).steps["a"]
        assert step.progress is not None
        assert step.status is sp.StepStatus.RUNNING
        assert (step.progress.done, step.progress.total, step.progress.message) == (3, 10, "three")
        release.set()
        assert isinstance(await handle.outcome(), sp.Completed)
    stored = await store.load("progress", "r")
    assert stored is not None
    assert sp.RunReport.model_validate_json(stored.report_json).steps["a"].status is sp.StepStatus.COMPLETED


# -- found while porting the tests that hooked MemoryStore.save() --


@pytest.mark.parametrize("failing", ["write", "commit_step", "finish"])
async def test_an_attempt_ended_by_a_failing_write_gives_its_lease_up(failing: str) -> None:
    """The store fails once (a blip), at the start, a commit or the end: run() raises the StoreError, and the
    attempt is over. Nobody holds the run any more: the lease should be given up (best effort, as `_claimed`
    does when an attempt cannot be set up), the run be ORPHANED (stored running, nobody holds it), and
    run() again resume it at once, as it does on a BasicStore."""
    blips = [failing]

    async def before(write: Write) -> None:
        if write.kind in blips:
            blips.remove(write.kind)
            raise sp.StoreError("the store blinked")

    store = HookedStore(before=before)
    ran: list[str] = []
    with pytest.raises(sp.StoreError, match="the store blinked"):
        await a_then_b(ran).run(store=store, run_id="r")
    [record] = await store.list_runs()
    assert record.finished_at is None  # the end was not written (or, failing at the end, not the end)
    assert record.owner is None
    assert record.status is sp.RunStatus.ORPHANED
    outcome = await a_then_b(ran).run(store=store, run_id="r")
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 2


class ProgressSeen(sp.MemoryStore):
    """A MemoryStore that sets `progressed` once it has written a running step's progress."""

    def __init__(self) -> None:
        super().__init__()
        self.progressed = anyio.Event()

    async def progress(self, lease: sp.Lease, step: str, report_json: str) -> None:
        await super().progress(lease, step, report_json)
        self.progressed.set()


@pytest.mark.parametrize("ending", ["failed", "interrupted", "cancelled"])
async def test_a_step_that_wrote_progress_is_stored_as_it_ended(
    ending: str, channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored report of an ended run is its outcome's (as on a BasicStore): a step that reported
    progress and did not complete shows how it ended, not the running report of its last progress."""
    monkeypatch.setattr("stoppoint._persist.PROGRESS_INTERVAL", 0.01)  # not a second per test
    interrupter, receiver = channel
    store = ProgressSeen()
    go = anyio.Event()
    flow = sp.Flow("progressing", version="1")

    @flow.step
    async def a(ctx: sp.StepContext) -> int:
        ctx.progress(1, 3, "one")
        await go.wait()
        if ending == "failed":
            raise RuntimeError("boom")
        await ctx.checkpoint()
        return 1

    report: sp.RunReport | None = None
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            handle = await flow.start(tg, store=store, run_id="r", interrupts=receiver)
            await store.progressed.wait()
            if ending == "interrupted":
                interrupter.interrupt("stop")
            elif ending == "cancelled":
                tg.cancel_scope.cancel()
            go.set()
        try:
            outcome = await handle.outcome()
        except sp.StepFailed as failed:
            report = failed.report
        else:
            report = outcome.report
    assert report is not None
    assert report.steps["a"].status is sp.StepStatus(ending)
    stored = await store.load("progressing", "r")
    assert stored is not None
    assert sp.RunReport.model_validate_json(stored.report_json).steps["a"].status is sp.StepStatus(ending)
    assert sp.RunReport.model_validate_json(stored.report_json) == report


class StartRows(sp.MemoryStore):
    """Records how many step rows each attempt's start write carries."""

    def __init__(self) -> None:
        super().__init__()
        self.start_rows: list[list[str]] = []

    async def write(self, lease: sp.Lease, state: sp.RunState, steps: Sequence[sp.StepRow] = ()) -> None:
        self.start_rows.append([row.step for row in steps])
        await super().write(lease, state, steps)


async def test_a_resume_from_the_store_rewrites_no_step_row_and_one_from_a_checkpoint_writes_its_outputs() -> None:
    interrupter, receiver = sp.interrupt_channel()
    flow = sp.Flow("rows", version="1")

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(a: int, ctx: sp.StepContext) -> int:
        if ctx.epoch == 1:
            interrupter.interrupt()
            await ctx.checkpoint()
        return a + 1

    store = StartRows()
    with interrupter, receiver:
        first = await flow.run(store=store, run_id="r", interrupts=receiver)
    assert isinstance(first, sp.Interrupted)
    assert isinstance(await flow.run(store=store, run_id="r"), sp.Completed)
    assert store.start_rows == [[], []]  # a's row was committed once, by its step, and not written again

    elsewhere = StartRows()
    out = await flow.run(store=elsewhere, resume=first.checkpoint)
    assert isinstance(out, sp.Completed)
    assert elsewhere.start_rows == [["a"]]  # the checkpoint's output goes in with the head
    stored = await elsewhere.load("rows", "r")
    assert stored is not None
    assert json.loads(stored.checkpoint_json)["outputs"] == {"a": 1, "b": 2}
