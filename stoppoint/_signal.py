"""Interrupt signals and the channel that carries them to runs.

A run listens on an anyio `MemoryObjectReceiveStream[InterruptSignal]`. A plain memory stream hands
each item to exactly one receiver, and a receiver parked in `receive()` takes an item before anybody
can poll for it, so a plain stream alone can promise neither "every run on a clone sees it" nor
"the next stopping point sees it". `interrupt_channel()` therefore makes a small broadcast channel:

* every receiver clone is a real anyio memory stream with a private buffer of its own;
* `Interrupter.interrupt()` hands a signal synchronously to every run listening on a clone (so the
  very next stopping point of each sees it) and puts it in the buffer of every other open clone
  (so a run that starts on that clone later stops before its first step).

Plain anyio streams keep working: a run reads them with a watcher task.

Signals may also come from other threads (`Interrupter.interrupt_threadsafe()`) and from the OS
(`interrupt_on_signals()`, in `_os_signals`): both hand the signal to the event loop's thread
without blocking, and it is delivered there like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, NoReturn, Self, SupportsIndex

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictStr

__all__ = ["InterruptSignal", "Interrupter", "interrupt_channel"]

Listener = Callable[["InterruptSignal"], None]


class _Loop(NamedTuple):
    """An event loop as seen from other threads: its thread, and a non-blocking thread-safe
    "call this soon in the loop" (asyncio's `call_soon_threadsafe`, trio's `run_sync_soon`; both
    are also safe to call from a signal handler)."""

    thread: int
    call_soon: Callable[[Callable[[], object]], object]


def _current_loop() -> _Loop | None:
    """The event loop running in this thread, if any (asyncio or trio)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return _Loop(threading.get_ident(), loop.call_soon_threadsafe)
    trio = sys.modules.get("trio")  # never import trio for a user who does not run it
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            return None
        return _Loop(threading.get_ident(), token.run_sync_soon)
    return None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class InterruptSignal(BaseModel):
    """A request to stop a run.

    Attributes:
        reason: Free text shown in reports and logs.
        force: `True` asks not to wait for a stopping point (escalation).
        source: Where the signal came from, e.g. `"SIGINT"`, `"api"`, `"deadline"`, `"test"`.
        sent_at: When the signal was made (timezone-aware; UTC by default).
    """

    model_config = ConfigDict(frozen=True)

    # Strict: `force="no"` must not quietly become True.
    reason: StrictStr = "interrupted"
    force: StrictBool = False
    source: StrictStr | None = None
    sent_at: AwareDatetime = Field(default_factory=_utcnow)


