"""Durability at the edges, from review: cancellation meeting a save, signals meeting the final save, stored
runs of a flow that changed, the durability rule across fan-outs, includes and PollNextN. Each of the first
five failed before its fix."""

from __future__ import annotations

import copy
from typing import Any

import anyio
import pytest

import stoppoint as sp

from .hooks import BasicOnly, HookedStore, LeaseClock, Write, committed

pytestmark = pytest.mark.anyio

# Each durability test runs on both paths of a run's writes: `leased` (a `Store`: write, commit_step,
# finish under the run's lease) and `whole` (a `BasicStore`: a whole save at each of those moments).
PATHS = pytest.mark.parametrize("path", ["leased", "whole"])


class _Recording:
    """Records the run's checkpoint as the store holds it after each write (`commits`), runs `before_each`
    before each write, and fails every write from the `fail_at`-th on (0: the first) with `StoreError`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[sp.Checkpoint] = []
        self.before_each: Any = None
        self.fail_at: int | None = None

    async def before(self, write: Write) -> None:
        if self.before_each is not None:
            await self.before_each(write)
        if self.fail_at is not None and write.n >= self.fail_at:
            raise sp.StoreError(f"disk full at write {write.n}")

    async def after(self, write: Write) -> None:
        checkpoint = await committed(self, write.flow, write.run_id)  # type: ignore[arg-type]
        assert checkpoint is not None
        self.commits.append(checkpoint)

    def committed(self) -> set[str]:
        return set(self.commits[-1].outputs) if self.commits else set()


class Recording(_Recording, HookedStore):
    """A `Store` (a MemoryStore) that records what each write committed."""


class RecordingBasic(_Recording, BasicOnly):
    """A `BasicStore` alone (whole saves) that records what each save committed."""


def recording(path: str) -> Recording | RecordingBasic:
    return Recording() if path == "leased" else RecordingBasic()


async def check_left_unfinished(store: Recording | RecordingBasic, record: sp.RunRecord, clock: LeaseClock) -> None:
    """A run whose end a failing store did not record reads back unfinished, and can be claimed again.

    On a BasicStore it reads back RUNNING (nothing tells). On a Store the attempt is over but nobody gave its
    lease up: RUNNING until it expires, ORPHANED after (were the lease given up, as
    test_leases_runtime.py expects, ORPHANED at once); either way a claim takes it once it expired."""
    assert record.finished_at is None
    if isinstance(store, HookedStore):
        assert record.status in (sp.RunStatus.RUNNING, sp.RunStatus.ORPHANED)
        assert record.epoch == 1
        clock.advance(store.lease + 1)
        [record] = await store.list_runs()
        assert record.status is sp.RunStatus.ORPHANED
    else:
        assert record.status is sp.RunStatus.RUNNING


# -- stored COMPLETED run, flow gained the result step at the same version -----------------------


async def test_completed_stored_run_flow_gained_result_step() -> None:
    store = sp.MemoryStore()
    f1 = sp.Flow("g", version="1")

    @f1.step
    async def a() -> int:
        return 1

    assert isinstance(await f1.run(store=store, run_id="r"), sp.Completed)

    f2 = sp.Flow("g", version="1")

    @f2.step(name="a")
    async def a2() -> int:
        return 1

    @f2.step
    async def b(a: int) -> int:
        return a + 1

    out = await f2.run(store=store, run_id="r")  # not complete for this flow: b runs (it was a KeyError)
    assert isinstance(out, sp.Completed)
    assert out.value == 2


# -- FlowRun cancelled: stored report vs returned outcome -----------------------------------------


async def test_flowrun_cancelled_stored_report_matches_outcome() -> None:
    store = sp.MemoryStore()
    flow = sp.Flow("c", version="1")
    entered = anyio.Event()

    @flow.step
    async def a() -> int:
        entered.set()
        await anyio.sleep_forever()
        return 1

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r")
        await entered.wait()
        tg.cancel_scope.cancel()
    out = await handle.outcome()
    assert isinstance(out, sp.Interrupted)
    stored = await store.load("c", "r")
    assert stored is not None
    stored_report = sp.RunReport.model_validate_json(stored.report_json)
    assert [s.source for s in out.report.interrupts] == ["cancel"]
    assert stored_report.interrupts == out.report.interrupts


# -- a signal arriving during the final save ----------------------------------------------------


@PATHS
async def test_signal_during_final_save_missing_from_stored_report(channel: Any, path: str) -> None:
    interrupter, receiver = channel
    store = recording(path)
    flow = sp.Flow("s", version="1")

    @flow.step
    async def a() -> int:
        return 1

    late: list[int] = []

    async def before(write: Write) -> None:
        if write.final:  # the final write: its I/O takes a while
            late.append(write.n)
            interrupter.interrupt("late")
            await anyio.lowlevel.checkpoint()

    store.before_each = before
    out = await flow.run(interrupts=receiver, store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert late == [2]  # the start, a's commit, the end
    stored = await store.load("s", "r")
    assert stored is not None
    stored_report = sp.RunReport.model_validate_json(stored.report_json)
    assert stored_report.interrupts == out.report.interrupts


# -- FlowRun cancelled + final save fails --------------------------------------------------------


@PATHS
async def test_flowrun_cancelled_and_final_save_fails_raises_store_error(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = LeaseClock(monkeypatch)
    store = recording(path)
    flow = sp.Flow("c", version="1")
    entered = anyio.Event()
    block = [True]

    @flow.step
    async def a() -> int:
        if block[0]:
            entered.set()
            await anyio.sleep_forever()
        return 1

    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r")
        await entered.wait()
        store.fail_at = 1  # the final write fails
        tg.cancel_scope.cancel()
    assert store.begun == 2  # the start, and the end that failed
    with pytest.raises(sp.StoreError):
        await handle.outcome()  # the run's end was not recorded: run() would raise StoreError
    [record] = await store.list_runs()
    await check_left_unfinished(store, record, clock)
    store.fail_at = None
    block[0] = False
    out = await flow.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert out.value == 1
    [record] = await store.list_runs()
    assert (record.status, record.epoch) == (sp.RunStatus.COMPLETED, 2 if isinstance(store, HookedStore) else 0)


# -- asyncio native cancel: final save -----------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@PATHS
async def test_native_cancel_final_save(anyio_backend: str, path: str) -> None:
    """A native asyncio Task.cancel() of a persisted run still saves how it ended (asyncio only by nature)."""
    import asyncio

    store = recording(path)
    flow = sp.Flow("n", version="1")
    entered = asyncio.Event()

    @flow.step
    async def a() -> int:
        entered.set()
        await asyncio.Event().wait()  # blocked until cancelled
        return 1

    task = asyncio.ensure_future(flow.run(store=store, run_id="r"))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = await store.load("n", "r")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.INTERRUPTED, stored.record
    assert store.begun == 2  # the start and the end


# -- durability: every step starts only with its dependencies committed ------------------------


def _check(store: Recording | RecordingBasic, deps: tuple[str, ...], name: str, log: list[str]) -> None:
    missing = [d for d in deps if d not in store.committed()]
    if missing:
        log.append(f"{name} started before {missing} committed")


@PATHS
@pytest.mark.parametrize("maxc", [None, 1, 2])
async def test_durability_fanout(maxc: int | None, path: str) -> None:
    store = recording(path)
    log: list[str] = []
    flow = sp.Flow("d", version="1", max_concurrency=maxc)

    @flow.step
    async def a() -> int:
        _check(store, (), "a", log)
        return 1

    @flow.step
    async def b() -> int:
        _check(store, (), "b", log)
        return 2

    @flow.step
    async def c(a: int, b: int) -> int:
        _check(store, ("a", "b"), "c", log)
        return a + b

    @flow.step
    async def d(a: int) -> int:
        _check(store, ("a",), "d", log)
        return a

    @flow.step
    async def e(c: int, d: int) -> int:
        _check(store, ("c", "d"), "e", log)
        return c + d

    out = await flow.run(store=store)
    assert isinstance(out, sp.Completed)
    assert log == []


@PATHS
async def test_durability_include(path: str) -> None:
    store = recording(path)
    log: list[str] = []
    inner = sp.Flow("inner", version="1")

    @inner.step
    async def x(a: int) -> int:
        top = store.commits[-1]
        if "a" not in top.outputs:
            log.append("x before a")
        return a + 1

    @inner.step
    async def y(x: int) -> int:
        top = store.commits[-1]
        if (
            "x"
            not in top.nested.get(
                "inc", sp.Checkpoint(flow="", flow_version="", run_id="", inputs={}, outputs={})
            ).outputs
        ):
            log.append("y before x")
        return x + 1

    outer = sp.Flow("outer", version="1")

    @outer.step
    async def a() -> int:
        return 1

    outer.include(inner, name="inc")

    @outer.step
    async def z(inc: int) -> int:
        if "inc" not in store.committed():
            log.append("z before inc")
        return inc

    out = await outer.run(store=store)
    assert isinstance(out, sp.Completed), out
    assert out.value == 3
    assert log == []


# -- crash in the middle of an inner flow: resume reuses its completed steps -------------------


@PATHS
async def test_crash_mid_include_resume_reuses_inner_steps(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = LeaseClock(monkeypatch)
    store = recording(path)
    snapshot = sp.MemoryStore() if isinstance(store, HookedStore) else BasicOnly()
    # The MemoryStores holding the runs of each (a BasicOnly keeps them in a MemoryStore of its own).
    memory = store if isinstance(store, HookedStore) else store.inner
    snapshot_memory = snapshot if isinstance(snapshot, sp.MemoryStore) else snapshot.inner
    calls: list[str] = []

    def build(crash: bool) -> sp.Flow:
        inner = sp.Flow("inner", version="1")

        @inner.step
        async def x(a: int) -> int:
            calls.append("x")
            return a + 1

        @inner.step
        async def y(x: int) -> int:
            calls.append("y")
            if crash:  # what a kill -9 here leaves on disk: a copy of the store, sharing nothing with it
                snapshot_memory._runs = copy.deepcopy(memory._runs)
            return x + 1

        outer = sp.Flow("outer", version="1")

        @outer.step
        async def a() -> int:
            calls.append("a")
            return 1

        outer.include(inner, name="inc")
        return outer

    await build(True).run(store=store, run_id="r")
    stored = await snapshot.load("outer", "r")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.RUNNING
    assert build(False).load_checkpoint(stored.checkpoint_json).nested["inc"].outputs == {"x": 2}
    if isinstance(snapshot, sp.MemoryStore):
        # The dead owner's lease is live until it expires, nobody renewing it: then the run is orphaned.
        assert stored.record.epoch == 1
        assert stored.record.owner is not None
        clock.advance(snapshot.lease + 1)
        [record] = await snapshot.list_runs()
        assert record.status is sp.RunStatus.ORPHANED
    calls.clear()
    out = await build(False).run(store=snapshot, run_id="r")
    assert isinstance(out, sp.Completed)
    assert out.value == 3
    assert calls == ["y"]
    [record] = await snapshot.list_runs()
    assert (record.status, record.epoch) == (sp.RunStatus.COMPLETED, 2 if isinstance(snapshot, sp.MemoryStore) else 0)
    inc = out.report.steps["inc"]
    assert inc.nested is not None
    assert inc.nested.steps["x"].resumed


# -- started_at kept across attempts ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_started_at_kept(kind: str, tmp_path: Any, channel: Any) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("t", version="1")
    stop = [True]

    @flow.step
    async def a(ctx: sp.StepContext) -> int:
        if stop[0]:
            interrupter.interrupt("x")
        await ctx.checkpoint()
        return 1

    store: Any = sp.MemoryStore() if kind == "memory" else sp.SQLiteStore(tmp_path / "s.db")
    first = await flow.run(interrupts=receiver, store=store, run_id="r")
    assert isinstance(first, sp.Interrupted)
    [r1] = await store.list_runs()
    stop[0] = False
    second = await flow.run(store=store, run_id="r")
    assert isinstance(second, sp.Completed)
    [r2] = await store.list_runs()
    assert r2.started_at == r1.started_at
    assert r2.status is sp.RunStatus.COMPLETED
    if kind == "sqlite":
        await store.aclose()


def a_then_b(name: str, started: list[str]) -> sp.Flow:
    """a -> b; each step notes that it started (b before its first await)."""
    flow = sp.Flow(name, version="1")

    @flow.step
    async def a() -> int:
        started.append("a")
        return 1

    @flow.step
    async def b(a: int) -> int:
        started.append("b")  # a side effect before b's first await
        await anyio.lowlevel.checkpoint()
        return a

    return flow


# -- caller cancels while a step's save is in flight: does a dependant start? ------------------


@PATHS
async def test_cancel_during_save_does_not_start_dependant(path: str) -> None:
    store = recording(path)
    started: list[str] = []
    flow = a_then_b("k", started)

    with anyio.CancelScope() as scope:

        async def before(write: Write) -> None:
            if "a" in write.outputs and not write.final:
                scope.cancel()  # the caller gives up while a's commit is on its way to disk
                await anyio.lowlevel.checkpoint()

        store.before_each = before
        await flow.run(store=store, run_id="r")
    assert scope.cancelled_caught
    assert started == ["a"]
    stored = await store.load("k", "r")
    assert stored is not None
    rep = sp.RunReport.model_validate_json(stored.report_json)
    assert rep.steps["b"].status == sp.StepStatus.NOT_STARTED, rep.steps["b"]


@PATHS
async def test_flowrun_cancel_during_save_does_not_start_dependant(path: str) -> None:
    store = recording(path)
    started: list[str] = []
    flow = a_then_b("k", started)

    async with anyio.create_task_group() as tg:

        async def before(write: Write) -> None:
            if "a" in write.outputs and not write.final:
                tg.cancel_scope.cancel()
                await anyio.lowlevel.checkpoint()

        store.before_each = before
        handle = await flow.start(tg, store=store, run_id="r")
    out = await handle.outcome()
    assert isinstance(out, sp.Interrupted)
    assert started == ["a"]
    assert out.report.steps["b"].status == sp.StepStatus.NOT_STARTED


# -- the store fails mid-run ------------------------------------------------------------------


@PATHS
async def test_store_fails_mid_run(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = LeaseClock(monkeypatch)
    store = recording(path)
    started: list[str] = []
    flow = a_then_b("f", started)

    store.fail_at = 1  # the write after a
    with pytest.raises(sp.StoreError, match="disk full at write 1"):
        await flow.run(store=store, run_id="r")
    assert started == ["a"]
    assert store.begun == 2  # no write after the one that failed
    stored = await store.load("f", "r")
    assert stored is not None
    assert set(flow.load_checkpoint(stored.checkpoint_json).outputs) == set()
    await check_left_unfinished(store, stored.record, clock)
    store.fail_at = None
    out = await flow.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert started == ["a", "a", "b"]  # a's output never reached the store: a runs again
    [record] = await store.list_runs()
    assert (record.status, record.epoch) == (sp.RunStatus.COMPLETED, 2 if isinstance(store, HookedStore) else 0)


# -- PollNextN durability after an interrupt --------------------------------------------------


@PATHS
@pytest.mark.parametrize("n", [0, 1, 2, 3])
async def test_durability_pollnextn(n: int, channel: Any, path: str) -> None:
    interrupter, receiver = channel
    store = recording(path)
    log: list[str] = []
    started: list[str] = []
    flow = sp.Flow("p", version="1")

    @flow.step
    async def a() -> int:
        started.append("a")
        interrupter.interrupt("now")
        return 1

    @flow.step
    async def b(a: int) -> int:
        started.append("b")
        _check(store, ("a",), "b", log)
        return a

    @flow.step
    async def c(a: int) -> int:
        started.append("c")
        _check(store, ("a",), "c", log)
        return a

    @flow.step
    async def d(b: int, c: int) -> int:
        started.append("d")
        _check(store, ("b", "c"), "d", log)
        return b + c

    out = await flow.run(interrupts=receiver, strategy=sp.PollNextN(n), store=store, run_id="r")
    assert log == []
    stored = await store.load("p", "r")
    assert stored is not None
    cp = flow.load_checkpoint(stored.checkpoint_json)
    if isinstance(out, sp.Interrupted):
        assert cp == out.checkpoint
        assert stored.record.status is sp.RunStatus.INTERRUPTED
    assert set(cp.outputs) == set(started)


# -- resume after a failure: report flags ----------------------------------------------------


async def test_resume_after_failure_report() -> None:
    store = sp.MemoryStore()
    fail = [True]
    flow = sp.Flow("r", version="1")

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(a: int) -> int:
        if fail[0]:
            raise ValueError("boom")
        return a + 1

    with pytest.raises(sp.StepFailed) as info:
        await flow.run(store=store, run_id="r")
    stored = await store.load("r", "r")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.FAILED
    assert flow.load_checkpoint(stored.checkpoint_json) == info.value.checkpoint
    assert sp.RunReport.model_validate_json(stored.report_json) == info.value.report
    fail[0] = False
    out = await flow.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert out.value == 2
    assert out.report.steps["a"].resumed
    assert not out.report.steps["b"].resumed
    assert out.report.steps["b"].status == sp.StepStatus.COMPLETED
    again = await flow.run(store=store, run_id="r")
    assert isinstance(again, sp.Completed)
    assert again.report == out.report
    async with anyio.create_task_group() as tg:
        h = await flow.start(tg, store=store, run_id="r")
    assert h.done
    assert (await h.outcome()).value == 2
    assert h.report == out.report


# -- interrupt inside an include, resume from the store -------------------------------------


@pytest.mark.parametrize("strategy", [sp.AtCheckpoint(), sp.FinishCurrent(), sp.PollNextN(1)])
async def test_interrupt_in_include_resume_from_store(channel: Any, strategy: sp.Strategy) -> None:
    interrupter, receiver = channel
    store = Recording()
    calls: list[str] = []
    stop = [True]
    inner = sp.Flow("inner", version="1")

    @inner.step
    async def x(ctx: sp.StepContext, a: int) -> int:
        calls.append("x")
        if stop[0]:
            interrupter.interrupt("now")
        await ctx.checkpoint()
        return a + 1

    @inner.step
    async def y(x: int) -> int:
        calls.append("y")
        return x + 1

    @inner.step
    async def w(y: int) -> int:
        calls.append("w")
        return y + 1

    outer = sp.Flow("outer", version="1")

    @outer.step
    async def a() -> int:
        calls.append("a")
        return 1

    outer.include(inner, name="inc")

    @outer.step
    async def z(inc: int) -> int:
        calls.append("z")
        return inc

    first = await outer.run(interrupts=receiver, strategy=strategy, store=store, run_id="r")
    assert isinstance(first, sp.Interrupted)
    stored = await store.load("outer", "r")
    assert stored is not None
    assert outer.load_checkpoint(stored.checkpoint_json) == first.checkpoint
    assert sp.RunReport.model_validate_json(stored.report_json) == first.report
    assert stored.record.status is sp.RunStatus.INTERRUPTED
    done_inner = set(first.checkpoint.nested["inc"].outputs) if "inc" in first.checkpoint.nested else set()
    calls_before = list(calls)
    calls.clear()
    stop[0] = False
    out = await outer.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert out.value == 4
    assert not (set(calls) & (done_inner | {"a"})), (calls_before, calls)
    nested = out.report.steps["inc"].nested
    assert nested is not None
    assert {n for n, s in nested.steps.items() if s.resumed} == done_inner


async def test_completed_stored_run_flow_gained_nonresult_step() -> None:
    store = sp.MemoryStore()
    f1 = sp.Flow("g2", version="1")

    @f1.step
    async def a() -> int:
        return 1

    assert isinstance(await f1.run(store=store, run_id="r"), sp.Completed)
    ran: list[str] = []
    f2 = sp.Flow("g2", version="1", result="a")

    @f2.step(name="a")
    async def a2() -> int:
        return 1

    @f2.step
    async def audit(a: int) -> None:
        ran.append("audit")

    out = await f2.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert set(out.report.steps) == {"a", "audit"}, out.report.steps.keys()


async def test_failed_inside_include_resume_from_store() -> None:
    store = sp.MemoryStore()
    calls: list[str] = []
    fail = [True]
    inner = sp.Flow("inner", version="1")

    @inner.step
    async def x() -> int:
        calls.append("x")
        return 1

    @inner.step
    async def y(x: int) -> int:
        calls.append("y")
        if fail[0]:
            raise RuntimeError("boom")
        return x + 1

    outer = sp.Flow("outer", version="1")
    outer.include(inner, name="inc")

    with pytest.raises(sp.StepFailed) as info:
        await outer.run(store=store, run_id="r")
    stored = await store.load("outer", "r")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.FAILED
    assert outer.load_checkpoint(stored.checkpoint_json) == info.value.checkpoint
    calls.clear()
    fail[0] = False
    out = await outer.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert out.value == 2
    assert calls == ["y"]


@pytest.mark.parametrize("c_also_waits_for_a", [True, False])
async def test_a_gained_prerequisite_of_a_completed_step_never_runs_that_step_again(c_also_waits_for_a: bool) -> None:
    """A flow that gained, at the same version, a step that a completed step now waits for (with
    another, or alone): on resume the new step runs, and the completed step is not run again."""
    store = sp.MemoryStore()
    ran: list[str] = []
    f1 = sp.Flow("gained", version="1")

    @f1.step
    async def a() -> int:
        ran.append("a")
        return 1

    @f1.step
    async def c(a: int) -> int:
        ran.append("c")
        return a + 10

    assert isinstance(await f1.run(store=store, run_id="r"), sp.Completed)
    f2 = sp.Flow("gained", version="1")

    @f2.step(name="a")
    async def a2() -> int:
        ran.append("a again")
        return 1

    @f2.step
    async def b() -> int:
        ran.append("b")
        return 2

    @f2.step(name="c", after=("a", "b") if c_also_waits_for_a else ("b",))
    async def c2() -> int:
        ran.append("c again")
        return 11

    @f2.step(name="d")
    async def d(c: int, b: int) -> int:  # waits for the completed step and the new one
        ran.append("d")
        return c + b

    out = await f2.run(store=store, run_id="r")
    assert isinstance(out, sp.Completed)
    assert out.value == 13
    assert ran == ["a", "c", "b", "d"]
