"""Queue and workers (API.md §9): `flow.submit()` stores a queued run, `sp.Worker` claims queued and orphaned
runs of its flows from its queues and runs them; interrupts from anywhere reach its runs as ordinary signals.

On both stores (conftest's `store`) where a test needs no store of its own; the command is driven in
test_cli_worker.py. No test sleeps to order events: the steps wait on anyio Events, and the worker's own
events (its `_listener`, which the `stoppoint worker` command prints from) say when a run was claimed or ended.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import structlog.testing

import stoppoint as sp
from stoppoint._flow import plan_of
from stoppoint._launch import new_state

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds: a bound on any wait, never a way to order events


class Watch:
    """The workers' events: `await watch.ended(run_id)` waits for the run's end and returns its fields."""

    def __init__(self, *workers: sp.Worker) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = anyio.Event()
        for worker in workers:
            worker._listener = self

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.events.append((event, fields))
        self._changed.set()
        self._changed = anyio.Event()

    def of(self, event: str, run_id: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event and fields.get("run_id") == run_id]

    async def ended(self, run_id: str, count: int = 1) -> dict[str, Any]:
        with anyio.fail_after(WAIT):
            while len(self.of("worker.run_ended", run_id)) < count:
                await self._changed.wait()
        return self.of("worker.run_ended", run_id)[-1]


@contextlib.asynccontextmanager
async def serving(worker: sp.Worker) -> AsyncIterator[sp.Worker]:
    """`worker.run()` in a task for the block; stopped (gracefully) when the block ends."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            yield worker
        finally:
            worker.stop()


async def record(store: sp.Store, run_id: str) -> sp.RunRecord:
    found = [record for record in await store.list_runs() if record.run_id == run_id]
    assert len(found) == 1
    return found[0]


def adder(name: str = "adder", version: str = "1") -> sp.Flow:
    flow = sp.Flow(name, version=version)

    @flow.step
    async def add(x: int, y: int = 1) -> int:
        return x + y

    return flow


class OnlyBasic:
    """A store of stoppoint 0.1: whole saves, no leases, no queue."""

    async def save(self, checkpoint: sp.Checkpoint, report: sp.RunReport) -> None: ...

    async def load(self, flow: str, run_id: str) -> sp.StoredRun | None:
        return None

    async def list_runs(self, flow: str | None = None) -> list[sp.RunRecord]:
        return []

    async def delete(self, flow: str, run_id: str) -> None: ...


# -- submit -----------------------------------------------------------------------------------------------


async def test_submit_stores_a_queued_run_nobody_holds() -> None:
    store = sp.MemoryStore()
    flow = adder()
    run_id = await flow.submit(store, {"x": 1})
    assert isinstance(run_id, str)
    assert len(run_id) == 32
    assert int(run_id, 16) >= 0  # a new hex id
    assert await flow.submit(store, {"x": 2}, run_id="mine", queue="heavy") == "mine"
    first, mine = await record(store, run_id), await record(store, "mine")
    assert (first.status, first.queue, first.owner, first.epoch) == (sp.RunStatus.QUEUED, "default", None, 0)
    assert (mine.status, mine.queue) == (sp.RunStatus.QUEUED, "heavy")
    stored = await store.load("adder", "mine")
    assert stored is not None
    checkpoint = flow.load_checkpoint(stored.checkpoint_json)
    assert (checkpoint.inputs, checkpoint.outputs) == ({"x": 2}, {})


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [(None, "missing"), ({"x": 1, "z": 2}, "unknown"), ({"x": "not a number"}, "x")],
)
async def test_submit_checks_the_inputs_as_run_does_before_anything_is_stored(
    inputs: dict[str, Any] | None, problem: str
) -> None:
    store = sp.MemoryStore()
    with pytest.raises(sp.FlowInputError, match=problem) as raised:
        await adder().submit(store, inputs, run_id="r")
    assert "adder" in str(raised.value)
    assert await store.list_runs() == []


