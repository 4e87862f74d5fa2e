"""The run loop: schedule ready steps, stop at stopping points, turn the end into an outcome.

One `_Run` holds one run's mutable state; the `Flow` is only read. Steps of a chain cost no task:
the task that finished a step goes on with the next ready one and spawns tasks only for the
others, so a linear flow runs in the caller's task and a fan-out spawns one task per extra branch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from time import perf_counter as _perf_counter
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pydantic_core
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream
from pydantic import ValidationError

from ._checkpoint import Checkpoint, check_belongs
from ._context import YIELD_INTERVAL, StepContext, yield_to_others
from ._errors import CheckpointMismatch, FlowInputError, StepFailed, StopRequested, StoreError
from ._events import (
    EventCallback,
    FlowCompletedEvent,
    FlowFailedEvent,
    FlowInterruptedEvent,
    FlowStartedEvent,
    InterruptReceivedEvent,
    RunEvent,
    StepCancelledEvent,
    StepCompletedEvent,
    StepFailedEvent,
    StepStartedEvent,
    StepStoppedEvent,
    log_event,
)
from ._outcome import Completed, Interrupted, Progress, RunReport, StepReport, StepStatus
from ._probe import Probe, probe_of
from ._signal import InterruptSignal, linked, take_buffered
from ._store import RunStatus, Store
from ._strategy import Strategy

if TYPE_CHECKING:
    from ._flow import Flow, Plan, StepSpec

__all__ = ["open_run", "prepare"]

_new_context = StepContext._for_step
_NOTHING: frozenset[str] = frozenset()

# Reading an Enum member off its class costs ~90 ns on CPython 3.11 (a descriptor call); the
# per-step hot path reads these module globals instead.
_RUNNING = StepStatus.RUNNING
_COMPLETED = StepStatus.COMPLETED


_sleep = anyio.sleep
"""How the grace and deadline timers wait; tests replace it to drive time without waiting."""


async def open_run(
    flow: Flow,
    inputs: Mapping[str, Any] | None,
    *,
    interrupts: MemoryObjectReceiveStream[InterruptSignal] | None,
    strategy: Strategy,
    resume: Checkpoint | None,
    store: Store | None,
    run_id: str | None,
    grace: float | None,
    deadline: float | None,
    on_event: EventCallback | None = None,
) -> _Run | Completed[Any]:
    """Check the arguments of one run of `flow` (see `Flow.run`) and set it up, not started; or,
    when `store` holds that run completed, its stored outcome."""
    if store is not None and (isinstance(store, type) or not isinstance(store, Store)):
        raise TypeError(
            f"flow {flow.name!r}: store must implement the Store protocol (save, load, list_runs, delete), "
            f"such as SQLiteStore(path); got {type(store).__name__}"
        )
    if store is not None and resume is not None and isinstance(resume, Checkpoint):
        # Resuming a checkpoint into a store: refuse to overwrite a stored run that got further.
        stored = await store.load(flow.name, run_id if isinstance(run_id, str) and run_id else resume.run_id)
        if stored is not None:
            ahead = set(flow.load_checkpoint(stored.checkpoint_json).outputs) - set(resume.outputs)
            if ahead or stored.record.status is RunStatus.COMPLETED:
                raise CheckpointMismatch(
                    f"flow {flow.name!r}, run {stored.record.run_id!r}: the store holds this run "
                    f"{stored.record.status.value}"
                    + (f", with steps the checkpoint lacks ({', '.join(sorted(ahead))})" if ahead else "")
                    + "; run it with store= and run_id= alone to go on from there"
                )
    elif store is not None and isinstance(run_id, str) and run_id:
        stored = await store.load(flow.name, run_id)
        if stored is not None:
            checkpoint = flow.load_checkpoint(stored.checkpoint_json)
            # A flow that gained steps at the same version: the stored run is not complete for it.
            if stored.record.status is RunStatus.COMPLETED and set(checkpoint.outputs) == set(flow._specs):
                _check_resume_inputs(flow, inputs, checkpoint)
                try:
                    report = RunReport.model_validate_json(stored.report_json)
                except ValidationError as exc:
                    raise StoreError(
                        f"flow {flow.name!r}, run {run_id!r}: the stored report does not validate: {exc}"
                    ) from exc
                return Completed(checkpoint.outputs[flow._freeze().result], report)
            resume = checkpoint
    return prepare(
        flow,
        inputs,
        interrupts=interrupts,
        strategy=strategy,
        resume=resume,
        store=store,
        run_id=run_id,
        grace=grace,
        deadline=deadline,
        on_event=on_event,
    )


def prepare(
    flow: Flow,
    inputs: Mapping[str, Any] | None,
    *,
    interrupts: MemoryObjectReceiveStream[InterruptSignal] | None,
    strategy: Strategy,
    resume: Checkpoint | None = None,
    store: Store | None = None,
    run_id: str | None,
    grace: float | None,
    deadline: float | None,
    on_event: EventCallback | None = None,
) -> _Run:
    """Check the arguments of one run of `flow` (see `Flow.run`) and set it up, not started."""
    if not isinstance(strategy, Strategy) or type(strategy) is Strategy:
        raise TypeError(
            f"flow {flow.name!r}: strategy must be one of AtCheckpoint(), FinishCurrent(), PollNextN(n), "
            f"IgnoreInterruptions(); got {strategy!r}"
        )
    if interrupts is not None and not isinstance(interrupts, MemoryObjectReceiveStream):
        raise TypeError(
            f"flow {flow.name!r}: interrupts must be an anyio MemoryObjectReceiveStream[InterruptSignal], "
            f"got {type(interrupts).__name__}"
        )
    plan = flow._freeze()
    if resume is not None:
        if not isinstance(resume, Checkpoint):
            raise TypeError(f"flow {flow.name!r}: resume must be a Checkpoint, got {type(resume).__name__}")
        check_belongs(flow, resume)
        _check_resume_inputs(flow, inputs, resume)
        if inputs is None:
            inputs = resume.inputs
        if run_id is None:
            run_id = resume.run_id
    if run_id is None:
        run_id = uuid.uuid4().hex
    elif not isinstance(run_id, str) or not run_id:
        raise TypeError(f"flow {flow.name!r}: run_id must be a non-empty str, got {run_id!r}")
    if on_event is not None and not callable(on_event):
        raise TypeError(f"flow {flow.name!r}: on_event must be a callable taking an event, got {on_event!r}")
    grace = _seconds(flow, "grace", grace)
    deadline = _seconds(flow, "deadline", deadline)
    control = _Control(flow.name, run_id, strategy, grace, store, _sinks(on_event))
    run = _Run(
        flow,
        plan,
        _check_inputs(flow, inputs, plan),
        control,
        run_id,
        signals=control.signals,
        deadline=deadline,
        resume=resume,
    )
    control.top = run
    return run


def _same(given: Any, stored: Any) -> bool:
    """Equal, or equal as JSON: an unannotated tuple comes back from a checkpoint as a list."""
    if given == stored:
        return True
    try:
        return bool(pydantic_core.to_jsonable_python(given) == pydantic_core.to_jsonable_python(stored))
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError):
        return False


def _check_resume_inputs(flow: Flow, inputs: Mapping[str, Any] | None, checkpoint: Checkpoint) -> None:
    if inputs is None:
        return
    if not isinstance(inputs, Mapping):
        return  # _check_inputs says what is wrong
    differing = sorted(
        str(name)
        for name in set(inputs) | set(checkpoint.inputs)
        if name not in inputs or name not in checkpoint.inputs or not _same(inputs[name], checkpoint.inputs[name])
    )
    if differing:
        raise CheckpointMismatch(
            f"flow {flow.name!r}, run {checkpoint.run_id!r}: the inputs differ from the checkpoint's "
            f"({', '.join(map(repr, differing))}); omit inputs to use the checkpoint's"
        )


def _seconds(flow: Flow, option: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:  # `not >=` catches NaN
        raise ValueError(f"flow {flow.name!r}: {option} must be None or a number of seconds >= 0, got {value!r}")
    return float(value)


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


def _sinks(on_event: EventCallback | None) -> list[EventCallback]:
    """Who hears a run's events from its start: `on_event`, and structlog once the application
    configured it (unconfigured, structlog prints to stdout, which a library must not start
    doing). `FlowRun.events()` adds and removes listeners as it goes."""
    sinks: list[EventCallback] = []
    if on_event is not None:
        sinks.append(on_event)
    if structlog.is_configured():
        sinks.append(log_event)
    return sinks


def _listener_failed(sink: EventCallback, event: RunEvent) -> None:
    """Log a listener's exception (being handled): through structlog if the application configured
    it, else through the standard library's `logging` (to stderr, by its last-resort handler),
    never through an unconfigured structlog, which would print to stdout."""
    try:
        if structlog.is_configured():
            structlog.get_logger("stoppoint").exception(
                "event.listener_failed", listener=repr(sink), failed_on=event.event, run_id=event.run_id
            )
        else:
            logging.getLogger("stoppoint").exception(
                "event listener %r failed on %s (run %s)", sink, event.event, event.run_id
            )
    except Exception:  # pragma: no cover - a logging setup that raises must not stop the run either
        pass


def _first_stop(group: BaseExceptionGroup[Any]) -> StopRequested | None:
    for exc in group.exceptions:
        if isinstance(exc, StopRequested):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_stop(exc)) is not None:
            return found
    return None


class _StepRecord:
    """What happened to one started step in one run (steps that never start get none).

    No __slots__: the class-level defaults spare the per-step hot path six attribute stores.
    """

    finished: float | None = None
    duration: float | None = None
    stopped_at: str | None = None
    error: str | None = None
    nested: _Timeline | None = None  # an include step's inner run
    progress: tuple[float, float | None, str | None] | None = None  # the context's, once the step is over
    # Its end is final and was told to any listener: a listener who comes later learns it from the
    # record, and one who comes before hears it live, never both.
    told = False

    def __init__(self, started: float, ctx: StepContext | None = None) -> None:
        self.status = _RUNNING
        self.started = started  # perf_counter(); turned into wall-clock time for the report
        self.ctx = ctx  # its `_progress` goes into the report (while the step runs)


class _Timeline:
    """What a report is built from: step records, signals and times (no outputs, no tasks), so
    an outcome that builds its report lazily keeps nothing else of the run alive."""

    __slots__ = (
        "cache",
        "done",
        "ended",
        "finished",
        "flow",
        "perf0",
        "records",
        "resumed",
        "run_id",
        "signals",
        "steps",
        "wall0",
    )

    def __init__(self, run_id: str, flow: str, steps: tuple[str, ...], signals: list[InterruptSignal]) -> None:
        # Completed in an earlier attempt (outputs from the checkpoint); a run that resumes
        # nothing shares one empty frozenset (`frozenset()` builds a new one each time).
        self.resumed: frozenset[str] = _NOTHING
        self.cache: dict[str, StepReport] = {}  # step reports that will not change (see step_report)
        self.run_id = run_id
        self.flow = flow
        self.steps = steps
        self.records: dict[str, _StepRecord] = {}
        # Most completed steps leave only (name, started, finished) in `finished`, not a record:
        # the collector stops tracking a tuple of a str and floats, so a long chain does not grow
        # the heap every full collection traverses (a 100,000-step chain ran at half speed with
        # records), and appending to a list costs no cache miss. `done` indexes it by name when
        # a report is built.
        self.finished: list[tuple[str, float, float]] = []
        self.done: dict[str, tuple[float, float]] = {}
        self.signals = signals
        # One wall-clock reading per run; step times are perf_counter() offsets from it.
        self.wall0 = time.time()
        self.perf0 = time.perf_counter()
        self.ended: float | None = None

    def wall(self, t: float | None) -> datetime | None:
        return None if t is None else datetime.fromtimestamp(self.wall0 + (t - self.perf0), UTC)

    def report(self) -> RunReport:
        """Build the pydantic report (outcomes call this only when their `.report` is read; a
        `FlowRun` calls it while the run goes on, which gives PENDING and RUNNING steps, and a
        store after every completed step)."""
        finished, done = self.finished, self.done
        if len(done) < len(finished):
            for name, started, ended in finished[len(done) :]:
                done[name] = (started, ended)
        return RunReport.model_construct(
            run_id=self.run_id,
            flow=self.flow,
            started_at=self.wall(self.perf0),
            finished_at=self.wall(self.ended),
            steps={name: self.step_report(name) for name in self.steps},
            interrupts=list(self.signals),
        )

    def step_report(self, name: str) -> StepReport:
        # A store builds the report after every step, and a pydantic model costs ~20 µs even
        # through model_construct: keep the reports that can no longer change.
        cached = self.cache.get(name)
        record = self.records.get(name)
        if record is None:
            times = self.done.get(name)
            if times is not None:
                if cached is None or cached.started_at is None:  # (cached while it was PENDING)
                    started, finished = times
                    # The fields a record's report sets (below), so that every completed step's
                    # report has the same `model_fields_set`.
                    self.cache[name] = cached = StepReport.model_construct(
                        name=name,
                        status=StepStatus.COMPLETED,
                        started_at=self.wall(started),
                        finished_at=self.wall(finished),
                        duration_s=finished - started,
                        stopped_at=None,
                        error=None,
                        progress=None,
                        nested=None,
                    )
                return cached
            if name in self.resumed:
                status = StepStatus.COMPLETED
            else:
                status = StepStatus.PENDING if self.ended is None else StepStatus.NOT_STARTED
            if cached is None or cached.status is not status:
                self.cache[name] = cached = StepReport.model_construct(
                    name=name, status=status, resumed=name in self.resumed
                )
            return cached
        if cached is not None and cached.started_at is not None:
            return cached
        progress = record.ctx._progress if record.ctx is not None else record.progress
        # model_construct: these values are ours and already valid (progress was checked when given).
        report = StepReport.model_construct(
            name=name,
            status=record.status,
            started_at=self.wall(record.started),
            finished_at=self.wall(record.finished),
            duration_s=record.duration,
            stopped_at=record.stopped_at,
            error=record.error,
            progress=None
            if progress is None
            else Progress.model_construct(done=progress[0], total=progress[1], message=progress[2]),
            nested=None if record.nested is None else record.nested.report(),
        )
        if record.status is StepStatus.COMPLETED:  # final: nothing changes a completed step's record
            self.cache[name] = report
        return report

    def step_events(self, run_id: str, events: list[RunEvent]) -> None:
        """Append the events of the steps started so far, looking into includes (see `_Run.past_events`)."""
        wall, flow = self.wall, self.flow

        def started(name: str, at: float) -> None:
            events.append(StepStartedEvent.model_construct(run_id=run_id, flow=flow, at=wall(at), step=name))

        for name, begun, ended in self.finished:
            started(name, begun)
            events.append(
                StepCompletedEvent.model_construct(
                    run_id=run_id, flow=flow, at=wall(ended), step=name, duration_s=ended - begun
                )
            )
        for name, record in self.records.items():
            started(name, record.started)
            if record.nested is not None:
                record.nested.step_events(run_id, events)
            if record.told and record.finished is not None:
                events.append(self.step_end_event(run_id, name, record, record.finished))

    def step_end_event(self, run_id: str, name: str, record: _StepRecord, ended: float) -> RunEvent:
        """The event of how a started step ended, by its record's (final) status."""
        common: dict[str, Any] = {"run_id": run_id, "flow": self.flow, "at": self.wall(ended), "step": name}
        status = record.status
        if status is _COMPLETED:
            return StepCompletedEvent.model_construct(duration_s=ended - record.started, **common)
        if status is StepStatus.INTERRUPTED:
            return StepStoppedEvent.model_construct(stopped_at=record.stopped_at, **common)
        if status is StepStatus.FAILED:
            return StepFailedEvent.model_construct(error=record.error or "", **common)
        # CANCELLED, or still RUNNING: a cancellation went through before the end was recorded
        return StepCancelledEvent.model_construct(**common)

    def stopped_at(self) -> str | None:
        """Where the first step that stopped at a stopping point stopped, looking into includes."""
        for record in self.records.values():
            if record.status is StepStatus.INTERRUPTED and record.stopped_at is not None:
                return record.stopped_at
        return None


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


