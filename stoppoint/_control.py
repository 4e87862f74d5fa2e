"""Control: one run's interrupt gate, shared by every level of the run (included flows too).

It holds the signals, decides with the strategy when they take effect, escalates (a forced signal
or the end of `grace` cancels the top-level task group, and with it every step in flight at every
level: shielded blocks finish first, as anyio promises), keeps the run's timers, and commits the
run to its store.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Coroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from ._errors import CheckpointError
from ._observers import Observers, interrupt_received
from ._probe import Probe
from ._signal import InterruptSignal, take_buffered
from ._store import BasicStore
from ._strategy import Strategy
from ._timeline import Timeline

if TYPE_CHECKING:
    from ._context import StepContext
    from ._persist import Persist

__all__ = ["Control", "cancellation_in_effect"]

_sleep = anyio.sleep
"""How the grace and deadline timers wait; tests replace it to drive time without waiting."""


def cancellation_in_effect() -> bool:
    """Is the current task being cancelled right now (by an anyio scope or a native asyncio cancel)?"""
    if anyio.current_effective_deadline() == -math.inf:
        return True
    if anyio.get_cancelled_exc_class() is asyncio.CancelledError:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0  # a native Task.cancel() of the caller
    return False


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` to its end in a task of its own, however often the current task is cancelled
    natively meanwhile (`Task.cancel()`, which an anyio shield does not stop); those cancellations
    are dropped: the caller raises the one it is handling."""
    task = asyncio.ensure_future(work)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)


class Control:
    """The interrupt state of one run: its signals, the strategy's verdict, escalation, timers, saves."""

    __slots__ = (
        "background",
        "bad_signal",
        "closed",
        "epoch",
        "first",
        "flow",
        "forced",
        "grace",
        "observers",
        "persist",
        "polled",
        "probe",
        "received",
        "resources",
        "run_id",
        "running",
        "save_lock",
        "shut",
        "signals",
        "started_since_interrupt",
        "store",
        "store_down",
        "store_error",
        "strategy",
        "task_group",
        "timeline",
        "unstorable",
    )

    def __init__(
        self,
        flow: str,
        run_id: str,
        strategy: Strategy,
        grace: float | None,
        store: BasicStore | None,
        observers: Observers,
    ) -> None:
        self.flow = flow
        self.run_id = run_id
        self.observers = observers
        self.probe: Probe | None = None  # stoppoint.testing's view of the run's stopping points
        self.store = store
        # The top-level run's timeline, and how the run writes to its store: set by the run's attempt.
        self.timeline: Timeline | None = None
        self.persist: Persist | None = None
        self.resources: dict[str, Any] = {}  # live objects for the steps' Resource[T] parameters (never stored)
        self.epoch = 0  # the run's claim number (StepContext.epoch), with a leased store
        # Fail the steps whose outputs cannot be stored, leaving them out; True if any (the attempt's).
        self.unstorable: Callable[[], bool] | None = None
        self.save_lock = anyio.Lock() if store is not None else None  # saves of one run never overlap
        self.store_error: Exception | None = None  # the first error of a save: run() raises it
        self.store_down = False  # the store failed: no more saves
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
        self.received.append(perf_counter())

    def tell_received(self, signal: InterruptSignal, at: float) -> None:
        tell = self.observers.tell
        if tell is not None and self.timeline is not None:
            tell(interrupt_received(self.timeline, signal, at))

    def cancel_signal(self) -> InterruptSignal:
        """The signal of a run cancelled from outside: the first one received, or one of its own
        (recorded in the report like a received one) if none came."""
        if self.first is None:
            self.first = InterruptSignal(
                reason="the task group running the flow was cancelled", force=True, source="cancel"
            )
            self.record(self.first)
            self.tell_received(self.first, self.received[-1])
        return self.first

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

    def count_start(self) -> bool:
        """One more step would start after the interrupt: may it, by the strategy? (It counts if so.)"""
        if self.closed:
            return False
        self.started_since_interrupt = n = self.started_since_interrupt + 1
        if not self.strategy._may_start(n):
            self.closed = True
        return True

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

    async def save(self, write: Callable[[], Awaitable[None]]) -> None:
        """Make one of the run's writes to its store (`write`: a method of `self.persist`).

        Never cut off: a cancelled run still records how far it got. Shielded from anyio
        cancellation; on asyncio a native `Task.cancel()` of the caller, which an anyio shield does
        not stop, may still cut the store's `save()` off: the save is then made again, to its end,
        in a task of its own that no cancellation of the caller reaches, and the cancellation goes
        on after it. A failing save ends the run (no step may start whose inputs are not
        committed); `run()` then raises the store's error. An output that cannot be serialised
        fails its step, and the run is saved without it: the store still works, so the run's end is
        saved too (failed, not running for ever).
        """
        if self.persist is None or self.store_down:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._save(write)
            except asyncio.CancelledError:  # native: nothing else reaches into the shield
                # The run is being cancelled, but its other tasks do not know it yet (a native
                # cancel reaches the task group only once it is raised on): no step may start
                # while the save is made again.
                self.close()
                await _to_the_end(self._save(write))
                raise

    async def _save(self, write: Callable[[], Awaitable[None]]) -> None:
        lock = self.save_lock
        assert lock is not None
        async with lock:
            if self.store_down:  # (the lease was lost while this save waited)
                return
            try:
                await write()
            except CheckpointError as exc:
                if self.unstorable is None or not self.unstorable():
                    self.store_failed(exc)
                    return
                self.store_failed(exc, down=False)
                try:
                    await write()
                except Exception as again:
                    self.store_failed(again)
            except Exception as exc:
                self.store_failed(exc)

    def store_failed(self, exc: Exception, down: bool = True) -> None:
        """A save raised `exc`: end the run, which raises the first such error (`down`: save no more)."""
        if self.store_error is None:
            self.store_error = exc
            self.shut_down()
        self.store_down = self.store_down or down

    # -- timers ---------------------------------------------------------------------------------------

    def begin(self, task_group: TaskGroup, deadline: float | None) -> None:
        """The top-level task group is up: arm escalation, the timers and the stream watcher."""
        signalled_before = self.first is not None  # its grace timer could not start then
        self.task_group = task_group
        if self.shut:
            task_group.cancel_scope.cancel()  # forced before the run began
        if self.polled is not None:
            self.spawn(self.watch, self.polled)
        if deadline is not None:
            if deadline:
                self.spawn(self.deadline_timer, deadline)
            else:
                self.on_signal(self.deadline_signal(deadline))
        if signalled_before and self.grace and self.strategy._escalates:
            self.spawn(self.grace_timer)
        if self.persist is not None:
            self.persist.background(self)

    async def grace_timer(self) -> None:
        assert self.grace is not None
        await _sleep(self.grace)
        self.escalate()

    @staticmethod
    def deadline_signal(seconds: float) -> InterruptSignal:
        return InterruptSignal(reason=f"deadline of {seconds:g} s passed", source="deadline")

    async def deadline_timer(self, seconds: float) -> None:
        await _sleep(seconds)
        if self.background is not None:  # the sleep may end in the turn the run went idle
            self.on_signal(self.deadline_signal(seconds))

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