class _Hub:
    """One interrupt channel: its open receiver clones and how many interrupters are open.

    Clones are held weakly: a clone its owner dropped must not be kept alive (nor kept filling
    up with signals nobody will read) by the channel.
    """

    __slots__ = ("loop", "max_buffer_size", "open_interrupters", "receivers")

    def __init__(self, max_buffer_size: int) -> None:
        self.max_buffer_size = max_buffer_size
        self.receivers: weakref.WeakSet[_LinkedReceiver] = weakref.WeakSet()
        self.open_interrupters = 0
        # The loop the channel lives in (for interrupt_threadsafe): the one it was made in, or
        # the one of the last run that listened on it.
        self.loop = _current_loop()

    def new_receiver(self) -> _LinkedReceiver:
        sender, plain = anyio.create_memory_object_stream[InterruptSignal](self.max_buffer_size)
        # anyio's own clone() builds a receiver from `_state` the same way; the subclass only adds
        # the fields below. This is the one private name used (anyio pinned to 4.x in pyproject).
        receiver = _LinkedReceiver(_state=plain._state, _hub=self, _sender=sender)
        plain.close()
        if self.open_interrupters > 0:
            self.receivers.add(receiver)
        else:
            sender.close()  # every interrupter is closed already: this clone only sees the end
        return receiver

    def _offer(self, receiver: _LinkedReceiver, signal: InterruptSignal) -> bool | None:
        """Give `signal` to the runs listening on `receiver`, else to its buffer.

        Returns True if delivered, False if the buffer is full, None if the clone is gone.
        """
        if receiver._listeners:
            # A listener may end its run (and unlisten) while we iterate.
            for listener in tuple(receiver._listeners):
                listener(signal)
            return True
        try:
            receiver._sender.send_nowait(signal)
        except anyio.WouldBlock:
            return False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return None
        return True

    def deliver(self, signal: InterruptSignal) -> bool:
        """Hand `signal` to every run listening on a clone, buffer it for the other clones."""
        delivered = False
        for receiver in tuple(self.receivers):
            if self._offer(receiver, signal):
                delivered = True
        return delivered

    async def deliver_waiting(self, signal: InterruptSignal) -> None:
        """As `deliver`, then wait for room in the clones whose buffer was full.

        Every listening run and every clone with room gets the signal first, so one full clone
        nobody reads cannot hold it back from the others.
        """
        full = [receiver for receiver in tuple(self.receivers) if self._offer(receiver, signal) is False]
        for receiver in full:
            # The clone may be closed while we wait: that just means one reader fewer.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await receiver._sender.send(signal)

    def interrupter_closed(self) -> None:
        if self.open_interrupters <= 0:
            return
        self.open_interrupters -= 1
        if not self.open_interrupters:
            for receiver in tuple(self.receivers):
                receiver._sender.close()  # readers drain the buffer, then see the end of the stream
            self.receivers.clear()


class _CopiesAreClones:
    """Both ends of a channel count their open clones, so a copy must be a counted clone, and
    pickling is refused: a channel lives in one process's event loop."""

    __slots__ = ()
    _kind: ClassVar[str]

    if TYPE_CHECKING:

        def clone(self) -> Any: ...  # defined by both subclasses

    def __copy__(self) -> Any:
        return self.clone()

    def __deepcopy__(self, memo: dict[int, object]) -> Any:
        return self.clone()

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(f"cannot pickle {self._kind}: it belongs to one process's event loop; clone() it instead")


@dataclass(eq=False)
class _LinkedReceiver(_CopiesAreClones, MemoryObjectReceiveStream[InterruptSignal]):
    """A receiver clone of an interrupt channel: an anyio memory stream with its own buffer."""

    _kind: ClassVar[str] = "an interrupt receiver"

    _hub: _Hub = field(kw_only=True)
    _sender: MemoryObjectSendStream[InterruptSignal] = field(kw_only=True)
    # Runs listening on this clone now; the channel calls them instead of buffering.
    _listeners: list[Listener] = field(default_factory=list, kw_only=True)
    _detached: bool = field(default=False, init=False)  # closed: off the channel

    def listen(self, listener: Listener) -> None:
        """Have `listener` called with each signal sent from now on, instead of buffering it.

        Called from inside the event loop (a run or `interruptible()` starting to listen), which
        is how the channel learns the loop that `interrupt_threadsafe()` must reach.
        """
        loop = _current_loop()
        if loop is not None:
            self._hub.loop = loop
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        """Undo `listen(listener)`."""
        self._listeners.remove(listener)

    def clone(self) -> _LinkedReceiver:
        """Another receiver of the same channel; it sees every signal sent from now on."""
        if self._detached:
            raise anyio.ClosedResourceError
        return self._hub.new_receiver()

    def close(self) -> None:
        if not self._detached:
            self._detached = True
            self._sender.close()
            self._hub.receivers.discard(self)
        super().close()

    def __del__(self) -> None:
        # The private sender is ours: close it quietly, and let anyio warn about the receiver
        # itself, which is the object the user forgot to close.
        self._sender.close()  # idempotent
        parent_del = getattr(super(), "__del__", None)
        if parent_del is not None:
            parent_del()


