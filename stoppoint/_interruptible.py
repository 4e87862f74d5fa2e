"""Standalone interruptible iteration: `interruptible(source, interrupts, strategy=...)`.

The counterpart of the Rust crate `interruptible`'s `InterruptibleStream`, without a flow: every item
boundary is a stopping point, and the strategy says how many items still come once an interrupt is
seen. Item sequences follow the crate's own tests (see tests/test_interruptible.py).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from time import perf_counter as _perf_counter
from types import TracebackType
from typing import Any, NoReturn, TypeVar, overload

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from ._context import YIELD_INTERVAL
from ._signal import InterruptSignal, Listener, _LinkedReceiver, linked, take_buffered
from ._sources import END_OF_SOURCE, close_generator, open_source
from ._strategy import FinishCurrent, IgnoreInterruptions, PollNextN, Strategy

__all__ = ["Interruptible", "interruptible"]

T = TypeVar("T")

# `_state` values. One attribute, so the per-item test for "anything unusual?" is a single compare.
_NEW = 0  # no item asked for yet: not listening
_RUNNING = 1
_DONE = 2
_FAILING = 3  # a foreign object came from a plain interrupt stream after an item was taken: raise next time

_IGNORE = -1  # `_allowance` of IgnoreInterruptions
_FINISH_CURRENT = FinishCurrent()  # the default strategy; frozen, so one shared instance is safe


def _listener_for(ref: weakref.ReferenceType[Interruptible[Any]]) -> Listener:
    """A channel listener that does not keep the iterator alive.

    A loop left by `break` or an exception drops the iterator without closing it; holding it only
    weakly lets it be freed, and its `__del__` takes the listener off the channel, so the channel
    goes back to buffering signals for whoever reads the receiver next.
    """

    def listener(signal: InterruptSignal) -> None:
        iterator = ref()
        if iterator is not None:
            iterator._on_signal(signal)

    return listener


class Interruptible(AsyncIterator[T]):
    """The async iterator `sp.interruptible()` returns: the source's items, up to the stopping point.

    Also an async context manager that `aclose()`s it on exit.

    Attributes:
        signal: The first interrupt signal seen while iterating, or None.
        interrupted: True only when the iteration ended early because of that signal.
    """

    __slots__ = (
        "__weakref__",
        "_allowance",
        "_channel",
        "_count",
        "_error",
        "_fresh",
        "_interrupted",
        "_is_async",
        "_last_yield",
        "_left",
        "_listener",
        "_polled",
        "_receiver",
        "_signal",
        "_size",
        "_source",
        "_state",
    )

    def __init__(
        self,
        source: Iterator[T] | AsyncIterator[T],
        is_async: bool,
        size: int,
        receiver: MemoryObjectReceiveStream[InterruptSignal] | None,
        allowance: int,
    ) -> None:
        self._source = source
        self._is_async = is_async
        self._size = size  # -1: unknown
        self._count = 0  # items handed out
        self._receiver = receiver
        self._allowance = allowance  # items still yielded after an interrupt seen at a boundary; _IGNORE
        self._left: int | None = None  # items still allowed; None until an interrupt takes effect
        self._fresh = False  # a signal arrived that `_left` does not reflect yet
        self._signal: InterruptSignal | None = None
        self._interrupted = False
        self._state = _NEW
        self._channel: _LinkedReceiver | None = None  # listened on while running
        self._listener: Listener | None = None
        self._polled: MemoryObjectReceiveStream[InterruptSignal] | None = None  # a plain stream, until it speaks
        self._error: TypeError | None = None
        self._last_yield = 0.0

    @property
    def signal(self) -> InterruptSignal | None:
        """The first interrupt signal seen while iterating (recorded even by `IgnoreInterruptions`)."""
        return self._signal

    @property
    def interrupted(self) -> bool:
        """True only when the iteration ended early because of `signal`."""
        return self._interrupted

    def __aiter__(self) -> Interruptible[T]:
        return self

    async def __anext__(self) -> T:
        if self._state != _RUNNING:
            await self._not_running()
        now = _perf_counter()
        if now - self._last_yield >= YIELD_INTERVAL:
            # A sync source (or an async one that never really awaits) would otherwise starve the
            # loop, and with it the task that sends the interrupt.
            self._last_yield = now
            await self._yield()
        if self._polled is not None:
            await self._poll_boundary(self._polled)
        if self._fresh:
            self._fresh = False
            self._left = self._allowance
        left = self._left
        if left is not None:
            if not left:
                await self._stop()
            self._left = left - 1
        try:
            # One step of the source, inline on this per-item path (see _sources).
            item: T = await self._source.__anext__() if self._is_async else next(self._source)  # type: ignore[union-attr, arg-type]
        except END_OF_SOURCE:
            self._finish()
            raise StopAsyncIteration from None
        except BaseException:
            self._finish()  # a generator that raised is finished already; other sources are left alone
            raise
        self._count += 1
        if self._fresh:
            # The signal arrived while this item was being produced: it is yielded all the same, and
            # counts as the first of PollNextN's n, as in the Rust crate (so n=0 still yields it).
            self._fresh = False
            left = self._allowance - 1
            self._left = left if left > 0 else 0
        elif self._polled is not None and self._allowance > 0:
            # Only PollNextN(n > 0) tells "arrived during this item" from "arrived before the next".
            self._poll_in_flight(self._polled)
        return item

    async def _not_running(self) -> None:
        if self._state == _NEW:
            await self._start()
            return
        if self._state == _FAILING:
            error, self._error = self._error, None
            assert error is not None
            await self._cut_short()
            raise error
        raise StopAsyncIteration

    async def _start(self) -> None:
        self._state = _RUNNING
        self._last_yield = _perf_counter()
        receiver = self._receiver
        self._receiver = None
        if receiver is None:
            return
        channel = linked(receiver)
        if channel is None:
            self._polled = receiver  # read at each boundary: no watcher task to leave behind
            return
        try:
            open_ = take_buffered(channel, self._accept)
        except TypeError:
            await self._cut_short()
            raise
        if open_:
            # In the same synchronous stretch as the drain, so no signal falls between the two.
            self._listener = _listener_for(weakref.ref(self))
            channel.listen(self._listener)
            self._channel = channel

    def _accept(self, item: object) -> bool:
        if not isinstance(item, InterruptSignal):
            raise TypeError(
                f"interruptible(): the interrupt stream carried {type(item).__name__} {item!r}; "
                "only InterruptSignal may be sent"
            )
        self._on_signal(item)
        return True

    def _on_signal(self, signal: InterruptSignal) -> None:
        """Record a signal. Called synchronously by the channel, in the interrupting task."""
        if self._signal is None and self._state == _RUNNING:
            self._signal = signal
            self._fresh = self._allowance != _IGNORE

    def _poll_one(self, receiver: MemoryObjectReceiveStream[InterruptSignal]) -> None:
        try:
            item = receiver.receive_nowait()
        except anyio.WouldBlock:
            return
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._polled = None
            return
        self._polled = None  # only the first signal matters
        self._accept(item)

    async def _poll_boundary(self, receiver: MemoryObjectReceiveStream[InterruptSignal]) -> None:
        try:
            self._poll_one(receiver)
        except TypeError:
            await self._cut_short()
            raise

    def _poll_in_flight(self, receiver: MemoryObjectReceiveStream[InterruptSignal]) -> None:
        try:
            self._poll_one(receiver)
        except TypeError as exc:
            # An item was taken already: hand it out, and raise at the next boundary instead.
            self._error = exc
            self._state = _FAILING
            return
        if self._fresh:
            self._fresh = False
            self._left = self._allowance - 1

    async def _yield(self) -> None:
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            await self._cut_short()  # cancelled here: the iteration ends like any other error
            raise

    async def _stop(self) -> NoReturn:
        """The stopping point acts: end the iteration."""
        # A sized source with nothing left would have ended here anyway: nothing was cut short.
        self._interrupted = self._count != self._size
        await self._cut_short()
        raise StopAsyncIteration

    def _finish(self) -> None:
        """Stop listening; later interrupts change nothing."""
        self._state = _DONE
        self._polled = None
        channel, listener = self._channel, self._listener
        if channel is not None and listener is not None:
            self._channel = self._listener = None
            channel.unlisten(listener)

    async def _cut_short(self) -> None:
        """End before the source did: close a generator source so its `finally` blocks run now."""
        if self._state == _DONE:
            return
        self._finish()
        # Cleanup must complete even when we got here by being cancelled. Its error, StopRequested
        # included, goes to whoever iterates: this runs inside the loop, whereas ctx.iterate()'s
        # cleanup runs after the step ended and collects errors instead (_close_iterations).
        await close_generator(self._source, shield=True)

    async def aclose(self) -> None:
        """End the iteration now; a generator source is closed (its `finally` blocks run).

        Later interrupts change nothing; `interrupted` keeps its value. Idempotent.
        """
        self._receiver = None
        await self._cut_short()

    async def __aenter__(self) -> Interruptible[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Abandoned mid-loop without aclose(): at least take the listener off the channel.
        channel = getattr(self, "_channel", None)
        listener = getattr(self, "_listener", None)
        if channel is not None and listener is not None:
            with contextlib.suppress(ValueError):  # never raise from __del__
                channel.unlisten(listener)

    def __repr__(self) -> str:
        status = ("new", "running", "finished", "running")[self._state]
        if self._interrupted:
            status = "interrupted"
        return f"<Interruptible {status}, {self._count} items>"


@overload
def interruptible(
    source: AsyncIterable[T],
    interrupts: MemoryObjectReceiveStream[InterruptSignal] | None,
    *,
    strategy: Strategy = ...,
) -> Interruptible[T]: ...
@overload
def interruptible(
    source: Iterable[T],
    interrupts: MemoryObjectReceiveStream[InterruptSignal] | None,
    *,
    strategy: Strategy = ...,
) -> Interruptible[T]: ...
def interruptible(
    source: AsyncIterable[T] | Iterable[T],
    interrupts: MemoryObjectReceiveStream[InterruptSignal] | None,
    *,
    strategy: Strategy = _FINISH_CURRENT,
) -> Interruptible[T]:
    """Iterate `source`, stopping at an item boundary once an interrupt takes effect.

    Each item boundary is a stopping point. An item already being produced when the interrupt
    arrives is never lost: it is yielded. Then, by strategy:

    * `FinishCurrent` / `AtCheckpoint` (and the bare `Strategy`): the iteration ends.
    * `PollNextN(n)`: `n` more items are yielded after the interrupt is seen; an item in flight at
      that moment counts as the first of them (as in the Rust crate `interruptible`).
    * `IgnoreInterruptions`: every item; the signal is only recorded in `.signal`.

    If the source ends first, `interrupted` stays False. So does it when a sized source (list,
    range, ...) has handed out its last item by the time the iteration stops. An interrupt arriving
    after the source ended changes nothing.

    Nothing happens until the first item is asked for (so the iterator may be made outside the
    event loop): then the signals already buffered in `interrupts` are taken, and, for a receiver
    of `sp.interrupt_channel()`, later ones are delivered as they are sent; a plain anyio stream is
    polled at every boundary. About once per millisecond the iterator yields to the event loop, so
    that the interrupting task runs even while a sync source never awaits.

    When the iteration is cut short (by the interrupt, `aclose()`, or an error at a stopping
    point), a generator source is closed so its `finally` blocks run; other iterators, such as
    streams or `iter(list)`, are left open for their owner. Use it as `async with` (or call
    `aclose()`) when a loop may be left early, e.g. by `break`.

    Args:
        source: A sync or async iterable.
        interrupts: The receiver of `sp.interrupt_channel()`, a plain anyio memory-object receive
            stream of `InterruptSignal`, or None (never interrupted).
        strategy: When the interrupt takes effect (`FinishCurrent()` by default).

    Returns:
        An async iterator of the source's items with `.signal` (the first signal seen while
        iterating, or None) and `.interrupted` (True only when the iteration ended early because
        of it); also an async context manager that closes it.

    Raises:
        TypeError: `source` is not iterable, `strategy` is not a `Strategy` instance, or
            `interrupts` is neither None nor an anyio memory-object receive stream. While
            iterating: the interrupt stream carried something other than an `InterruptSignal`.
    """
    if not isinstance(strategy, Strategy) or type(strategy) is Strategy:
        raise TypeError(
            "interruptible(): strategy must be a Strategy instance such as sp.FinishCurrent(), "
            f"got {strategy!r} ({type(strategy).__name__})"
        )
    if interrupts is not None and not isinstance(interrupts, MemoryObjectReceiveStream):
        raise TypeError(
            "interruptible(): interrupts must be the receiver of sp.interrupt_channel(), an anyio "
            f"MemoryObjectReceiveStream[InterruptSignal], or None; got {type(interrupts).__name__}"
        )
    if isinstance(strategy, IgnoreInterruptions):
        allowance = _IGNORE
    elif isinstance(strategy, PollNextN):
        allowance = strategy.n
    else:
        allowance = 0  # AtCheckpoint, FinishCurrent: there is no step to stop, only the next item
    opened = open_source(source)
    if opened is None:
        raise TypeError(f"interruptible(): source must be an iterable or async iterable, got {type(source).__name__}")
    return Interruptible(*opened, interrupts, allowance)
