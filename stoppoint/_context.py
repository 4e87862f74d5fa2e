"""StepContext: what a running step can ask of its run — above all, stopping points."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Generator,
    Iterable,
    Iterator,
    Sized,
)
from types import FrameType
from typing import Any, TypeVar, overload

import anyio.lowlevel
import structlog

from ._errors import StopRequested

__all__ = ["StepContext"]

T = TypeVar("T")

YIELD_INTERVAL = 0.001
"""Seconds of a step's time between checkpoints after which a checkpoint yields to the loop."""

# The clock is read at most every _MAX_STRIDE checkpoints. Staying at or below 256 keeps the
# countdown in CPython's small-int cache, so the fast path allocates nothing.
_MAX_STRIDE = 256
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_loop_yield = anyio.lowlevel.checkpoint  # module-level so tests can run code "during" the yield


def _finished() -> Generator[Any, None, None]:
    return
    yield  # pragma: no cover - makes this a generator function


# An exhausted generator: awaiting an object whose __await__ returns it completes at once, with
# no coroutine object built. This is what `await ctx.checkpoint()` costs when nothing is due.
_FINISHED = _finished()
next(_FINISHED, None)


class _Ready:
    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return _FINISHED


_READY = _Ready()


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

    __slots__ = ("_countdown", "_flow", "_last_check", "_last_yield", "_log", "_run_id", "_step", "_stop", "_stride")

    def __init__(self, *, run_id: str, flow: str, step: str) -> None:
        self._run_id = run_id
        self._flow = flow
        self._step = step
        self._stop = False
        # Checkpoints left before the slow path runs again (reads the clock, may yield or stop).
        self._countdown = 1
        self._stride = 1
        now = time.perf_counter()
        self._last_check = now
        self._last_yield = now
        self._log: Any = None

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
    def log(self) -> Any:
        """A structlog logger bound with `run_id`, `flow` and `step` (made on first use)."""
        if self._log is None:
            self._log = structlog.get_logger("stoppoint").bind(run_id=self._run_id, flow=self._flow, step=self._step)
        return self._log

    @property
    def stop_requested(self) -> bool:
        """True exactly when the next stopping point of this step would stop it.

        For CPU loops that prefer to wind down by themselves; it stays False while the strategy
        lets this step finish.
        """
        return self._stop

    def _request_stop(self) -> None:
        """Called by the run (never per checkpoint): make the next stopping point stop."""
        self._stop = True
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
        if self._stop:
            raise StopRequested(_user_location(sys._getframe(1)))
        now = time.perf_counter()
        # Adapt the stride so the clock is read about four times per yield interval.
        elapsed = now - self._last_check
        stride = int(self._stride * (YIELD_INTERVAL / 4) / elapsed) if elapsed > 0 else _MAX_STRIDE
        self._stride = self._countdown = min(_MAX_STRIDE, max(1, stride))
        self._last_check = now
        if now - self._last_yield >= YIELD_INTERVAL:
            self._last_yield = now
            return self._yield()
        return _READY

    async def _yield(self) -> None:
        await _loop_yield()
        # The interrupter may well have run during this very yield: stop now, not a checkpoint later.
        if self._stop:
            raise StopRequested(_user_location(sys._getframe()))

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
        `every`. When a stop ends the iteration, a generator source is closed at once (its
        `finally` blocks run); other sources, such as streams, are left open for their owner.

        Args:
            source: A sync or async iterable.
            every: Put a stopping point before every `every`-th item (an int >= 1).

        Raises:
            ValueError: `every` is not an int >= 1.
            TypeError: `source` is not iterable.
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"step {self._step!r}: iterate(every=) must be an int >= 1, got {every!r}")
        size = len(source) if isinstance(source, Sized) else -1
        if isinstance(source, AsyncIterable):
            return self._iterate_async(source.__aiter__(), every, size)
        if isinstance(source, Iterable):
            return self._iterate_sync(iter(source), every, size)
        raise TypeError(
            f"step {self._step!r}: iterate() needs an iterable or async iterable, got {type(source).__name__}"
        )

    async def _iterate_sync(self, it: Iterator[T], every: int, size: int) -> AsyncIterator[T]:
        index = 0
        try:
            while True:
                if not index % every and index != size:
                    await self.checkpoint()
                try:
                    item = next(it)
                except StopIteration:
                    return
                index += 1
                yield item
        except StopRequested:
            # The step is over: run a generator source's finally blocks now rather than at garbage
            # collection. Other sources (streams, files) belong to the caller and stay open.
            if isinstance(it, Generator):
                it.close()
            raise

    async def _iterate_async(self, it: AsyncIterator[T], every: int, size: int) -> AsyncIterator[T]:
        index = 0
        try:
            while True:
                if not index % every and index != size:
                    await self.checkpoint()
                try:
                    item = await it.__anext__()
                except StopAsyncIteration:
                    return
                index += 1
                yield item
        except StopRequested:
            # As above; an async generator left unclosed is also reported by trio and asyncio.
            if isinstance(it, AsyncGenerator):
                await it.aclose()
            raise

    def __repr__(self) -> str:
        return f"<StepContext flow={self._flow!r} step={self._step!r} run_id={self._run_id!r}>"