def take_buffered(receiver: MemoryObjectReceiveStream[InterruptSignal], accept: Callable[[object], bool]) -> bool:
    """Hand each item already buffered in `receiver` to `accept`, until it returns False or none is left.

    Returns:
        False if the stream is closed or ended (no more interrupts can come, which is not an
        error), else True.
    """
    while True:
        try:
            item = receiver.receive_nowait()
        except anyio.WouldBlock:
            return True
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return False
        if not accept(item):
            return True


def linked(receiver: MemoryObjectReceiveStream[InterruptSignal]) -> _LinkedReceiver | None:
    """The receiver as a channel clone if `interrupt_channel()` made it, else None (a plain stream)."""
    return receiver if isinstance(receiver, _LinkedReceiver) else None


class Interrupter(_CopiesAreClones):
    """The sending side of an interrupt channel: ask the runs listening on it to stop.

    Made by `interrupt_channel()`. A signal goes at once to every run listening on the channel's
    receiver or any of its clones, so each of them sees it at its next stopping point; every other
    open clone keeps it in its buffer, so a run that starts on that clone later stops before its
    first step.

    Wrapping a plain anyio send stream (`Interrupter(send_stream)`) also works; its signals then
    travel like any item on that stream (one receiver takes each, within a loop turn or two).

    It is cheap to `clone()` (a `copy.copy()` is a clone too); each clone is closed separately, and
    the receivers see the end of the stream when all of them are closed. It cannot be pickled. Also
    a sync and async context manager that closes it.
    """

    __slots__ = ("_closed", "_hub", "_loop", "_sender")
    _kind: ClassVar[str] = "an Interrupter"

    def __init__(self, sender: MemoryObjectSendStream[InterruptSignal]) -> None:
        """Wrap a plain anyio send stream. Prefer `interrupt_channel()`, which broadcasts."""
        self._sender: MemoryObjectSendStream[InterruptSignal] | None = sender
        self._hub: _Hub | None = None
        self._closed = False
        self._loop = _current_loop()  # a plain stream belongs to the loop it was wrapped in

    @classmethod
    def _for_hub(cls, hub: _Hub) -> Interrupter:
        interrupter = cls.__new__(cls)
        interrupter._sender = None
        interrupter._hub = hub
        interrupter._closed = False
        interrupter._loop = None  # the hub knows the loop
        hub.open_interrupters += 1
        return interrupter

    def interrupt(self, reason: str = "interrupted", *, force: bool = False, source: str | None = None) -> bool:
        """Send an interrupt without waiting. Never blocks, and never raises when a buffer is full,
        a receiver is closed or the run has ended.

        Call it from the event loop's thread (any task, or a step itself).

        Args:
            reason: Free text shown in reports.
            force: Ask not to wait for a stopping point.
            source: Where the request came from (e.g. `"api"`).

        Returns:
            True if the signal reached a listening run or a buffer; False when this interrupter is
            closed, every buffer is full, or every receiver is closed.

        Raises:
            pydantic.ValidationError: `reason` or `source` is not a str, or `force` not a bool.
        """
        if self._closed:
            return False
        return self._deliver(InterruptSignal(reason=reason, force=force, source=source))

    def _deliver(self, signal: InterruptSignal) -> bool:
        if self._closed:
            return False
        if self._hub is not None:
            return self._hub.deliver(signal)
        assert self._sender is not None
        try:
            self._sender.send_nowait(signal)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True

    def interrupt_threadsafe(
        self, reason: str = "interrupted", *, force: bool = False, source: str | None = None
    ) -> None:
        """`interrupt()` from any thread: hand the signal to the event loop and return at once.

        The signal is made now (so `sent_at` is the time of this call) and delivered in the loop's
        thread as soon as the loop runs its callbacks; a run then sees it at its next stopping
        point. Called from the loop's own thread, it simply calls `interrupt()`. A loop that has
        closed meanwhile means there is no run left to stop: nothing happens.

        The loop is the one `interrupt_channel()` was called in, or the one of the last run that
        listened on the channel (one channel serves one event loop).

        Args:
            reason: Free text shown in reports.
            force: Ask not to wait for a stopping point.
            source: Where the request came from (e.g. `"thread"`).

        Raises:
            pydantic.ValidationError: `reason` or `source` is not a str, or `force` not a bool.
            RuntimeError: No event loop is known yet: the channel was made outside any loop and
                no run has listened on it.
        """
        if self._closed:
            return
        loop = self._hub.loop if self._hub is not None else self._loop
        if loop is None:
            raise RuntimeError(
                "interrupt_threadsafe(): this interrupter does not know its event loop yet; make the "
                "interrupt_channel() (or wrap the plain stream) inside the loop, or, for an "
                "interrupt_channel(), call it once a run is listening"
            )
        signal = InterruptSignal(reason=reason, force=force, source=source)
        if _current_loop() == loop:
            # Inside that very loop (not merely its thread, which may outlive it): deliver now.
            self._deliver(signal)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: no run left to stop
            loop.call_soon(lambda: self._deliver(signal))

    async def send(self, signal: InterruptSignal) -> None:
        """Send `signal`, waiting for room where a buffer is full and no run is listening.

        Args:
            signal: The signal to send.

        Raises:
            TypeError: `signal` is not an `InterruptSignal`.
            anyio.ClosedResourceError: This interrupter was closed.
        """
        if not isinstance(signal, InterruptSignal):
            raise TypeError(f"send() expects an InterruptSignal, got {type(signal).__name__}")
        if self._closed:
            raise anyio.ClosedResourceError
        if self._hub is not None:
            await self._hub.deliver_waiting(signal)
            return
        assert self._sender is not None
        # Every receiver closed means nobody can be interrupted any more, which is not an error.
        with contextlib.suppress(anyio.BrokenResourceError):
            await self._sender.send(signal)

    def clone(self) -> Interrupter:
        """Another interrupter on the same channel, closed independently.

        Returns:
            The new interrupter.

        Raises:
            anyio.ClosedResourceError: This interrupter was closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._hub is not None:
            return Interrupter._for_hub(self._hub)
        assert self._sender is not None
        clone = Interrupter(self._sender.clone())
        clone._loop = self._loop
        return clone

    def __del__(self) -> None:
        # Like anyio's streams: an interrupter nobody closed is a leak, and its receivers would
        # wait forever for the end of the stream. (A wrapped plain sender warns by itself.)
        if self._hub is not None and not self._closed:
            warnings.warn(f"Unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)
            self.close()

    def __repr__(self) -> str:
        return f"<Interrupter at {id(self):x}{' closed' if self._closed else ''}>"

    def close(self) -> None:
        """Close this interrupter; receivers see the end of the stream once every clone is closed."""
        if self._closed:
            return
        self._closed = True
        if self._hub is not None:
            self._hub.interrupter_closed()
        else:
            assert self._sender is not None
            self._sender.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def interrupt_channel(max_buffer_size: int = 16) -> tuple[Interrupter, MemoryObjectReceiveStream[InterruptSignal]]:
    """Make an interrupt channel: an `Interrupter` and the receiver to pass to `Flow.run(interrupts=)`.

    The receiver is an anyio memory-object receive stream. Clone it (`receiver.clone()`) to share
    the channel between runs: every clone sees every signal sent while it is open. Close what you
    no longer need (both are context managers); anyio warns about unclosed streams.

    Args:
        max_buffer_size: How many signals each clone keeps while no run listens on it.

    Raises:
        ValueError: `max_buffer_size` is not an int >= 1.
    """
    if isinstance(max_buffer_size, bool) or not isinstance(max_buffer_size, int) or max_buffer_size < 1:
        raise ValueError(f"interrupt_channel(): max_buffer_size must be an int >= 1, got {max_buffer_size!r}")
    hub = _Hub(max_buffer_size)
    interrupter = Interrupter._for_hub(hub)
    return interrupter, hub.new_receiver()
