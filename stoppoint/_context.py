"""StepContext: what a running step can ask of its run — above all, stopping points."""

from __future__ import annotations

import contextlib
import decimal
import math
import numbers
import os
import sys
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
)
from time import perf_counter as _perf_counter
from time import perf_counter as _progress_clock
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
import anyio.lowlevel
import structlog

from ._checkpoint import saved_json, validate_saved
from ._errors import StopRequested
from ._observers import step_progress
from ._sources import END_OF_SOURCE, close_generator, is_generator, open_source

if TYPE_CHECKING:
    from ._executor import Run

__all__ = ["Shield", "StepContext"]

T = TypeVar("T")
D = TypeVar("D")

_NOTHING: Any = object()  # `_restored` when no earlier attempt saved anything

YIELD_INTERVAL = 0.001
"""Seconds of a step's time between checkpoints after which a checkpoint yields to the loop."""

# The clock is read at most every _MAX_STRIDE checkpoints: a read costs about half a bare await, so
# 32 amortises it to a few percent, while a step whose iterations suddenly turn slow still yields
# within 32 of them. Small ints are cached, so the countdown allocates nothing.
_MAX_STRIDE = 32

PROGRESS_EVENT_INTERVAL = 0.1
"""Seconds between two `StepProgressEvent`s of a step (about 10 a second; the last one is always told)."""
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


async def yield_to_others() -> None:
    """Let the other tasks run: two turns of the loop, so that a task woken during the first
    (the watcher of a plain interrupt stream, woken by a sender that ran in it) also runs before
    this one resumes. With one turn, a signal sent to a busy step over a plain stream waited for
    the step's next yield, a whole yield interval later (benchmarks/latency.py)."""
    await anyio.lowlevel.checkpoint()
    await anyio.lowlevel.checkpoint()


_loop_yield = yield_to_others  # module-level so tests can run code "during" the yield


def _finished() -> Generator[Any, None, None]:
    return
    yield  # pragma: no cover - makes this a generator function


_FINISHED = _finished()
next(_FINISHED, None)


class _Ready:
    """What `await ctx.checkpoint()` awaits when nothing is due: an `Awaitable` whose `__await__`
    is the C-level `__iter__` of an exhausted generator, so awaiting it runs no Python code,
    allocates nothing, and finishes at once, however often and by whomever it is awaited."""

    __slots__ = ()
    __await__ = staticmethod(_FINISHED.__iter__)


_READY: Awaitable[None] = _Ready()
_new = object.__new__


def _user_location(frame: FrameType | None) -> str | None:
    """`"file.py:LINE"` of the innermost frame outside stoppoint's own modules."""
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame = frame.f_back
    if frame is None:
        return None
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


