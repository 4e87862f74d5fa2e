"""The run loop: schedule ready steps, stop at stopping points, turn the end into an outcome.

One `_Run` holds one run's mutable state; the `Flow` is only read. Steps of a chain cost no task:
the task that finished a step goes on with the next ready one and spawns tasks only for the
others, so a linear flow runs in the caller's task and a fan-out spawns one task per extra branch.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from ._checkpoint import Checkpoint
from ._context import YIELD_INTERVAL, StepContext
from ._errors import FlowInputError, StepFailed, StopRequested
from ._outcome import Completed, Interrupted, RunReport, StepReport, StepStatus
from ._signal import InterruptSignal, linked
from ._strategy import Strategy

if TYPE_CHECKING:
    from ._flow import Flow, Plan

__all__ = ["execute"]


async def execute(
    flow: Flow,
    inputs: Mapping[str, Any] | None,
    *,
    interrupts: MemoryObjectReceiveStream[InterruptSignal] | None,
    strategy: Strategy,
    run_id: str | None,
) -> Completed[Any] | Interrupted:
    """Check the arguments, then run `flow` once (see `Flow.run`)."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"flow {flow.name!r}: strategy must be a Strategy such as AtCheckpoint(), got {strategy!r}")
    if interrupts is not None and not isinstance(interrupts, MemoryObjectReceiveStream):
        raise TypeError(
            f"flow {flow.name!r}: interrupts must be an anyio MemoryObjectReceiveStream[InterruptSignal], "
            f"got {type(interrupts).__name__}"
        )
    if run_id is None:
        run_id = uuid.uuid4().hex
    elif not isinstance(run_id, str) or not run_id:
        raise TypeError(f"flow {flow.name!r}: run_id must be a non-empty str, got {run_id!r}")
    plan = flow._freeze()
    return await _Run(flow, plan, _check_inputs(flow, inputs, plan), strategy, run_id).execute(interrupts)


def _check_inputs(flow: Flow, inputs: Mapping[str, Any] | None, plan: Plan) -> dict[str, Any]:
    if inputs is None:
        given: dict[str, Any] = {}
    elif isinstance(inputs, Mapping):
        given = dict(inputs)
    else:
        raise TypeError(
            f"flow {flow.name!r}: inputs must be a mapping of input names to values, got {type(inputs).__name__}"
        )
    known = plan.all_inputs
    missing = tuple(name for name in flow.inputs if name not in given)
    unknown = tuple(sorted(str(name) for name in given if name not in known))
    if missing or unknown:
        raise FlowInputError(flow.name, missing, unknown)
    return given


def _first_stop(group: BaseExceptionGroup[Any]) -> StopRequested | None:
    for exc in group.exceptions:
        if isinstance(exc, StopRequested):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_stop(exc)) is not None:
            return found
    return None


class _StepRecord:
    """What happened to one started step in one run (steps that never start get none)."""

    __slots__ = ("duration", "error", "finished", "started", "status", "stopped_at")

    def __init__(self, started: float) -> None:
        self.status = StepStatus.RUNNING
        self.started = started  # perf_counter(); turned into wall-clock time for the report
        self.finished: float | None = None
        self.duration: float | None = None
        self.stopped_at: str | None = None
        self.error: str | None = None


class _Timeline:
    """What a report is built from: step records, signals and times (no outputs, no tasks), so
    an outcome that builds its report lazily keeps nothing else of the run alive."""

    __slots__ = ("ended", "flow", "perf0", "records", "run_id", "signals", "steps", "wall0")

    def __init__(self, run_id: str, flow: str, steps: tuple[str, ...]) -> None:
        self.run_id = run_id
        self.flow = flow
        self.steps = steps
        self.records: dict[str, _StepRecord] = {}
        self.signals: list[InterruptSignal] = []
        # One wall-clock reading per run; step times are perf_counter() offsets from it.
        self.wall0 = time.time()
        self.perf0 = time.perf_counter()
        self.ended: float | None = None

    def wall(self, t: float | None) -> datetime | None:
        return None if t is None else datetime.fromtimestamp(self.wall0 + (t - self.perf0), UTC)

    def report(self) -> RunReport:
        """Build the pydantic report (outcomes call this only when their `.report` is read)."""
        steps = {}
        for name in self.steps:
            record = self.records.get(name)
            # model_construct: these values are ours and already valid.
            if record is None:
                status = StepStatus.PENDING if self.ended is None else StepStatus.NOT_STARTED
                steps[name] = StepReport.model_construct(name=name, status=status)
                continue
            steps[name] = StepReport.model_construct(
                name=name,
                status=record.status,
                started_at=self.wall(record.started),
                finished_at=self.wall(record.finished),
                duration_s=record.duration,
                stopped_at=record.stopped_at,
                error=record.error,
            )
        return RunReport.model_construct(
            run_id=self.run_id,
            flow=self.flow,
            started_at=self.wall(self.perf0),
            finished_at=self.wall(self.ended),
            steps=steps,
            interrupts=list(self.signals),
        )