async def test_submit_refuses_what_is_not_a_store_of_queues() -> None:
    flow = adder()
    for store in (OnlyBasic(), sp.MemoryStore, object()):
        with pytest.raises(TypeError, match="flow 'adder': submit\\(\\) needs a Store"):
            await flow.submit(store, {"x": 1})  # type: ignore[arg-type]
    store = sp.MemoryStore()
    with pytest.raises(TypeError, match="queue must be a non-empty str"):
        await flow.submit(store, {"x": 1}, queue="")
    with pytest.raises(TypeError, match="run_id must be a non-empty str"):
        await flow.submit(store, {"x": 1}, run_id="")
    with pytest.raises(sp.FlowInputError):
        await flow.submit(store, {"x": 1}, run_id="\udcff")  # UTF-8 cannot carry it
    assert await store.list_runs() == []


async def test_submit_queues_a_stored_unfinished_run_again_with_its_own_inputs() -> None:
    store = sp.MemoryStore()
    flow = sp.Flow("halting")

    @flow.step
    async def first(x: int) -> int:
        return x

    @flow.step
    async def second(ctx: sp.StepContext, first: int) -> int:
        await ctx.checkpoint()
        return first + 1

    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        interrupter.interrupt("now")  # stops before the first step
        outcome = await flow.run({"x": 5}, store=store, run_id="r", interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert (await record(store, "r")).status is sp.RunStatus.INTERRUPTED

    with pytest.raises(sp.CheckpointMismatch, match="inputs differ"):
        await flow.submit(store, {"x": 6}, run_id="r")
    assert await flow.submit(store, run_id="r", queue="later") == "r"  # its inputs: none needed
    again = await record(store, "r")
    assert (again.status, again.queue) == (sp.RunStatus.QUEUED, "later")

    other_version = sp.Flow("halting", version="2")

    @other_version.step
    async def only(x: int) -> int:
        return x

    with pytest.raises(sp.CheckpointMismatch, match="version"):
        await other_version.submit(store, run_id="r")


async def test_submit_leaves_a_completed_run_as_it_is() -> None:
    store = sp.MemoryStore()
    flow = adder()
    assert (await flow.run({"x": 1}, store=store, run_id="done")).value == 2  # type: ignore[union-attr]
    assert await flow.submit(store, {"x": 1}, run_id="done") == "done"
    assert (await record(store, "done")).status is sp.RunStatus.COMPLETED


# -- the worker ------------------------------------------------------------------------------------------


async def test_a_worker_runs_queued_runs_of_its_flows_from_its_queues_only(store: sp.Store) -> None:
    mine, theirs = adder("mine"), adder("theirs")
    # Submitted first, so a worker that did not filter would claim them first (oldest first).
    other_queue = await mine.submit(store, {"x": 1}, queue="other")
    other_flow = await theirs.submit(store, {"x": 1})
    wanted = [await mine.submit(store, {"x": n}) for n in range(3)]
    wanted.append(await mine.submit(store, {"x": 10}, queue="second"))
    worker = sp.Worker(store, [mine], queues=("default", sp.Queue("second")))
    watch = Watch(worker)
    async with serving(worker):
        for run_id in wanted:
            assert (await watch.ended(run_id))["status"] == "completed"
    for run_id, value in zip(wanted, [1, 2, 3, 11], strict=True):
        outcome = await mine.run(store=store, run_id=run_id)  # the stored result, nothing runs
        assert isinstance(outcome, sp.Completed)
        assert outcome.value == value
    assert (await record(store, other_queue)).status is sp.RunStatus.QUEUED
    assert (await record(store, other_flow)).status is sp.RunStatus.QUEUED
    assert watch.of("worker.claimed", other_queue) == watch.of("worker.claimed", other_flow) == []


class Gauge:
    """How many steps run at once, and the most that ever did (the loop's one thread: no lock needed)."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.reached: dict[int, anyio.Event] = {}

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.reached.setdefault(self.now, anyio.Event()).set()

    def leave(self) -> None:
        self.now -= 1

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(WAIT):
            await self.reached.setdefault(count, anyio.Event()).wait()


async def test_max_runs_caps_the_runs_a_worker_runs_at_once(store: sp.Store) -> None:
    gauge, go = Gauge(), anyio.Event()
    flow = sp.Flow("capped")

    @flow.step
    async def hold(n: int) -> int:
        gauge.enter()
        try:
            await go.wait()
        finally:
            gauge.leave()
        return n

    run_ids = [await flow.submit(store, {"n": n}) for n in range(5)]
    worker = sp.Worker(store, flow, max_runs=2)
    watch = Watch(worker)
    async with serving(worker):
        await gauge.wait_for(2)
        # Full: a worker that did not count would claim the three others at its next look.
        queued = [await record(store, run_id) for run_id in run_ids[2:]]
        await anyio.wait_all_tasks_blocked()
        assert len(worker.runs) == 2
        assert gauge.now == 2
        go.set()
        for run_id in run_ids:
            assert (await watch.ended(run_id))["status"] == "completed"
    assert gauge.peak == 2
    assert all(queued_record.status is sp.RunStatus.QUEUED for queued_record in queued)


class CountingStore(sp.MemoryStore):
    """A MemoryStore that counts the claims that found nothing to claim, and says when there were more."""

    def __init__(self, *, lease: float) -> None:
        super().__init__(lease=lease)
        self.empty = 0
        self.more = anyio.Event()

    async def claim_next(self, owner: str, flows: Any, queues: Any) -> sp.Claim | None:
        claim = await super().claim_next(owner, flows, queues)
        if claim is None:
            self.empty += 1
            self.more.set()
            self.more = anyio.Event()
        return claim

    async def looked(self, times: int) -> None:
        """Wait until `times` more claims found nothing."""
        until = self.empty + times
        with anyio.fail_after(WAIT):
            while self.empty < until:
                await self.more.wait()


async def test_a_queue_limit_holds_across_workers() -> None:
    store, gauge = CountingStore(lease=1.0), Gauge()
    flow = sp.Flow("limited")

    @flow.step
    async def hold(n: int) -> int:
        gauge.enter()
        try:
            await store.looked(4)  # both workers looked (twice each, say) while this run held the queue
        finally:
            gauge.leave()
        return n

    run_ids = [await flow.submit(store, {"n": n}, queue="q") for n in range(4)]
    first = sp.Worker(store, flow, queues=[sp.Queue("q", concurrency=1)], max_runs=5)
    second = sp.Worker(store, flow, queues=[sp.Queue("q", concurrency=1)], max_runs=5)
    watch = Watch(first, second)
    async with serving(first), serving(second):
        for run_id in run_ids:
            assert (await watch.ended(run_id))["status"] == "completed"
    assert gauge.peak == 1


def two_steps(name: str = "resumable") -> tuple[sp.Flow, dict[str, list[int]], anyio.Event, anyio.Event]:
    """prepare -> work; `work` sets `entered`, waits for `go`, then reaches a stopping point. Returns the
    flow, the epochs each step ran at, `entered` and `go`."""
    flow = sp.Flow(name)
    ran: dict[str, list[int]] = {"prepare": [], "work": []}
    entered, go = anyio.Event(), anyio.Event()

    @flow.step
    async def prepare(ctx: sp.StepContext, size: int) -> int:
        ran["prepare"].append(ctx.epoch)
        return size

    @flow.step
    async def work(ctx: sp.StepContext, prepare: int) -> int:
        ran["work"].append(ctx.epoch)
        entered.set()
        await go.wait()
        await ctx.checkpoint()
        return prepare * 2

    return flow, ran, entered, go


async def test_stop_requeues_a_running_run_which_another_worker_completes(store: sp.Store) -> None:
    flow, ran, entered, go = two_steps()
    run_id = await flow.submit(store, {"size": 21})
    first = sp.Worker(store, flow)
    watch = Watch(first)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        with anyio.fail_after(WAIT):
            await entered.wait()
        first.stop()  # interrupts gracefully, at once: `work` stops at its stopping point
        go.set()
    ended = await watch.ended(run_id)  # run() returned: the run had ended
    assert (ended["status"], ended["reason"]) == ("queued", "worker stopping")
    stored = await record(store, run_id)
    assert (stored.status, stored.owner, stored.lease_expires_at, stored.epoch) == (sp.RunStatus.QUEUED, None, None, 1)
    loaded = await store.load(flow.name, run_id)
    assert loaded is not None
    report = sp.RunReport.model_validate_json(loaded.report_json)
    assert report.steps["work"].status is sp.StepStatus.INTERRUPTED
    assert report.steps["work"].stopped_at

    second = sp.Worker(store, flow)
    watch = Watch(second)
    async with serving(second):
        assert (await watch.ended(run_id))["status"] == "completed"
    assert ran == {"prepare": [1], "work": [1, 2]}  # prepare completed before: not run again; epoch 2
    outcome = await flow.run(store=store, run_id=run_id)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 42


async def test_an_orphaned_run_is_claimed_and_completed_within_the_lease_and_2_s() -> None:
    lease = 0.3
    store = sp.MemoryStore(lease=lease)
    epochs: list[int] = []
    flow = sp.Flow("orphan")

    @flow.step
    async def only(ctx: sp.StepContext, x: int) -> int:
        epochs.append(ctx.epoch)
        return x + 1

    # An owner that claimed the run (epoch 1, stored running) and died: it never renews.
    dead = await store.claim(flow.name, "r", "ghost:1/dead", new=new_state(plan_of(flow), "r", {"x": 1}))
    assert dead is not None
    assert dead.lease is not None
    worker = sp.Worker(store, flow)
    watch = Watch(worker)
    started = anyio.current_time()
    async with serving(worker):
        with anyio.fail_after(lease + 2):
            assert (await watch.ended("r"))["status"] == "completed"
    assert anyio.current_time() - started < lease + 2
    assert epochs == [2]
    assert watch.of("worker.claimed", "r")[0]["was"] in ("orphaned", "running")
    stored = await record(store, "r")
    assert (stored.status, stored.epoch, stored.owner) == (sp.RunStatus.COMPLETED, 2, None)


async def test_an_orphan_of_a_direct_run_is_requeued_in_the_workers_queue_on_stop() -> None:
    """A run started by `run()` has no queue: requeued as it was, no worker would ever claim it."""
    store = sp.MemoryStore(lease=0.3)
    flow, ran, entered, go = two_steps("direct")
    await store.claim(flow.name, "r", "ghost:1/dead", new=new_state(plan_of(flow), "r", {"size": 1}))
    first = sp.Worker(store, flow, queues=("jobs",))
    watch = Watch(first)
    async with serving(first):
        with anyio.fail_after(WAIT):
            await entered.wait()
        first.stop()
        go.set()
    assert (await watch.ended("r"))["status"] == "queued"
    stored = await record(store, "r")
    assert (stored.status, stored.queue, stored.owner) == (sp.RunStatus.QUEUED, "jobs", None)
    second = sp.Worker(store, flow, queues=("jobs",))
    watch = Watch(second)
    async with serving(second):
        assert (await watch.ended("r"))["status"] == "completed"
    assert ran["work"] == [2, 3]


async def first_interrupt(handle: sp.FlowRun) -> None:
    with anyio.fail_after(WAIT):
        async for event in handle.events():
            if isinstance(event, sp.InterruptReceivedEvent):
                return
    raise AssertionError("the run ended without an interrupt")


async def test_an_interrupt_by_id_stops_a_workers_run_at_a_stopping_point_and_the_worker_goes_on(
    store: sp.Store,
) -> None:
    flow, _ran, entered, go = two_steps()
    run_id = await flow.submit(store, {"size": 1})
    worker = sp.Worker(store, flow)
    watch = Watch(worker)
    async with serving(worker):
        with anyio.fail_after(WAIT):
            await entered.wait()
        (handle,) = worker.runs
        assert await store.interrupt(flow.name, run_id, "ops asked", source="cli") is True
        await first_interrupt(handle)  # it came through the store, as an ordinary signal
        go.set()
        ended = await watch.ended(run_id)
        assert (ended["status"], ended["reason"], ended["source"], ended["forced"]) == (
            "interrupted",
            "ops asked",
            "cli",
            False,
        )
        later = await flow.submit(store, {"size": 2})  # the worker goes on
        assert (await watch.ended(later))["status"] == "completed"
    stored = await store.load(flow.name, run_id)
    assert stored is not None
    assert stored.record.status is sp.RunStatus.INTERRUPTED
    assert stored.record.owner is None
    report = sp.RunReport.model_validate_json(stored.report_json)
    assert report.steps["work"].status is sp.StepStatus.INTERRUPTED
    assert report.steps["work"].stopped_at is not None
    assert [signal.reason for signal in report.interrupts] == ["ops asked"]


async def test_a_forced_interrupt_by_id_cancels_a_workers_run_and_the_worker_serves_on(store: sp.Store) -> None:
    flow = sp.Flow("stuck")
    entered = anyio.Event()

    @flow.step
    async def forever(x: int) -> int:
        if x == 0:
            entered.set()
            await anyio.sleep_forever()  # no stopping point: only a forced stop ends it
        return x

    stuck = await flow.submit(store, {"x": 0})
    worker = sp.Worker(store, flow)
    watch = Watch(worker)
    async with serving(worker):
        with anyio.fail_after(WAIT):
            await entered.wait()
        assert await store.interrupt(flow.name, stuck, "kill it", force=True) is True
        ended = await watch.ended(stuck)
        assert (ended["status"], ended["forced"]) == ("interrupted", True)
        after = await flow.submit(store, {"x": 7})
        assert (await watch.ended(after))["status"] == "completed"
    stored = await store.load(flow.name, stuck)
    assert stored is not None
    assert stored.record.status is sp.RunStatus.INTERRUPTED
    assert sp.RunReport.model_validate_json(stored.report_json).steps["forever"].status is sp.StepStatus.CANCELLED
    assert await store.interrupt(flow.name, stuck) is False  # ended: nothing to stop


async def test_a_step_failure_ends_the_run_failed_not_the_worker(store: sp.Store) -> None:
    flow = sp.Flow("fragile")

    @flow.step
    async def maybe(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    bad = await flow.submit(store, {"x": -1})
    good = await flow.submit(store, {"x": 1})
    worker = sp.Worker(store, flow)
    watch = Watch(worker)
    async with serving(worker):
        failed = await watch.ended(bad)
        assert (failed["status"], failed["step"], failed["error"]) == ("failed", "maybe", "ValueError: negative")
        assert (await watch.ended(good))["status"] == "completed"
    assert (await record(store, bad)).status is sp.RunStatus.FAILED


async def test_a_run_the_worker_cannot_open_is_stored_interrupted_once_not_claimed_again() -> None:
    store = CountingStore(lease=1.0)
    old = adder("versioned", version="1")
    run_id = await old.submit(store, {"x": 1})
    new = adder("versioned", version="2")
    worker = sp.Worker(store, new)
    watch = Watch(worker)
    with structlog.testing.capture_logs() as logs:
        async with serving(worker):
            await store.looked(3)  # it went on looking, and found nothing more to claim
    logged = [entry for entry in logs if entry["event"] == "worker.run_refused"]
    assert len(logged) == 1
    assert (logged[0]["log_level"], logged[0]["flow"], logged[0]["run_id"]) == ("error", "versioned", run_id)
    refused = watch.of("worker.run_refused", run_id)
    assert len(refused) == 1
    assert "version" in refused[0]["error"]
    stored = await store.load("versioned", run_id)
    assert stored is not None
    assert (stored.record.status, stored.record.owner, stored.record.epoch) == (sp.RunStatus.INTERRUPTED, None, 1)
    (signal,) = sp.RunReport.model_validate_json(stored.report_json).interrupts
    assert signal.source == "worker"
    assert "cannot run it" in signal.reason
    assert "version" in signal.reason
    outcome = await old.run(store=store, run_id=run_id)  # code of its version resumes it
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 2


class FlakyStore(sp.MemoryStore):
    """A MemoryStore whose first claims fail, as a store that is down for a moment."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def claim_next(self, owner: str, flows: Any, queues: Any) -> sp.Claim | None:
        if self.failures:
            self.failures -= 1
            raise sp.StoreError("the store is down for a moment")
        return await super().claim_next(owner, flows, queues)


async def test_a_store_that_fails_to_claim_does_not_end_the_worker() -> None:
    store = FlakyStore(failures=2)
    flow = adder()
    run_id = await flow.submit(store, {"x": 1})
    worker = sp.Worker(store, flow)
    watch = Watch(worker)
    async with serving(worker):
        assert (await watch.ended(run_id))["status"] == "completed"
    failed = [fields for event, fields in watch.events if event == "worker.claim_failed"]
    assert [fields["error"] for fields in failed] == ["StoreError: the store is down for a moment"] * 2
    assert failed[0]["retry_in"] < failed[1]["retry_in"] <= 5.0  # it backs off


async def test_an_error_leaving_the_block_forces_the_runs_and_goes_on_as_it_is() -> None:
    store = sp.MemoryStore()
    flow, _ran, entered, _go = two_steps()
    run_id = await flow.submit(store, {"size": 1})

    async def fail_while_serving() -> None:
        async with sp.Worker(store, flow) as worker, anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(WAIT):
                await entered.wait()
            raise LookupError("the service failed")

    with pytest.raises(BaseExceptionGroup) as raised:
        await fail_while_serving()
    (error,) = raised.value.exceptions  # the task group's group, as it made it: the worker adds none
    assert isinstance(error, LookupError)
    stored = await record(store, run_id)
    assert (stored.status, stored.owner) == (sp.RunStatus.QUEUED, None)


async def test_cancelling_a_worker_forces_its_runs_and_stores_them_queued(store: sp.Store) -> None:
    flow = sp.Flow("slow")
    entered = anyio.Event()

    @flow.step
    async def forever() -> int:
        entered.set()
        await anyio.sleep_forever()
        return 1

    run_id = await flow.submit(store)
    worker = sp.Worker(store, flow)
    watch = Watch(worker)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(WAIT):
                await entered.wait()
            scope.cancel()
    ended = await watch.ended(run_id)
    assert (ended["status"], ended["reason"]) == ("queued", "worker cancelled")
    stored = await store.load(flow.name, run_id)
    assert stored is not None
    assert (stored.record.status, stored.record.owner) == (sp.RunStatus.QUEUED, None)
    assert sp.RunReport.model_validate_json(stored.report_json).steps["forever"].status is sp.StepStatus.CANCELLED


async def test_a_worker_as_a_context_manager_stops_its_runs_gracefully_on_leaving() -> None:
    store = sp.MemoryStore()
    flow, _ran, entered, go = two_steps()
    run_id = await flow.submit(store, {"size": 1})
    async with sp.Worker(store, flow) as worker, anyio.create_task_group() as tg:
        watch = Watch(worker)
        tg.start_soon(worker.run)
        with anyio.fail_after(WAIT):
            await entered.wait()
        worker.stop()
        go.set()
    assert (await watch.ended(run_id))["status"] == "queued"
    assert repr(worker) == "<Worker flows=[resumable] queues=[default] running=0/10>"
    with pytest.raises(RuntimeError, match="entered already"):
        async with worker, worker:
            pass


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"store": OnlyBasic()}, TypeError, "store must be a Store"),
        ({"flows": []}, ValueError, "no flow"),
        ({"flows": [adder(), adder()]}, ValueError, "two flows are named 'adder'"),
        ({"flows": ["adder"]}, TypeError, "not a Flow"),
        ({"flows": "adder"}, TypeError, "flows must be a Flow"),
        ({"queues": ()}, ValueError, "no queue"),
        ({"queues": ("a", sp.Queue("a", concurrency=2))}, ValueError, "queue 'a' is given twice"),
        ({"queues": (1,)}, TypeError, "not a queue name or Queue"),
        ({"queues": ("",)}, TypeError, "non-empty str"),
        ({"max_runs": 0}, TypeError, "max_runs must be an int >= 1"),
        ({"max_runs": True}, TypeError, "max_runs must be an int >= 1"),
        ({"resources": [1]}, TypeError, "resources must be a mapping"),
    ],
)
def test_worker_arguments_are_checked(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    arguments: dict[str, Any] = {"store": sp.MemoryStore(), "flows": [adder()], **kwargs}
    with pytest.raises(error, match=message):
        sp.Worker(arguments.pop("store"), arguments.pop("flows"), **arguments)


def test_worker_views() -> None:
    store = sp.MemoryStore()
    worker = sp.Worker(store, adder(), queues="jobs", max_runs=3, resources={"http": object()})
    assert (worker.store, worker.flows, worker.queues, worker.max_runs, worker.runs) == (
        store,
        ("adder",),
        (sp.Queue("jobs"),),
        3,
        (),
    )