class StepContext:
    """Handed to a step (the parameter annotated `StepContext` or named `ctx`).

    It offers stopping points (`checkpoint()`, `iterate()`, `stop_requested`) and the names of
    the run, the flow and the step. A context made by hand (`StepContext(run_id=..., flow=...,
    step=...)`) never stops, which lets a step function be called directly in unit tests.
    """

    __slots__ = (
        "_countdown",
        "_epoch",
        "_flow",
        "_forced",
        "_last_check",
        "_last_yield",
        "_level",
        "_log",
        "_open",
        "_probe",
        "_progress",
        "_progress_told",
        "_restored",
        "_run_id",
        "_shielded",
        "_shields",
        "_step",
        "_stop",
        "_stride",
    )
    _level: Run | None  # (see `_setup`)
    _progress_told: tuple[float, bool]  # (see `_tell_progress`)
    _restored: Any

    def __init__(self, *, run_id: str, flow: str, step: str, epoch: int = 0) -> None:
        self._setup(run_id, flow, step, _perf_counter())
        self._level = None  # made by hand: in no run, it keeps nothing it saves
        if epoch:
            self._epoch = epoch

    @classmethod
    def _for_step(cls, run_id: str, flow: str, step: str, now: float) -> StepContext:
        """The run's constructor, on the per-step hot path: no keyword parsing, and `now` is
        the step's start (one clock reading per step)."""
        self: StepContext = _new(cls)
        self._setup(run_id, flow, step, now)
        return self

    def _setup(self, run_id: str, flow: str, step: str, now: float) -> None:
        # (`_epoch` is set only for a run whose store keeps leases: one store less per step for the others)
        self._run_id = run_id
        self._flow = flow
        self._step = step
        self._stop = False
        self._forced = False  # the run is cancelling its steps: every stopping point yields, to be cancelled there
        # Checkpoints left before the slow path runs again (reads the clock, may yield or stop).
        self._countdown = 1
        self._stride = 1
        self._last_check = now
        self._last_yield = now
        self._log: Any = None
        self._open: list[_Iteration[Any]] | None = None  # iterate() loops over generators, unfinished
        self._shields = 0  # how many `ctx.shield()` blocks are open
        self._shielded = False  # a shield() block was entered (the run checks for cancellation after the step)
        self._progress: tuple[float, float | None, str | None] | None = None  # floats, checked
        self._probe: Callable[[], None] | None = None  # stoppoint.testing: told of every checkpoint
        # Not set here, to keep the per-step cost down: `_level` (the level of the run the step runs in; None
        # for a context made by hand), set by the executor (or `_attempt`) and `__init__`; `_restored` (what an
        # earlier attempt saved, as JSON), set on first use by `_before_this_attempt()`.

    def _attempt(self, level: Run) -> None:
        """Another attempt of the step begins in `level` (a retry calls this before each attempt): `restored()`
        gives what was saved before it, not what it will save."""
        self._level = level
        with contextlib.suppress(AttributeError):
            del self._restored

    def _before_this_attempt(self) -> Any:
        """What the step had saved when this attempt began (`_NOTHING`: nothing). Read on first use, which is
        before this attempt's first `save()` (that calls this first), so the attempt's own saves are not in it."""
        try:
            return self._restored
        except AttributeError:
            level = self._level
            progress = level.progress if level is not None else None
            self._restored = value = progress.get(self._step, _NOTHING) if progress else _NOTHING
            return value

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self._run_id

    @property
    def flow(self) -> str:
        """The flow's name."""
        return self._flow

    @property
    def step(self) -> str:
        """This step's name."""
        return self._step

    @property
    def epoch(self) -> int:
        """The run's claim number in its store (1 for the first attempt, +1 at every claim after; 0
        without a store that keeps leases). A step that reaches outside (a payment, an email) and may
        run again after a crash (steps run at least once) builds its idempotency key from
        `(run_id, step)`, or from `(run_id, step, epoch)` to tell attempts apart."""
        try:
            return self._epoch
        except AttributeError:  # not set: no leased store
            return 0

    @property
    def log(self) -> Any:
        """A structlog logger bound with `run_id`, `flow` and `step` (made on first use)."""
        if self._log is None:
            self._log = structlog.get_logger("stoppoint").bind(run_id=self._run_id, flow=self._flow, step=self._step)
        return self._log

    @property
    def stop_requested(self) -> bool:
        """True exactly when the next stopping point of this step would stop it.

        For CPU loops that prefer to wind down by themselves; it stays False while the strategy
        lets this step finish, and inside a `shield()` block.
        """
        return self._stop and not self._shields

    def _request_stop(self) -> None:
        """Called by the run (never per checkpoint): make the next stopping point stop."""
        self._stop = True
        self._countdown = 0

    def _force(self) -> None:
        """Called by the run when it escalates: make every stopping point yield, so the
        cancellation of the step's scope is delivered there (unless in a shield)."""
        self._forced = True
        self._countdown = 0

    def checkpoint(self) -> Awaitable[None]:
        """A stopping point: `await ctx.checkpoint()`.

        When the run's strategy says this step must stop, it raises `StopRequested` (a
        `BaseException`: let it propagate; `finally` blocks run). Otherwise it returns at once, and
        about once per millisecond of the step's time it yields to the event loop so that other
        tasks (the interrupter among them) run.

        Raises:
            StopRequested: The step must stop here.
        """
        n = self._countdown - 1
        if n > 0:
            self._countdown = n
            return _READY
        return self._slow_checkpoint()

    def _slow_checkpoint(self) -> Awaitable[None]:
        if self._probe is not None:
            self._probe()  # may interrupt the run, which makes this very checkpoint stop
        if self._stop and not self._shields:
            raise StopRequested(_user_location(sys._getframe(1)))
        if self._forced and not self._shields:
            self._countdown = 0  # each one, until the cancellation lands
            return self._yield()
        now = _perf_counter()
        # Adapt the stride so the clock is read about four times per yield interval: double it
        # while reads come too often (cheap checkpoints), shrink it at once when they come late.
        quarter = YIELD_INTERVAL * 0.25
        elapsed = now - self._last_check
        self._last_check = now
        stride = self._stride
        if elapsed < quarter:
            stride += stride
            if stride > _MAX_STRIDE:
                stride = _MAX_STRIDE
        else:
            stride = int(stride * quarter / elapsed) or 1
        if self._probe is not None:
            stride = 1  # a probe is told of every checkpoint
        self._stride = self._countdown = stride
        if now - self._last_yield >= YIELD_INTERVAL:
            self._last_yield = now
            return self._yield()
        return _READY

    async def _yield(self) -> None:
        await _loop_yield()
        # The interrupter may well have run during this very yield: stop now, not a checkpoint later.
        if self._stop and not self._shields:
            raise StopRequested(_user_location(sys._getframe()))

    def shield(self) -> Shield:
        """A critical section: `async with ctx.shield(): ...`.

        Stopping points inside the block do not stop the step, and a forced stop (a signal with
        `force=True`, or the run's `grace` running out) waits until the block exits: the block runs
        in an anyio `CancelScope(shield=True)`, so outside cancellation, too, waits for it. A stop
        requested meanwhile is delivered at the first stopping point after the block; a forced
        one at the first stopping point or other `await` after it.

        Returns:
            An async context manager (`async with`; each one can be entered once).

        Raises:
            RuntimeError: The same shield object is entered a second time.
        """
        return Shield(self)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report how far the step has got; the run's report shows the last value (`StepReport.progress`).

        Cheap enough to call per item: it stores the values, and, while someone listens to the run's events
        (`on_event=`, `FlowRun.events()`, structlog, or a store that keeps them: an `EventStore`), tells them
        as a `StepProgressEvent`, at most about 10 a second (a value that comes sooner waits, and is told when
        the step ends if no later one came: the last value is always told).

        Args:
            done: Work done so far, in any unit (items, bytes, percent).
            total: The amount of work in the same unit, if known.
            message: A short note for people watching.

        Raises:
            TypeError: `done` or `total` is not a real number, or `message` is not a str.
            ValueError: `done` or `total` is not finite (NaN, infinity, too large for a float).
        """
        if message is not None and not isinstance(message, str):
            raise TypeError(f"step {self._step!r}: progress(message=) must be a str or None, got {message!r}")
        self._progress = (self._finite("done", done), None if total is None else self._finite("total", total), message)
        level = self._level
        if level is not None and level.observers.tell is not None:
            self._tell_progress(level, False)

    def _tell_progress(self, level: Run, ending: bool) -> None:
        """Tell the listeners the step's progress as a `StepProgressEvent`: at most one per
        `PROGRESS_EVENT_INTERVAL` s (`_progress_told`: when the last one was told, and whether a later value
        waits); `ending`: the step is ending, and a value that waits is told now (its last one)."""
        tell = level.observers.tell
        progress = self._progress
        if tell is None or progress is None:
            return
        try:
            last, waiting = self._progress_told
        except AttributeError:  # (not set by _setup: one store less per step for the steps that never report)
            last, waiting = -math.inf, False
        if ending:
            if waiting:
                self._progress_told = (last, False)
                tell(step_progress(level.timeline, self._step, _progress_clock(), progress))
            return
        now = _progress_clock()
        if now - last >= PROGRESS_EVENT_INTERVAL:
            self._progress_told = (now, False)
            tell(step_progress(level.timeline, self._step, now, progress))
        else:
            self._progress_told = (last, True)

    def _finite(self, name: str, value: float) -> float:
        # Checked now, not when a report is built: a bad value must fail in the step that gave it.
        if isinstance(value, bool) or not isinstance(value, numbers.Real | decimal.Decimal):
            raise TypeError(f"step {self._step!r}: progress({name}=) must be a real number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"step {self._step!r}: progress({name}=) must be finite, got {value!r}")
        return number

    async def save(self, state: Any) -> None:
        """Save the step's progress, durably: a resume, a recovery or a retry of this step in this run
        reads the last state saved with `restored()` and goes on from there.

        `state` is turned into JSON at once (a copy: changing it afterwards changes nothing saved). With a
        store, it is committed, under the run's lease, before this returns: each call is one write (see
        the "Long steps that resume" guide for what that costs; save every few hundred items, not every
        item, if items are cheap). Without a store, it travels in the checkpoint of an `Interrupted` or
        `StepFailed` outcome (`checkpoint.progress[step]`). Each save replaces the step's last one, and
        the step's saved state is dropped when it completes. A context made by hand keeps nothing.

        Raises:
            CheckpointError: `state` cannot be serialised to JSON, or not into JSON that reads back
                (the message names the step); nothing is saved.
            LeaseLost: The run lost its claim in the store (another process may be running it): nothing
                was written, and the run is ending. Likewise the `StoreError` of a store that failed.
        """
        self._before_this_attempt()  # (what restored() gives, read before this save replaces it)
        level = self._level
        saved = saved_json(self._flow, self._run_id, self._step, len(level.path) if level is not None else 0, state)
        if level is None:
            return
        level.progress[self._step] = saved
        if level.persist:
            await level.save_progress(self._step)
            control = level.control
            if control.store_down and control.store_error is not None:
                raise control.store_error

    @overload
    def restored(self, type_: type[T]) -> T | None: ...
    @overload
    def restored(self, type_: type[T], default: D) -> T | D: ...
    def restored(self, type_: Any, default: Any = None) -> Any:
        """The state an earlier attempt of this step in this run last saved (`save()`), validated into
        `type_` with pydantic, else `default`.

        An earlier attempt is one that ended before this one began: the attempt a resume (from a
        checkpoint or a store) or a recovery (another process claiming the run) goes on from, or the
        attempt a retry follows. What this attempt saves is not "restored": the value is the same
        throughout the attempt, whatever it saves meanwhile.

        Args:
            type_: What to validate the saved JSON into (`list[str]`, a model, `int`, ...).
            default: What to return when no earlier attempt saved anything.

        Raises:
            CheckpointError: The saved state does not validate as `type_` (the step saves another shape
                than it reads back?), naming the step.
        """
        value = self._before_this_attempt()
        if value is _NOTHING:
            return default
        return validate_saved(self._flow, self._run_id, self._step, type_, value)

    @overload
    def iterate(self, source: AsyncIterable[T], every: int = 1) -> AsyncIterator[T]: ...
    @overload
    def iterate(self, source: Iterable[T], every: int = 1) -> AsyncIterator[T]: ...
    def iterate(self, source: AsyncIterable[T] | Iterable[T], every: int = 1) -> AsyncIterator[T]:
        """Iterate `source` with a stopping point before every `every`-th item.

        The stopping points come before *taking* items 0, `every`, `2*every`, ... from the source,
        so a stop never drops an item already taken (a queue-backed source loses nothing). A sized
        source (list, tuple, range, ...) has no stopping point after its last item; for other
        sources there is one before their end is discovered when the count is a multiple of
        `every`. When the step ends (stopped, failed or cancelled) while such a loop over a
        generator is unfinished, the generator is closed at once, so its `finally` blocks run;
        other sources, such as streams, are left open for their owner.

        Args:
            source: A sync or async iterable.
            every: Put a stopping point before every `every`-th item (an int >= 1).

        Raises:
            ValueError: `every` is not an int >= 1.
            TypeError: `source` is not iterable.
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"step {self._step!r}: iterate(every=) must be an int >= 1, got {every!r}")
        opened = open_source(source)
        if opened is None:
            raise TypeError(
                f"step {self._step!r}: iterate() needs an iterable or async iterable, got {type(source).__name__}"
            )
        iteration = _Iteration(self, *opened, every)
        if is_generator(iteration._source):
            if self._open is None:
                self._open = []
            self._open.append(iteration)
        return iteration

    async def _close_iterations(self) -> None:
        """Close the generator sources of unfinished `iterate()` loops (the executor calls this).

        Innermost loop first, as nested `aclosing()` blocks would; every source is closed even if
        another's cleanup raises, and the first such error is raised at the end.
        """
        open_iterations, self._open = self._open or [], None
        error: Exception | None = None
        for iteration in reversed(open_iterations):
            # Not shielded here: the executor shields this whole call, with a time limit. Unlike
            # interruptible(), which has one source and lets its error through, several sources
            # are closed after the step ended, so errors are collected.
            try:
                await close_generator(iteration._source)
            except StopRequested:
                pass  # a checkpoint in the generator's finally: the step is stopping already
            except Exception as exc:
                if error is None:
                    error = exc
        if error is not None:
            raise error

    def __repr__(self) -> str:
        return f"<StepContext flow={self._flow!r} step={self._step!r} run_id={self._run_id!r}>"