def _cancellation_in_effect() -> bool:
    """Is the current task being cancelled right now (by an anyio scope or a native asyncio cancel)?"""
    if anyio.current_effective_deadline() == -math.inf:
        return True
    if anyio.get_cancelled_exc_class() is asyncio.CancelledError:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0  # a native Task.cancel() of the caller
    return False


CLEANUP_TIMEOUT = 1.0
"""Seconds the generators of a cancelled step's unfinished `iterate()` loops get to close."""


class _Run:
    """One run of a flow: its mutable state and the loop that drives it."""

    def __init__(self, flow: Flow, plan: Plan, inputs: dict[str, Any], strategy: Strategy, run_id: str) -> None:
        self.flow = flow
        self.name = flow.name
        self.specs = flow._specs
        self.plan = plan
        self.inputs = inputs
        self.strategy = strategy
        self.run_id = run_id
        self.limit = flow.max_concurrency or len(self.specs)
        self.waiting = dict(plan.waiting)
        self.ready = deque(plan.roots)
        self.timeline = _Timeline(run_id, flow.name, tuple(self.specs))
        self.records = self.timeline.records
        self.signals = self.timeline.signals
        self.outputs: dict[str, Any] = {}
        self.active = 0  # steps handed to a worker and not finished
        self.running: dict[str, StepContext] = {}
        self.first: InterruptSignal | None = None
        self.started_since_interrupt = 0
        # Why the run is being abandoned, if it is; `halted` is their "or", checked per step.
        self.halted = False
        self.failure: tuple[str, BaseException] | None = None
        self.fatal: BaseException | None = None  # KeyboardInterrupt, SystemExit from a step
        self.bad_signal: TypeError | None = None
        self.cancelled_exc = anyio.get_cancelled_exc_class()
        self.watch_scope = anyio.CancelScope()
        self.task_group: TaskGroup | None = None
        self.polled: MemoryObjectReceiveStream[InterruptSignal] | None = None  # a plain stream

    def halt(self) -> None:
        """Start no more steps and cancel the running ones (a failure or a bad stream item)."""
        self.halted = True
        if self.task_group is not None:
            self.task_group.cancel_scope.cancel()

    # -- interrupts ------------------------------------------------------------------------------

    def on_signal(self, signal: InterruptSignal) -> None:
        """Record a signal; the first one takes effect now, as the strategy says."""
        self.signals.append(signal)
        if self.first is not None:
            return
        self.first = signal
        if self.strategy._stops_running_steps:
            for ctx in self.running.values():
                ctx._request_stop()

    def drain(self, receiver: MemoryObjectReceiveStream[InterruptSignal]) -> bool:
        """Take every signal already waiting in `receiver`; False if it is closed or ended."""
        while True:
            try:
                item = receiver.receive_nowait()
            except anyio.WouldBlock:
                return True
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return False
            if not self.accept(item):
                return True

    def accept(self, item: object) -> bool:
        if isinstance(item, InterruptSignal):
            self.on_signal(item)
            return True
        # A foreign object on the stream is a programming error; stop the run and report it.
        if self.bad_signal is None:
            self.bad_signal = TypeError(
                f"flow {self.name!r}, run {self.run_id!r}: the interrupt stream carried "
                f"{type(item).__name__} {item!r}; only InterruptSignal may be sent"
            )
            self.halt()
        return False

    async def watch(self, receiver: MemoryObjectReceiveStream[InterruptSignal]) -> None:
        """Read a plain anyio stream (one without the interrupt_channel hub) until the run ends."""
        with self.watch_scope:
            try:
                async for item in receiver:
                    if not self.accept(item):
                        return
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # a closed stream means no more interrupts

    # -- scheduling ------------------------------------------------------------------------------

    def may_start(self) -> bool:
        """The stopping point before a step: may one more step start now?"""
        if self.polled is not None and not self.drain(self.polled):
            # A plain stream's signal may sit in its buffer while the watcher task has not
            # reached receive() yet, so look now rather than start one more step. An ended
            # stream has nothing more to say: stop looking.
            self.polled = None
        if self.closed_to_new_steps():
            return False
        if self.first is not None:
            self.started_since_interrupt += 1
        return True

    def closed_to_new_steps(self) -> bool:
        """The run is halting, or the strategy lets no more steps start after the interrupt."""
        return self.halted or (self.first is not None and not self.strategy._may_start(self.started_since_interrupt))

    def next_step(self) -> str | None:
        """Hand out ready steps: one for the calling worker, a new task for each other one."""
        if self.closed_to_new_steps():
            return None
        take: str | None = None
        ready = self.ready
        while ready and self.active < self.limit:
            name = ready.popleft()
            self.active += 1
            if take is None:
                take = name
            else:
                assert self.task_group is not None
                self.task_group.start_soon(self.work, name, name=f"stoppoint {self.name}.{name}")
        return take

    async def work(self, name: str | None) -> None:
        """Run `name`, then whatever becomes ready, until nothing is left for this worker."""
        last_yield = time.perf_counter()
        while name is not None:
            # Back-to-back steps in one task would never let other tasks run; yield now and then.
            now = time.perf_counter()
            if now - last_yield >= YIELD_INTERVAL:
                last_yield = now
                try:
                    await anyio.lowlevel.checkpoint()
                except BaseException:
                    self.active -= 1
                    raise
            await self.run_step(name)
            name = self.next_step()
        if not self.active:
            self.watch_scope.cancel()

    async def run_step(self, name: str) -> None:
        try:
            if not self.may_start():
                return
            spec = self.specs[name]
            ctx: StepContext | None = None
            kwargs: dict[str, Any] = {}
            if spec.context_param is not None:
                ctx = StepContext(run_id=self.run_id, flow=self.name, step=name)
                kwargs[spec.context_param] = ctx
                self.running[name] = ctx
            outputs = self.outputs
            for dependency in spec.dependencies:
                kwargs[dependency] = outputs[dependency]
            inputs = self.inputs
            for item in spec.inputs:
                if item.param in inputs:
                    kwargs[item.param] = inputs[item.param]
            self.records[name] = record = _StepRecord(time.perf_counter())
            try:
                value = await spec.fn(**kwargs)
            except StopRequested as stop:
                self.stopped(name, record, ctx, stop, stop)
            except self.cancelled_exc as exc:
                if self.cancelled_exc is asyncio.CancelledError and not _cancellation_in_effect():
                    # asyncio: the step raised CancelledError (say, from a cancelled future) while
                    # nobody cancelled it. Raising it on would cancel the caller: it is a failure.
                    self.failed(name, record, exc)
                    return
                self.finish(record, StepStatus.CANCELLED)
                raise
            except BaseExceptionGroup as group:
                _, rest = group.split(StopRequested)
                if rest is None:
                    self.stopped(name, record, ctx, _first_stop(group), group)
                elif rest.split(self.cancelled_exc)[1] is None:
                    # Only stops and cancellations: the cancellation is what ends the step. Raise
                    # the cancellations alone, or the caller's cancel scope could not absorb them.
                    self.finish(record, StepStatus.CANCELLED)
                    raise rest from None
                else:
                    self.failed(name, record, group)
            except Exception as exc:
                self.failed(name, record, exc)
            except BaseException as exc:
                # KeyboardInterrupt, SystemExit: record it, end the run, and re-raise it as itself
                # once the task group is gone (raised here, it would leave run() in a group).
                self.finish(record, StepStatus.FAILED)
                record.error = f"{type(exc).__name__}: {exc}"
                if self.fatal is None:
                    self.fatal = exc
                    self.halt()
            else:
                self.finish(record, StepStatus.COMPLETED)
                outputs[name] = value
                waiting = self.waiting
                for dependant in self.plan.dependants[name]:
                    left = waiting[dependant] - 1
                    waiting[dependant] = left
                    if not left:
                        self.ready.append(dependant)
            finally:
                if ctx is not None:
                    del self.running[name]
                    if ctx._open and record.status is not StepStatus.COMPLETED:
                        await self.close_iterations(name, record, ctx)
        finally:
            self.active -= 1

    async def close_iterations(self, name: str, record: _StepRecord, ctx: StepContext) -> None:
        """Close the generators of `ctx.iterate()` loops the step left unfinished, so their
        `finally` blocks run now rather than at garbage collection."""
        try:
            if _cancellation_in_effect():
                # The step was cancelled (a sibling failed, the caller cancelled): shield the
                # cleanup from that cancellation, but not for ever.
                with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                    await ctx._close_iterations()
            else:
                await ctx._close_iterations()
        except Exception as exc:
            if record.status is StepStatus.FAILED:
                # Keep the step's own error first; the cleanup's comes after it.
                record.error = f"{record.error}; then closing an iterate() source raised {type(exc).__name__}: {exc}"
            else:
                record.stopped_at = None
                self.failed(name, record, exc)

    # -- step endings -----------------------------------------------------------------------------

    @staticmethod
    def finish(record: _StepRecord, status: StepStatus) -> None:
        record.status = status
        record.finished = now = time.perf_counter()
        record.duration = now - record.started

    def stopped(
        self,
        name: str,
        record: _StepRecord,
        ctx: StepContext | None,
        stop: StopRequested | None,
        raised: BaseException,
    ) -> None:
        if ctx is not None and ctx._stop:
            self.finish(record, StepStatus.INTERRUPTED)
            record.stopped_at = stop.stopped_at if stop is not None else None
        else:
            # Nobody asked this step to stop: raising StopRequested itself is a bug in the step.
            self.failed(name, record, raised)

    def failed(self, name: str, record: _StepRecord, exc: BaseException) -> None:
        self.finish(record, StepStatus.FAILED)
        record.error = f"{type(exc).__name__}: {exc}"
        if self.failure is None:
            self.failure = (name, exc)
            self.halt()  # siblings still running end CANCELLED

    # -- the whole run ----------------------------------------------------------------------------

    async def execute(
        self, receiver: MemoryObjectReceiveStream[InterruptSignal] | None
    ) -> Completed[Any] | Interrupted:
        channel = None
        watch = False
        if receiver is not None and self.drain(receiver):
            # Listening starts in the same synchronous stretch as the drain: no signal falls between.
            channel = linked(receiver)
            if channel is not None:
                channel.listen(self.on_signal)
            else:
                watch = True
                self.polled = receiver
        try:
            async with anyio.create_task_group() as task_group:
                self.task_group = task_group
                if watch:
                    assert receiver is not None
                    task_group.start_soon(self.watch, receiver, name=f"stoppoint {self.name} interrupt watcher")
                await self.work(self.next_step())
        finally:
            if channel is not None:
                channel.unlisten(self.on_signal)
        if self.fatal is not None:
            raise self.fatal
        if receiver is not None:
            self.drain(receiver)  # signals that came too late still belong in the report
        return self.outcome()

    def outcome(self) -> Completed[Any] | Interrupted:
        self.timeline.ended = time.perf_counter()
        if self.bad_signal is not None:
            raise self.bad_signal
        if self.failure is not None:
            name, exc = self.failure
            raise StepFailed(name, self.timeline.report(), self.checkpoint()) from exc
        if len(self.outputs) == len(self.specs):
            return Completed(self.outputs[self.plan.result], self.timeline.report)
        if self.first is None:  # pragma: no cover - every path that leaves a step unfinished records why
            raise RuntimeError(f"stoppoint: run {self.run_id!r} of flow {self.name!r} ended unfinished without cause")
        return Interrupted(self.first, self.timeline.report, self.checkpoint(), forced=False)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            flow=self.name,
            flow_version=self.flow.version,
            run_id=self.run_id,
            inputs=dict(self.inputs),
            outputs=dict(self.outputs),
        )