class _Control:
    """The interrupt state of one run, shared with the flows it includes.

    It holds the signals, decides with the strategy when they take effect, and escalates: a forced
    signal or the end of `grace` cancels the top-level task group, and with it every step in
    flight at every level of nesting (shielded blocks finish first, as anyio promises).
    """

    __slots__ = (
        "background",
        "bad_signal",
        "closed",
        "first",
        "flow",
        "forced",
        "grace",
        "observer",
        "polled",
        "probe",
        "received",
        "run_id",
        "running",
        "save_lock",
        "shut",
        "signals",
        "sinks",
        "started_since_interrupt",
        "store",
        "store_error",
        "strategy",
        "task_group",
        "top",
    )

    def __init__(
        self,
        flow: str,
        run_id: str,
        strategy: Strategy,
        grace: float | None,
        store: Store | None,
        sinks: list[EventCallback] | None = None,
    ) -> None:
        self.flow = flow
        self.sinks = sinks or []  # who listens to the run's events
        self.probe: Probe | None = None  # stoppoint.testing's view of the run's stopping points
        # What the run calls with each event, at every level: None while nobody listens, and then
        # no event is built at all.
        self.observer: Callable[[RunEvent], None] | None = self.dispatch if self.sinks else None
        self.store = store
        self.top: _Run | None = None  # the top-level run: what a save writes
        self.save_lock = anyio.Lock() if store is not None else None  # saves of one run never overlap
        self.store_error: Exception | None = None
        self.run_id = run_id
        self.strategy = strategy
        self.grace = grace
        self.signals: list[InterruptSignal] = []
        self.received: list[float] = []  # perf_counter() when each of `signals` came
        self.first: InterruptSignal | None = None
        self.started_since_interrupt = 0
        # No step may start now (at any level): the strategy's verdict, kept up to date whenever
        # its inputs change so that the stopping point before each step reads one attribute.
        self.closed = False
        self.running: set[StepContext] = set()  # contexts of the running steps, at every level
        self.forced = False
        # No step may start any more: escalated, or the interrupt stream carried garbage.
        self.shut = False
        self.bad_signal: TypeError | None = None
        self.polled: MemoryObjectReceiveStream[InterruptSignal] | None = None  # a plain stream
        self.task_group: TaskGroup | None = None  # the top-level run's
        self.background: list[anyio.CancelScope] | None = []  # timers and watcher; None once idle

    # -- events --------------------------------------------------------------------------------------

    def dispatch(self, event: RunEvent) -> None:
        for sink in list(self.sinks):
            try:
                sink(event)
            except Exception:
                # A listener's bug must not change the run (as a failing callback does not stop
                # an event loop): it is logged, with its traceback, and the run goes on.
                _listener_failed(sink, event)

    def listen(self, sink: EventCallback) -> None:
        self.sinks.append(sink)
        self.observer = self.dispatch

    def unlisten(self, sink: EventCallback) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)
        if not self.sinks:
            self.observer = None

    # -- signals -------------------------------------------------------------------------------------

    def on_signal(self, signal: InterruptSignal) -> None:
        """Record a signal; the first one takes effect now, as the strategy says."""
        self.record(signal)
        if self.first is None:
            self.first = signal
            strategy = self.strategy
            self.closed = not strategy._may_start(0)
            if strategy._stops_running_steps:
                for ctx in self.running:
                    ctx._request_stop()
            if self.grace is not None and strategy._escalates:
                if not self.grace:
                    self.escalate()
                elif self.task_group is not None:
                    self.spawn(self.grace_timer)
                # else: the run has not begun; it arms the timer when it does
        if signal.force:
            self.escalate()
        # Told after it took effect: a listener that interrupts in turn comes second.
        self.tell_received(signal, self.received[-1])

    def record(self, signal: InterruptSignal) -> None:
        """Add `signal` to the run's signals, with when it came (a late listener learns it from there)."""
        self.signals.append(signal)
        self.received.append(_perf_counter())

    def tell_received(self, signal: InterruptSignal, at: float) -> None:
        if self.observer is not None and self.top is not None:
            self.observer(
                InterruptReceivedEvent.model_construct(
                    run_id=self.run_id, flow=self.flow, at=self.top.timeline.wall(at), signal=signal
                )
            )

    def drain(self, receiver: MemoryObjectReceiveStream[InterruptSignal]) -> bool:
        """Take every signal already waiting in `receiver`; False if it is closed or ended."""
        return take_buffered(receiver, self.accept)

    def accept(self, item: object) -> bool:
        if isinstance(item, InterruptSignal):
            self.on_signal(item)
            return True
        # A foreign object on the stream is a programming error; stop the run and report it.
        if self.bad_signal is None:
            self.bad_signal = TypeError(
                f"flow {self.flow!r}, run {self.run_id!r}: the interrupt stream carried "
                f"{type(item).__name__} {item!r}; only InterruptSignal may be sent"
            )
            self.shut_down()
        return False

    def poll(self) -> None:
        # A plain stream's signal may sit in its buffer while the watcher task has not reached
        # receive() yet, so a stopping point looks now rather than start one more step. An ended
        # stream has nothing more to say: stop looking.
        assert self.polled is not None
        if not self.drain(self.polled):
            self.polled = None

    async def watch(self, receiver: MemoryObjectReceiveStream[InterruptSignal]) -> None:
        """Read a plain anyio stream (one without the interrupt_channel hub) until the run ends."""
        try:
            async for item in receiver:
                if not self.accept(item):
                    return
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # a closed stream means no more interrupts

    # -- when signals take effect -----------------------------------------------------------------------

    def started_after_interrupt(self) -> None:
        """A step started after the first interrupt: the strategy may now close the run to new steps."""
        self.started_since_interrupt = n = self.started_since_interrupt + 1
        if not self.strategy._may_start(n):
            self.closed = True

    def escalate(self) -> None:
        """Cancel every step in flight (a forced signal, or grace ran out), unless the strategy ignores it."""
        if self.forced or not self.strategy._escalates or self.background is None:
            return  # (background None: the run is idle, every step is over; nothing to force)
        self.forced = True
        for ctx in self.running:
            ctx._force()
        self.shut_down()

    def close(self) -> None:
        """Start no more steps, at any level."""
        self.closed = True

    def shut_down(self) -> None:
        self.shut = self.closed = True
        if self.task_group is not None:
            self.task_group.cancel_scope.cancel()

    # -- persistence ----------------------------------------------------------------------------------

    async def save(self) -> None:
        """Commit the top-level run's checkpoint and report to the store.

        Shielded: a cancelled run still records how far it got. A failing save ends the run (no
        step may start whose inputs are not committed); `run()` then raises the store's error.
        """
        store, top = self.store, self.top
        if store is None or top is None or self.store_error is not None:
            return
        assert self.save_lock is not None
        with anyio.CancelScope(shield=True):
            async with self.save_lock:
                try:
                    await store.save(top.checkpoint(), top.timeline.report())
                except Exception as exc:
                    if self.store_error is None:
                        self.store_error = exc
                        self.shut_down()

    # -- timers ---------------------------------------------------------------------------------------

    async def grace_timer(self) -> None:
        assert self.grace is not None
        await _sleep(self.grace)
        self.escalate()

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run `fn` in the top-level task group until the run is idle (no step left to run)."""
        if self.background is None or self.task_group is None:
            return
        scope = anyio.CancelScope()
        self.background.append(scope)
        self.task_group.start_soon(self._in_scope, scope, fn, *args, name=f"stoppoint {self.flow} {fn.__name__}")

    @staticmethod
    async def _in_scope(scope: anyio.CancelScope, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        with scope:
            await fn(*args)

    def idle(self) -> None:
        """The last step is done: background tasks must not hold the task group open."""
        background, self.background = self.background, None
        for scope in background or ():
            scope.cancel()


class _Run:
    """One run of one flow: its mutable state and the loop that drives it.

    An include step runs the included flow as another `_Run` sharing the same `_Control`.
    """

    # Slots: with 30 attributes an instance dict reaches CPython 3.11's limit for shared keys, past
    # which every attribute read on the per-step path slows down (a chain step cost 10% more).
    __slots__ = (
        "active",
        "cancelled_exc",
        "control",
        "deadline",
        "decided",
        "entries",
        "failure",
        "fatal",
        "finished",
        "flow",
        "halted",
        "head",
        "includes",
        "inputs",
        "is_top",
        "limit",
        "name",
        "outputs",
        "over",
        "partial",
        "path",
        "plan",
        "ready",
        "records",
        "run_id",
        "specs",
        "store",
        "task_group",
        "timeline",
        "told_end",
        "unstarted",
        "waiting",
    )

    def __init__(
        self,
        flow: Flow,
        plan: Plan,
        inputs: dict[str, Any],
        control: _Control,
        run_id: str,
        *,
        signals: list[InterruptSignal],
        deadline: float | None = None,
        resume: Checkpoint | None = None,
    ) -> None:
        self.flow = flow
        self.name = flow.name
        self.specs = flow._specs
        self.entries = plan.entries
        self.plan = plan
        self.inputs = inputs
        self.control = control
        self.run_id = run_id
        self.deadline = deadline
        self.limit = flow.max_concurrency or len(self.specs)
        self.timeline = _Timeline(run_id, flow.name, tuple(self.specs), signals)
        self.records = self.timeline.records
        self.finished = self.timeline.finished
        self.store = control.store is not None  # save after each completed step
        self.includes: dict[str, _Run] = {}  # include steps running: their inner runs
        if resume is None:
            self.waiting = dict(plan.counted)  # steps waiting for one step alone need no count
            self.ready = list(plan.roots)
            self.outputs: dict[str, Any] = {}
            self.partial: dict[str, Checkpoint] = {}  # include steps left unfinished: their checkpoints
        else:
            # Completed steps do not run again: their outputs come from the checkpoint.
            self.outputs = dict(resume.outputs)
            self.partial = dict(resume.nested)
            self.timeline.resumed = frozenset(self.outputs)
            self.waiting = {
                name: sum(other not in self.outputs for other in spec.waits_for)
                for name, spec in self.specs.items()
                if name not in self.outputs
            }
            self.ready = [name for name, left in self.waiting.items() if not left]
            # A step completed in the checkpoint is never made ready again, even when a step it
            # waits for runs now (a flow that gained a prerequisite at the same version).
            self.entries = {
                name: (spec, tuple(item for item in dependants if item[0] not in self.outputs))
                for name, (spec, dependants) in plan.entries.items()
            }
        # The ready queue is ready[head:]: a list and an index take a tenth of the memory of a
        # deque, which every run would hold for as long as it lasts.
        self.head = 0
        # After an interrupt (PollNextN): whether a handed-out step may start, decided in hand-out order.
        self.decided: dict[str, bool] = {}
        # Handed out together with others (in that order), not at their stopping point yet.
        self.unstarted: dict[str, None] = {}
        self.active = 0  # steps handed to a worker and not finished
        # Why this level is being abandoned, if it is; `halted` is their "or", checked per step.
        self.halted = False
        self.failure: tuple[str, BaseException] | None = None
        self.fatal: BaseException | None = None  # KeyboardInterrupt, SystemExit from a step
        self.cancelled_exc = anyio.get_cancelled_exc_class()
        self.task_group: TaskGroup | None = None
        self.is_top = False
        self.path: tuple[
            str, ...
        ] = ()  # the include steps leading to this level (stoppoint.testing names points by it)
        self.told_end: RunEvent | None = None  # the end event, once told (streams opened after it get it too)
        self.over = False  # the run's outcome is being made: it is over

    def halt(self) -> None:
        """Start no more steps here and cancel the running ones (a step failed)."""
        self.halted = True
        if self.task_group is not None:
            self.task_group.cancel_scope.cancel()

    # -- scheduling ------------------------------------------------------------------------------

    def admit(self, name: str) -> bool:
        """The stopping point before step `name` once the run is interrupted or halting: may it start?

        With `PollNextN(n)` the n steps that still start must be the first handed out, whatever
        order the scheduler runs their tasks in (trio picks at random): the steps handed out
        together with others are decided in the order they were handed out.
        """
        if self.halted or self.control.shut:
            self.unstarted.pop(name, None)
            return False
        decided = self.decided
        for other in self.unstarted:
            if other not in decided and self.specs[other].fn is not None:
                decided[other] = self.count_start()
        self.unstarted.pop(name, None)
        if name in decided:
            return decided.pop(name)
        return self.count_start()

    def count_start(self) -> bool:
        """One more step would start after the interrupt: may it, by the strategy? (It counts if so.)"""
        control = self.control
        if control.closed:
            return False
        control.started_after_interrupt()
        return True

    def next_step(self) -> str | None:
        """Hand out ready steps: one for the calling worker, a new task for each other one."""
        control = self.control
        if self.halted or control.closed:
            return None
        take: str | None = None
        ready = self.ready
        head = self.head
        while head < len(ready) and self.active < self.limit:
            name = ready[head]
            if control.probe is not None and self.specs[name].fn is not None:
                # stoppoint.testing: the stopping point before the step, told as the step is handed
                # out, in ready order, so that an interrupt there decides the same on every backend.
                control.probe.reached(self.path, self.name, name, 0)
            if control.first is not None and self.specs[name].fn is not None:
                # After the interrupt, the steps that may still start (PollNextN) are chosen as
                # they are handed out, in the order they became ready.
                if not self.count_start():
                    break
                self.decided[name] = True
            head += 1
            self.active += 1
            if take is None:
                take = name
            else:
                if not self.unstarted or take not in self.unstarted:
                    self.unstarted[take] = None  # handed out first: decided first, see admit()
                self.unstarted[name] = None
                assert self.task_group is not None
                self.task_group.start_soon(self.work, name, name=f"stoppoint {self.name}.{name}")
        if head == len(ready):
            ready.clear()
            head = 0
        self.head = head
        return take

    async def work(self, name: str | None) -> None:
        """Run `name`, then whatever becomes ready, until nothing is left for this worker."""
        last_yield = time.perf_counter()
        while name is not None:
            await self.run_step(name)
            # Back-to-back steps in one task would never let other tasks run; yield now and then,
            # between two steps (holding none, so the next is taken, and starts, after the yield).
            # Not when no step is ready: this worker is about to end, and the last one to end must
            # see the run idle before any timer (grace, deadline) gets a turn to act on it.
            now = time.perf_counter()
            if now - last_yield >= YIELD_INTERVAL and self.head < len(self.ready):
                last_yield = now
                await yield_to_others()
            name = self.next_step()
        if not self.active and self.is_top:
            self.control.idle()

    def arguments(self, spec: StepSpec) -> dict[str, Any]:
        """The keyword arguments of a step: outputs it depends on, inputs it takes (run_step inlines this)."""
        kwargs: dict[str, Any] = {}
        outputs = self.outputs
        for dependency in spec.dependencies:
            kwargs[dependency] = outputs[dependency]
        inputs = self.inputs
        for item in spec.inputs:
            if item.param in inputs:
                kwargs[item.param] = inputs[item.param]
        return kwargs

    async def run_step(self, name: str) -> None:
        try:
            spec, dependants = self.entries[name]
            fn = spec.fn
            if fn is None:
                assert spec.include is not None
                await self.run_include(name, spec, spec.include)
                return
            # The stopping point before the step: its common case (nothing pending, nothing
            # halting) inline, the rest in admit().
            control = self.control
            if control.polled is not None:
                control.poll()
            if control.first is None and not self.halted and not control.shut:
                if self.unstarted:
                    self.unstarted.pop(name, None)
            elif not self.admit(name):
                return
            # arguments() and release(), inlined below: two method calls are ~10% of a step of a
            # chain, and this is the per-step hot path.
            kwargs: dict[str, Any] = {}
            outputs = self.outputs
            for dependency in spec.dependencies:
                kwargs[dependency] = outputs[dependency]
            inputs = self.inputs
            for item in spec.inputs:
                if item.param in inputs:
                    kwargs[item.param] = inputs[item.param]
            ctx: StepContext | None = None
            running = control.running
            started = _perf_counter()
            if spec.context_param is not None:
                ctx = _new_context(self.run_id, self.name, name, started)
                if control.probe is not None:
                    ctx._probe = control.probe.counter(self.path, self.name, name)
                kwargs[spec.context_param] = ctx
                running.add(ctx)
            self.records[name] = record = _StepRecord(started, ctx)
            observer = control.observer
            if observer is not None:
                observer(
                    StepStartedEvent.model_construct(
                        run_id=self.run_id, flow=self.name, at=self.timeline.wall(started), step=name
                    )
                )
            now = started
            try:
                value = await fn(**kwargs)
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
                if rest is None and _cancellation_in_effect():
                    # Stops only, but the step is being cancelled: asyncio's task group dropped
                    # the cancellation from the group (trio's keeps it). Report it as trio would.
                    self.finish(record, StepStatus.CANCELLED)
                    self.control.close()
                elif rest is None:
                    self.stopped(name, record, ctx, _first_stop(group), group)
                else:
                    self.failed_or_cancelled(name, record, rest, group)
            except Exception as exc:
                self.failed(name, record, exc)
            except BaseException as exc:
                self.fatal_error(record, exc)
            else:
                now = _perf_counter()
                record.status = _COMPLETED
                record.finished = now
                outputs[name] = value
                if self.store:
                    # Durability: the output is committed before any step that needs it starts.
                    record.duration = now - started  # (the saved report reads the record)
                    await self.saved()
                for dependant, alone in dependants:
                    if alone:
                        self.ready.append(dependant)
                    else:
                        waiting = self.waiting
                        left = waiting[dependant] - 1
                        waiting[dependant] = left
                        if not left:
                            self.ready.append(dependant)
                if ctx is not None and ctx._shielded and _cancellation_in_effect():
                    # A shield let the step finish while the run was being cancelled (say, its
                    # task group was): its output is kept, but no further step may start. Only
                    # after a shield, because the check costs more than a whole step.
                    control.close()
            finally:
                if ctx is not None:
                    running.discard(ctx)
                    if ctx._open and record.status is not _COMPLETED:
                        await self.close_iterations(name, record, ctx)
                    # A record may outlive its step (the report reads it); its context need not.
                    record.progress = ctx._progress
                    record.ctx = None
                if record.status is _COMPLETED and record.progress is None:
                    del self.records[name]
                    self.finished.append((name, started, now))  # see _Timeline.finished
                else:
                    if record.status is _COMPLETED:
                        record.duration = now - started
                    record.told = True
                if control.observer is not None:  # (someone may have begun listening meanwhile)
                    self.step_ended(name, record, now)
        finally:
            self.active -= 1

    async def run_include(self, name: str, spec: StepSpec, flow: Flow) -> None:
        """Run an included flow as one step: its steps are stopping points of this run, under the
        same signals and strategy (the include step itself starts without counting as a step)."""
        control = self.control
        if control.polled is not None:
            control.poll()
        self.unstarted.pop(name, None)
        if self.halted or control.closed:
            return
        inner = _Run(
            flow,
            flow._freeze(),
            self.arguments(spec),
            control,
            self.run_id,
            signals=[],
            resume=self.partial.pop(name, None),
        )
        inner.path = (*self.path, name)
        self.records[name] = record = _StepRecord(_perf_counter())
        record.nested = inner.timeline
        self.includes[name] = inner
        if control.observer is not None:
            control.observer(
                StepStartedEvent.model_construct(
                    run_id=self.run_id, flow=self.name, at=self.timeline.wall(record.started), step=name
                )
            )
        try:
            done, value = await inner.run_nested()
        except self.cancelled_exc:
            self.cancelled_include(name, record, inner)
            raise
        except BaseExceptionGroup as group:
            if group.split(self.cancelled_exc)[1] is not None:
                self.failed(name, record, group)
            else:
                self.cancelled_include(name, record, inner)
                raise
        except Exception as exc:  # StepFailed of the included flow
            self.failed(name, record, exc)
        except BaseException as exc:
            self.fatal_error(record, exc)
        else:
            stopped_at = inner.timeline.stopped_at()
            if done:
                self.finish(record, StepStatus.COMPLETED)
                self.outputs[name] = value
                del self.includes[name]
                if self.store:
                    await self.saved()
                self.release(name)
            elif control.forced and stopped_at is None:
                self.finish(record, StepStatus.CANCELLED)  # forced: it did not stop at a stopping point
            else:
                self.finish(record, StepStatus.INTERRUPTED)
                record.stopped_at = stopped_at
        finally:
            self.includes.pop(name, None)
            if record.status is not StepStatus.COMPLETED and (inner.outputs or inner.partial):
                self.partial[name] = inner.checkpoint()
            record.told = True
            if control.observer is not None:
                self.step_ended(name, record, record.finished or _perf_counter())

    def cancelled_include(self, name: str, record: _StepRecord, inner: _Run) -> None:
        """The include step is being cancelled: a failure inside it, if any, still counts."""
        if inner.fatal is not None:
            self.fatal_error(record, inner.fatal)
        elif inner.failure is not None:
            self.failed(name, record, inner.step_failed())
        else:
            self.finish(record, StepStatus.CANCELLED)

    async def close_iterations(self, name: str, record: _StepRecord, ctx: StepContext) -> None:
        """Close the generators of `ctx.iterate()` loops the step left unfinished, so their
        `finally` blocks run now rather than at garbage collection."""
        try:
            if _cancellation_in_effect():
                # The step was cancelled (forced, a sibling failed, the caller cancelled): shield
                # the cleanup from that cancellation, but not for ever.
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

    def step_ended(self, name: str, record: _StepRecord, completed_at: float) -> None:
        """Tell the observer how a started step ended, once its status is final (`completed_at`:
        when it returned, if it did; a completed step's record may not keep it)."""
        observer = self.control.observer
        assert observer is not None
        if record.status is not _COMPLETED:
            completed_at = record.finished if record.finished is not None else _perf_counter()
        observer(self.timeline.step_end_event(self.run_id, name, record, completed_at))

    async def saved(self) -> None:
        """Save after a completed step. The save is shielded, so a cancellation of the run may
        have come meanwhile unseen: then no further step may start."""
        await self.control.save()
        if _cancellation_in_effect():
            self.control.close()

    def release(self, name: str) -> None:
        """Make ready the steps that waited for `name`, which completed (run_step inlines this)."""
        waiting = self.waiting
        for dependant, alone in self.entries[name][1]:
            if alone:
                self.ready.append(dependant)
            else:
                left = waiting[dependant] - 1
                waiting[dependant] = left
                if not left:
                    self.ready.append(dependant)

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

    def failed_or_cancelled(
        self, name: str, record: _StepRecord, rest: BaseExceptionGroup[Any], group: BaseExceptionGroup[Any]
    ) -> None:
        """A step's exception group that is not only stops: cancelled if `rest` holds only
        cancellations, else failed."""
        if rest.split(self.cancelled_exc)[1] is None:
            # Only stops and cancellations: the cancellation is what ends the step. Raise the
            # cancellations alone, or the caller's cancel scope could not absorb them.
            self.finish(record, StepStatus.CANCELLED)
            raise rest from None
        self.failed(name, record, group)

    def failed(self, name: str, record: _StepRecord, exc: BaseException) -> None:
        self.finish(record, StepStatus.FAILED)
        record.error = f"{type(exc).__name__}: {exc}"
        if self.failure is None:
            self.failure = (name, exc)
            self.halt()  # siblings still running end CANCELLED

    def fatal_error(self, record: _StepRecord, exc: BaseException) -> None:
        """KeyboardInterrupt, SystemExit: record it, end the run, and re-raise it as itself once
        the task group is gone (raised here, it would leave run() in an exception group)."""
        self.finish(record, StepStatus.FAILED)
        record.error = f"{type(exc).__name__}: {exc}"
        if self.fatal is None:
            self.fatal = exc
            self.halt()

    # -- the whole run ----------------------------------------------------------------------------

    async def drive(self, started: Callable[[], object] | None = None) -> None:
        """Run this level's steps in a task group of its own."""
        try:
            async with anyio.create_task_group() as task_group:
                self.task_group = task_group
                if self.is_top:
                    self.begin(task_group)
                if started is not None:
                    started()
                await self.work(self.next_step())
        finally:
            self.timeline.ended = time.perf_counter()

    def begin(self, task_group: TaskGroup) -> None:
        """The top-level run's task group is up: arm escalation, timers and the stream watcher."""
        control = self.control
        signalled_before = control.first is not None  # its grace timer could not start then
        control.task_group = task_group
        if control.shut:
            task_group.cancel_scope.cancel()  # forced before the run began
        if control.polled is not None:
            control.spawn(control.watch, control.polled)
        if self.deadline is not None:
            if self.deadline:
                control.spawn(self.deadline_timer, self.deadline)
            else:
                control.on_signal(self.deadline_signal(self.deadline))
        if signalled_before and control.grace and control.strategy._escalates:
            control.spawn(control.grace_timer)

    @staticmethod
    def deadline_signal(seconds: float) -> InterruptSignal:
        return InterruptSignal(reason=f"deadline of {seconds:g} s passed", source="deadline")

    async def deadline_timer(self, seconds: float) -> None:
        await _sleep(seconds)
        if self.control.background is not None:  # the sleep may end in the turn the run went idle
            self.control.on_signal(self.deadline_signal(seconds))

    async def execute(
        self,
        receiver: MemoryObjectReceiveStream[InterruptSignal] | None,
        started: Callable[[], object] | None = None,
    ) -> Completed[Any] | Interrupted:
        """Run the flow at the top level, listening on `receiver`; `started` is called once the
        run has begun (its task group is up), before the first step."""
        self.is_top = True
        control = self.control
        control.probe = probe = probe_of(receiver)
        if probe is not None:
            probe.attached(self.flow)
            probe.deliver = control.on_signal
        if control.observer is not None:
            control.observer(
                FlowStartedEvent.model_construct(
                    run_id=self.run_id,
                    flow=self.name,
                    at=self.timeline.wall(self.timeline.perf0),
                    resumed=tuple(name for name in self.specs if name in self.timeline.resumed),
                )
            )
        channel = None
        if receiver is not None and control.drain(receiver):
            # Listening starts in the same synchronous stretch as the drain: no signal falls between.
            channel = linked(receiver)
            if channel is not None:
                channel.listen(control.on_signal)
            else:
                control.polled = receiver
        try:
            if self.store:
                await control.save()  # listed as running before any step starts
            await self.drive(started)
        finally:
            if channel is not None:
                channel.unlisten(control.on_signal)
            if receiver is not None:
                # Signals that came too late still belong in the report (the stored one too);
                # garbage that came too late cannot spoil a run that is over.
                bad_signal = control.bad_signal
                control.drain(receiver)
                control.bad_signal = bad_signal
            if self.store:
                if len(self.outputs) != len(self.specs) and _cancellation_in_effect():
                    self.cancel_signal()  # the stored report says what the outcome will say
                await control.save()  # how the run ended, also when it was cancelled
        if self.fatal is not None:
            if control.observer is not None:
                self.tell_failed(self.fatal)
            raise self.fatal
        await self.let_cancellation_through()
        return self.outcome()

    async def run_nested(self) -> tuple[bool, Any]:
        """Run as an included flow: (True, result) when every step completed, else (False, None).

        Raises:
            StepFailed: One of its steps failed.
        """
        await self.drive()
        if self.fatal is not None:
            raise self.fatal
        await self.let_cancellation_through()
        if self.failure is not None:
            raise self.step_failed()
        if len(self.outputs) == len(self.specs):
            return True, self.outputs[self.plan.result]
        return False, None

    async def let_cancellation_through(self) -> None:
        """Raise the cancellation of the caller's scope, if one is pending when the run ends unfinished.

        A shield, or a step that stopped at a stopping point, may have let the task group exit
        without an await to deliver it; the run must not return as if it had only been stopped.
        """
        control = self.control
        if (
            self.failure is None
            and control.bad_signal is None
            and control.store_error is None
            and len(self.outputs) != len(self.specs)
        ):
            await anyio.lowlevel.checkpoint_if_cancelled()

    def step_failed(self) -> StepFailed:
        assert self.failure is not None
        name, exc = self.failure
        error = StepFailed(name, self.timeline.report(), self.checkpoint())
        error.__cause__ = exc  # as `raise error from exc` would
        error.__suppress_context__ = True
        return error

    def outcome(self, cancelled: bool = False) -> Completed[Any] | Interrupted:
        """The run's outcome once it has ended; `cancelled`: its task was cancelled from outside
        (a `FlowRun` whose task group was cancelled), which makes an unfinished run a forced
        interrupt, with a signal of its own if none came first.

        Raises:
            TypeError: The interrupt stream carried something other than signals.
            StoreError: The store failed (or another error a store raised).
            StepFailed: A step failed (also when a cancellation came after).
        """
        self.over = True  # no signal counts any more (FlowRun.interrupt returns False)
        if self.control.observer is None:
            return self.ended(cancelled)
        try:
            outcome = self.ended(cancelled)
        except Exception as exc:
            self.tell_failed(exc)
            raise
        self.tell_ended(outcome)
        return outcome

    def tell_cancelled(self) -> None:
        """The caller's scope cancelled `run()` before the run ended: say so, as a forced interrupt."""
        if self.control.observer is not None and len(self.outputs) != len(self.specs):
            self.tell_ended(Interrupted(self.cancel_signal(), self.timeline.report, self.checkpoint(), forced=True))

    def tell_ended(self, outcome: Completed[Any] | Interrupted) -> None:
        """Tell the observer how the run ended (once: a cancelled `FlowRun` may ask twice)."""
        observer = self.control.observer
        if observer is None or self.told_end is not None:
            return
        self.told_end = self.end_event(outcome)
        observer(self.told_end)

    def tell_failed(self, exc: BaseException) -> None:
        observer = self.control.observer
        if observer is None or self.told_end is not None:
            return
        self.told_end = self.end_event(exc)
        observer(self.told_end)

    def end_event(self, end: Completed[Any] | Interrupted | BaseException) -> RunEvent:
        """The event of the run's end: its outcome, or what `run()` raised."""
        timeline = self.timeline
        at = timeline.ended if timeline.ended is not None else _perf_counter()
        common: dict[str, Any] = {
            "run_id": self.run_id,
            "flow": self.name,
            "at": timeline.wall(at),
            "duration_s": at - timeline.perf0,
        }
        if isinstance(end, Completed):
            return FlowCompletedEvent.model_construct(**common)
        if isinstance(end, Interrupted):
            return FlowInterruptedEvent.model_construct(signal=end.signal, forced=end.forced, **common)
        return FlowFailedEvent.model_construct(
            error=f"{type(end).__name__}: {end}", step=end.step if isinstance(end, StepFailed) else None, **common
        )

    def past_events(self) -> list[RunEvent]:
        """The events of the run so far, rebuilt from its records (for a listener who comes late),
        in the order they happened; without the end event, which `end_event` makes."""
        timeline = self.timeline
        events: list[RunEvent] = [
            FlowStartedEvent.model_construct(
                run_id=self.run_id,
                flow=self.name,
                at=timeline.wall(timeline.perf0),
                resumed=tuple(name for name in self.specs if name in timeline.resumed),
            )
        ]
        events += (
            InterruptReceivedEvent.model_construct(
                run_id=self.run_id, flow=self.name, at=timeline.wall(at), signal=signal
            )
            for signal, at in zip(timeline.signals, self.control.received, strict=True)
        )
        timeline.step_events(self.run_id, events)
        events.sort(key=lambda event: event.at)  # stable: a step's start stays before its end
        return events

    def ended(self, cancelled: bool) -> Completed[Any] | Interrupted:
        control = self.control
        if control.bad_signal is not None:
            raise control.bad_signal
        if control.store_error is not None:
            raise control.store_error
        if self.failure is not None:
            raise self.step_failed()
        if len(self.outputs) == len(self.specs):
            return Completed(self.outputs[self.plan.result], self.timeline.report)
        if cancelled:
            return Interrupted(self.cancel_signal(), self.timeline.report, self.checkpoint(), forced=True)
        if control.first is None:  # pragma: no cover - every path that leaves a step unfinished records why
            raise RuntimeError(f"stoppoint: run {self.run_id!r} of flow {self.name!r} ended unfinished without cause")
        return Interrupted(control.first, self.timeline.report, self.checkpoint(), forced=control.forced)

    def cancel_signal(self) -> InterruptSignal:
        """The signal of a run cancelled from outside: the first one received, or one of its own
        (recorded in the report like a received one) if none came."""
        control = self.control
        if control.first is None:
            control.first = InterruptSignal(
                reason="the task group running the flow was cancelled", force=True, source="cancel"
            )
            control.record(control.first)
            control.tell_received(control.first, control.received[-1])
        return control.first

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            flow=self.name,
            flow_version=self.flow.version,
            run_id=self.run_id,
            inputs=dict(self.inputs),
            outputs=dict(self.outputs),
            nested={**self.partial, **{name: inner.checkpoint() for name, inner in self.includes.items()}},
        )