class Shield:
    """What `StepContext.shield()` returns: an async context manager over a shielded cancel scope."""

    __slots__ = ("_ctx", "_scope")

    def __init__(self, ctx: StepContext) -> None:
        self._ctx = ctx
        self._scope: anyio.CancelScope | None = None

    async def __aenter__(self) -> None:
        if self._scope is not None:
            raise RuntimeError(f"step {self._ctx._step!r}: a shield() block cannot be entered twice")
        self._scope = anyio.CancelScope(shield=True)
        self._scope.__enter__()
        self._ctx._shields += 1
        self._ctx._shielded = True

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        ctx = self._ctx
        ctx._shields -= 1
        if (ctx._stop or ctx._forced) and not ctx._shields:
            ctx._countdown = 0  # a stop requested during the block: the next stopping point delivers it
        assert self._scope is not None
        return self._scope.__exit__(exc_type, exc, tb)


class _Iteration(AsyncIterator[T]):
    """The async iterator `StepContext.iterate()` returns.

    A class rather than an async generator: an async generator abandoned mid-loop (the loop body
    stopped) would be finalised by the garbage collector, which trio reports as a warning.
    """

    __slots__ = ("_ctx", "_every", "_index", "_is_async", "_size", "_source")

    def __init__(self, ctx: StepContext, source: Iterator[T] | AsyncIterator[T], is_async: bool, size: int, every: int):
        self._ctx = ctx
        self._source = source
        self._is_async = is_async
        self._size = size  # -1: unknown
        self._every = every
        self._index = 0

    def __aiter__(self) -> _Iteration[T]:
        return self

    async def __anext__(self) -> T:
        index = self._index
        if not index % self._every and index != self._size:
            await self._ctx.checkpoint()
        try:
            # One step of the source, inline on this per-item path (see _sources).
            item: T = await self._source.__anext__() if self._is_async else next(self._source)  # type: ignore[union-attr, arg-type]
        except END_OF_SOURCE:
            self._finished()
            raise StopAsyncIteration from None
        self._index = index + 1
        return item

    def _finished(self) -> None:
        open_iterations = self._ctx._open
        if open_iterations is not None and self in open_iterations:
            open_iterations.remove(self)
