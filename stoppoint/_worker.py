"""Worker: claiming queued and orphaned runs from a store and running them (see `Worker`).

The claim loop runs in the task that calls `Worker.run()`; each claimed run is driven by a `FlowRun` in
the worker's own task group, which lives in a shielded scope so that a cancellation of the worker reaches
its runs through the worker: it marks them to be stored queued first, then forces them, so another
worker resumes them (a run is stopped because its worker goes away, not because anyone asked).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from ._errors import FlowInputError, StepFailed
from ._flow import Flow, plan_of
from ._handle import FlowRun
from ._launch import RunOptions, open_run
from ._lease import Claim, Lease, Queue, process_owner
from ._outcome import Completed
from ._persist import Leased
from ._rows import interrupted_report
from ._signal import InterruptSignal
from ._store import RunState, RunStatus, Store

if TYPE_CHECKING:
    from ._attempt import Attempt
    from ._plan import Plan

__all__ = ["Worker"]

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

Listener = Callable[[str, dict[str, Any]], object]
"""Told each event the worker logs, with its fields (the `stoppoint worker` command prints them)."""


class Worker:
    """Claims queued runs of its flows (`flow.submit`) and orphaned ones (their owner died: lease expired)
    from a store, and runs them, at most `max_runs` at a time.

    ```python
    async with sp.Worker(store, [deploy, backup], queues=("default", sp.Queue("heavy", concurrency=2))) as worker:
        await worker.run()  # until worker.stop() (from another task) or cancellation
    ```

    `await worker.run()` alone does the same (it enters the worker itself). A claimed run is resumed
    from its stored checkpoint: steps completed by an earlier owner do not run again (`ctx.epoch` tells
    the claim number). Its end is stored as any run's: completed, interrupted (`store.interrupt()` of
    its id reaches it as an ordinary signal), or failed (a step failed); none of them ends the worker. A
    claimed run it cannot run (a run of another `version` of the flow, a checkpoint that does not load)
    is stored interrupted at once, the reason among its report's interrupts, and logged, so that no
    worker claims it again and again; `flow.submit(store, run_id=...)` by code that can run it queues it
    again.

    **Stopping.** `worker.stop()`, or leaving the `async with` block normally, stops claiming and
    interrupts each running run gracefully (its strategy applies): each stops at a stopping point and is
    stored `QUEUED`, released, for another worker to resume; `run()` returns once all have ended. A
    cancellation of the worker (or an exception leaving the block) does the same but forced: the steps
    in flight are cancelled (they run again on resume). A run interrupted by someone else first stays
    interrupted.

    Its events go to structlog (logger `"stoppoint"`: `worker.claimed`, `worker.run_ended`,
    `worker.run_refused`, `worker.claim_failed`, ...) once the application has configured structlog,
    else to the standard library's `logging` (logger `"stoppoint"`).

    Args:
        store: The `Store` to claim runs from (`SQLiteStore`, `MemoryStore`, ...).
        flows: The flows it runs (a `Flow` or several, of distinct names): runs of other flows are not
            claimed. A run is claimed by its flow's name; its version must be the flow's.
        queues: The queues it serves, by name or as `Queue` (a `Queue` with a `concurrency` limit caps
            that queue's running runs across every worker of the store).
        max_runs: At most this many runs at once in this worker.
        resources: Live objects (clients, pools) for the steps' `Resource[T]` parameters, by name. Each
            run gets those its flow takes (`flow.resources`); the others are not passed to it. Every
            resource of every flow it serves must be here.

    Raises:
        TypeError: `store` is not a `Store`, a flow is not a `Flow`, a queue not a str or `Queue`,
            `max_runs` not an int >= 1, or `resources` not a mapping of names.
        FlowInputError: A flow takes a resource `resources` lacks (before anything is claimed).
        ValueError: No flow, two flows of one name, no queue, or one queue named twice.
        FlowDefinitionError: A flow has no steps or a bad `result=`.
    """

    def __init__(
        self,
        store: Store,
        flows: Flow | Iterable[Flow],
        *,
        queues: str | Queue | Iterable[str | Queue] = ("default",),
        max_runs: int = 10,
        resources: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(store, type) or not isinstance(store, Store):
            raise TypeError(
                "Worker(store): store must be a Store, with leases and queues (such as SQLiteStore(path) or "
                f"MemoryStore()); got {type(store).__name__}"
            )
        self._store = store
        self._plans = _plans(flows)
        self._queues = _queues(queues)
        if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
            raise TypeError(f"Worker(max_runs): max_runs must be an int >= 1, got {max_runs!r}")
        self._max_runs = max_runs
        if resources is not None and (
            not isinstance(resources, Mapping) or not all(isinstance(name, str) for name in resources)
        ):
            raise TypeError(f"Worker(resources): resources must be a mapping of names to objects, got {resources!r}")
        given = dict(resources or {})
        # Each flow's runs get the resources its steps take, checked now, before anything is claimed.
        self._resources: dict[str, dict[str, Any]] = {}
        for flow_name, plan in self._plans.items():
            missing = tuple(name for name in plan.resources if name not in given)
            if missing:
                raise FlowInputError(flow_name, missing_resources=missing)
            self._resources[flow_name] = {name: given[name] for name in plan.resources}
        lease = store.lease
        self._interval = min(0.2, lease / 10) if isinstance(lease, int | float) and lease > 0 else 0.2
        self._listener: Listener | None = None
        # While entered:
        self._stack: contextlib.AsyncExitStack | None = None
        self._runs_group: TaskGroup | None = None
        self._closing: anyio.Event | None = None  # set: the runs' group may end once its runs have
        self._host_done: anyio.Event | None = None
        self._wake: anyio.Event | None = None  # set when a run ends or the worker stops: the claim loop looks again
        self._handles: dict[tuple[str, str], tuple[FlowRun, Attempt]] = {}
        self._active = 0  # runs claimed and not ended (being opened, or running)
        self._stopping = False
        self._forced = False
        self._serving = False

    def __repr__(self) -> str:
        names = ", ".join(self._plans)
        queues = ", ".join(queue.name for queue in self._queues)
        return f"<Worker flows=[{names}] queues=[{queues}] running={self._active}/{self._max_runs}>"

    # -- read-only views -------------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store it claims runs from."""
        return self._store

    @property
    def flows(self) -> tuple[str, ...]:
        """The names of the flows it runs."""
        return tuple(self._plans)

    @property
    def queues(self) -> tuple[Queue, ...]:
        """The queues it serves."""
        return self._queues

    @property
    def max_runs(self) -> int:
        """At most this many runs at once."""
        return self._max_runs

    @property
    def runs(self) -> tuple[FlowRun, ...]:
        """Handles on the runs it is running now (watch their reports and events, or interrupt one)."""
        return tuple(handle for handle, _ in self._handles.values())

    # -- serving -----------------------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        if self._stack is not None:
            raise RuntimeError(f"{self!r} is entered already")
        self._closing, self._host_done, self._wake = anyio.Event(), anyio.Event(), anyio.Event()
        async with contextlib.AsyncExitStack() as stack:
            outer = await stack.enter_async_context(anyio.create_task_group())
            self._runs_group = await outer.start(self._host, name="stoppoint worker runs")
            outer.start_soon(self._watch_cancel, name="stoppoint worker")
            self._stack = stack.pop_all()
        self._note("info", "worker.started", owner=process_owner(), flows=list(self._plans), queues=self._queue_names())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack = self._stack
        assert stack is not None
        assert self._closing is not None
        cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
        if exc_type is None:
            self.stop()
        else:
            self._force("worker cancelled" if cancelled else "worker failed")
        self._closing.set()
        try:
            if exc is None or cancelled:
                return await stack.__aexit__(exc_type, exc, tb)
            await stack.__aexit__(None, None, None)  # the block's error goes on as it is, not in a group
            return None
        finally:
            self._note("info", "worker.stopped", owner=process_owner())
            self._stack = self._runs_group = None
            self._stopping = self._forced = False

    async def run(self) -> None:
        """Claim and run runs until `stop()` is called (then wait for the running ones to end) or the
        task is cancelled. Enters the worker if no `async with` did.

        Raises:
            RuntimeError: `run()` is running already.
        """
        if self._stack is None:
            async with self:
                await self.run()
            return
        if self._serving:
            raise RuntimeError(f"{self!r}: run() is running already")
        self._serving = True
        try:
            await self._claim_loop()
            while self._active:  # stop() asked each run to stop: wait for their ends
                self._wake = anyio.Event()
                if self._active:
                    await self._wake.wait()
        finally:
            self._serving = False

    def stop(self) -> None:
        """Stop claiming, and interrupt the running runs gracefully, to be stored queued (released) for
        another worker; `run()` returns once they have ended. Call it in the event loop's thread (from
        a signal handler, through the loop's `call_soon`)."""
        if self._stopping:
            return
        self._stopping = True
        self._note("info", "worker.stopping", running=len(self._handles))
        for handle, _ in list(self._handles.values()):
            handle._requeue("worker stopping")
        self._poke()

    # -- the claim loop ------------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        store, owner, names, queues = self._store, process_owner(), frozenset(self._plans), self._queues
        interval = delay = self._interval
        while not self._stopping:
            self._wake = anyio.Event()
            if self._active < self._max_runs:
                try:
                    claim = await store.claim_next(owner, names, queues)
                except Exception as exc:  # a store down for a while must not end the worker: try again later
                    delay = min(delay * 2, 5.0)
                    self._note("error", "worker.claim_failed", error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                    with anyio.move_on_after(delay):
                        await self._wake.wait()
                    continue
                delay = interval
                if claim is not None and claim.lease is not None:
                    self._active += 1
                    assert self._runs_group is not None
                    self._runs_group.start_soon(
                        self._serve, claim, name=f"stoppoint worker {claim.lease.flow} run {claim.lease.run_id}"
                    )
                    continue  # there may be more to claim now
            with anyio.move_on_after(interval):
                await self._wake.wait()

    async def _serve(self, claim: Claim) -> None:
        """Open, run and log one claimed run (in the runs' group)."""
        lease = claim.lease
        assert lease is not None
        key = (lease.flow, lease.run_id)
        stored = claim.stored
        status = stored.record.status.value if stored is not None else "new"
        try:
            if self._stopping:  # claimed as the worker stopped: give it back as it is
                await self._release(lease)
                return
            self._note("info", "worker.claimed", flow=lease.flow, run_id=lease.run_id, epoch=lease.epoch, was=status)
            options = RunOptions(
                store=self._store, run_id=lease.run_id, claim=claim, resources=self._resources[lease.flow]
            )
            try:
                attempt = await open_run(self._plans[lease.flow], options)
            except Exception as exc:
                await self._refuse(claim, exc)
                return
            except BaseException:
                await self._release(lease)
                raise
            if isinstance(attempt, Completed):  # pragma: no cover - a claim with a lease is of an unfinished run
                return
            handle = FlowRun(attempt)
            assert self._runs_group is not None
            await self._runs_group.start(handle._drive, None, name=f"stoppoint {lease.flow} run {lease.run_id}")
            self._handles[key] = (handle, attempt)
            if self._forced:  # the worker was cancelled while it was opened
                handle._requeue("worker cancelled")
                handle.interrupt("worker cancelled", force=True, source="worker")
            elif self._stopping:  # stop() came while it was opened
                handle._requeue("worker stopping")
            await self._ended(claim, handle, attempt)
        finally:
            self._handles.pop(key, None)
            self._active -= 1
            self._poke()

    async def _ended(self, claim: Claim, handle: FlowRun, attempt: Attempt) -> None:
        """Wait for the run's end and log it; a run stored queued with no queue gets the worker's first."""
        lease = claim.lease
        assert lease is not None
        fields: dict[str, Any] = {"flow": lease.flow, "run_id": lease.run_id, "epoch": lease.epoch}
        try:
            outcome = await handle.outcome()
        except StepFailed as exc:
            cause = exc.__cause__
            error = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            self._note("warning", "worker.run_ended", **fields, status="failed", step=exc.step, error=error)
            return
        except Exception as exc:  # the store failed, or the lease was lost (LeaseLost)
            self._note("error", "worker.run_ended", **fields, status="error", error=f"{type(exc).__name__}: {exc}")
            return
        if isinstance(outcome, Completed):
            self._note("info", "worker.run_ended", **fields, status="completed")
            return
        persist = attempt.control.persist
        if isinstance(persist, Leased) and persist.requeue:
            self._note("info", "worker.run_ended", **fields, status="queued", reason=outcome.signal.reason)
            stored = claim.stored
            if stored is not None and stored.record.queue is None:
                # An orphan of a run started directly (no queue): queued in none, no worker would claim it.
                with contextlib.suppress(Exception):
                    await self._store.submit(lease.flow, lease.run_id, persist.state(), queue=self._queues[0].name)
            return
        self._note(
            "info",
            "worker.run_ended",
            **fields,
            status="interrupted",
            reason=outcome.signal.reason,
            source=outcome.signal.source,
            forced=outcome.forced,
        )

    async def _refuse(self, claim: Claim, exc: Exception) -> None:
        """A claimed run this worker cannot run: store it interrupted, saying why, so that it is not claimed
        again at once (by this worker or another of the same code); release it if even that fails."""
        lease, stored = claim.lease, claim.stored
        assert lease is not None
        error = f"{type(exc).__name__}: {exc}"
        self._note("error", "worker.run_refused", flow=lease.flow, run_id=lease.run_id, epoch=lease.epoch, error=error)
        try:
            if stored is None:  # pragma: no cover - claim_next claims stored runs only
                raise ValueError("no stored run")
            at = datetime.now(UTC)
            signal = InterruptSignal(reason=f"worker {lease.owner} cannot run it: {error}", source="worker")
            state = RunState(
                flow_version=stored.record.flow_version,
                status=RunStatus.INTERRUPTED,
                started_at=stored.record.started_at,
                finished_at=at,
                checkpoint_json=stored.checkpoint_json,
                report_json=interrupted_report(stored.report_json, signal, at),
            )
            with anyio.CancelScope(shield=True):
                await self._store.finish(lease, state)
        except Exception as failure:
            self._note("error", "worker.refusal_not_stored", flow=lease.flow, run_id=lease.run_id, error=repr(failure))
            await self._release(lease)

    async def _release(self, lease: Lease) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):  # the lease expires anyway
            await self._store.release(lease)

    # -- the runs' group -------------------------------------------------------------------------------------

    async def _host(self, *, task_status: TaskStatus[TaskGroup] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold the runs' task group, shielded: the worker's cancellation reaches the runs through `_force`."""
        assert self._closing is not None
        assert self._host_done is not None
        try:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as runs:
                    task_status.started(runs)
                    await self._closing.wait()
        finally:
            self._host_done.set()

    async def _watch_cancel(self) -> None:
        """Force the runs when the worker is cancelled (the runs' group, shielded, would not see it)."""
        assert self._host_done is not None
        try:
            await self._host_done.wait()
        except anyio.get_cancelled_exc_class():
            self._force("worker cancelled")
            raise

    def _force(self, reason: str) -> None:
        """Stop claiming and stop every run now: each is stored queued (unless interrupted first) and forced."""
        if self._forced:
            return
        self._stopping = self._forced = True
        for handle, _ in list(self._handles.values()):
            handle._requeue(reason)
            handle.interrupt(reason, force=True, source="worker")
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _queue_names(self) -> list[str]:
        return [queue.name for queue in self._queues]

    def _note(self, level: str, event: str, **fields: Any) -> None:
        """Log `event` (structlog if configured, else `logging`, never an unconfigured structlog, which
        prints) and tell the listener."""
        try:
            if structlog.is_configured():
                getattr(structlog.get_logger("stoppoint"), level)(event, **fields)
            else:
                shown = " ".join(f"{key}={value!r}" for key, value in fields.items())
                logging.getLogger("stoppoint").log(_LEVELS[level], "%s %s", event, shown)
        except Exception:  # pragma: no cover - a logging setup that raises must not stop the worker
            pass
        if self._listener is not None:
            with contextlib.suppress(Exception):  # (a listener that fails must not stop the worker either)
                self._listener(event, fields)


def _plans(flows: Flow | Iterable[Flow]) -> dict[str, Plan]:
    if isinstance(flows, Flow):
        flows = (flows,)
    elif isinstance(flows, str | bytes) or not isinstance(flows, Iterable):
        raise TypeError(f"Worker(flows): flows must be a Flow or an iterable of Flows, got {type(flows).__name__}")
    plans: dict[str, Plan] = {}
    for flow in flows:
        if not isinstance(flow, Flow):
            raise TypeError(f"Worker(flows): {flow!r} is a {type(flow).__name__}, not a Flow")
        if flow.name in plans:
            raise ValueError(f"Worker(flows): two flows are named {flow.name!r}; a worker claims runs by flow name")
        plans[flow.name] = plan_of(flow)
    if not plans:
        raise ValueError("Worker(flows): no flow given")
    return plans


def _queues(queues: str | Queue | Iterable[str | Queue]) -> tuple[Queue, ...]:
    if isinstance(queues, str | Queue):
        queues = (queues,)
    elif not isinstance(queues, Iterable):
        raise TypeError(f"Worker(queues): queues must be names or Queues, got {type(queues).__name__}")
    found: dict[str, Queue] = {}
    for queue in queues:
        if isinstance(queue, str):
            queue = Queue(queue)  # an empty name: Queue raises
        elif not isinstance(queue, Queue):
            raise TypeError(f"Worker(queues): {queue!r} is a {type(queue).__name__}, not a queue name or Queue")
        if queue.name in found:
            raise ValueError(f"Worker(queues): queue {queue.name!r} is given twice")
        found[queue.name] = queue
    if not found:
        raise ValueError("Worker(queues): no queue given")
    return tuple(found.values())
