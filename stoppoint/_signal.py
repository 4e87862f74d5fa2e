"""Interrupt signals and the channel that carries them to runs.

A run listens on an anyio `MemoryObjectReceiveStream[InterruptSignal]`. Memory streams hand each
item to exactly one receiver, and a receiver parked in `receive()` takes an item before anybody can
poll for it, so a plain stream alone cannot promise "the next stopping point sees it". The receiver
made by `interrupt_channel()` therefore carries a small hub: the `Interrupter` hands a signal
straight to every run currently listening on that receiver or one of its clones (synchronously, so
the very next stopping point sees it), and only puts it in the stream when nobody listens yet.
Plain anyio streams keep working: a run reads them with a watcher task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

__all__ = ["InterruptSignal", "Interrupter", "interrupt_channel"]

Listener = Callable[["InterruptSignal"], None]


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

    reason: str = "interrupted"
    force: bool = False
    source: str | None = None
    sent_at: AwareDatetime = Field(default_factory=_utcnow)


class _Hub:
    """The runs listening on one `interrupt_channel()`, to hand them signals synchronously."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def broadcast(self, signal: InterruptSignal) -> bool:
        """Give `signal` to every listener; False when there is none."""
        if not self._listeners:
            return False
        # A listener may unlisten while we iterate (its run just ended).
        for listener in tuple(self._listeners):
            listener(signal)
        return True


# anyio's clone() builds a plain MemoryObjectReceiveStream from the shared `_state`; overriding it
# is the only way to keep the hub on clones. `_state` is the dataclass field anyio's own clone()
# passes, stable across anyio 4.x (the pinned range); tests/test_signal.py checks the behaviour.
@dataclass(eq=False)
class _LinkedReceiver(MemoryObjectReceiveStream[InterruptSignal]):
    _hub: _Hub = field(default_factory=_Hub)

    def clone(self) -> _LinkedReceiver:
        if self._closed:
            raise anyio.ClosedResourceError
        return _LinkedReceiver(_state=self._state, _hub=self._hub)


def hub_of(receiver: MemoryObjectReceiveStream[InterruptSignal]) -> _Hub | None:
    """The hub of a receiver made by `interrupt_channel()`, else None (a plain anyio stream)."""
    return receiver._hub if isinstance(receiver, _LinkedReceiver) else None


class Interrupter:
    """The sending side of an interrupt channel: ask every run listening on it to stop.

    Made by `interrupt_channel()`. It is cheap to `clone()`; each clone is closed separately, and
    the receiving side sees the end of the stream when all of them are closed. Also a sync and
    async context manager that closes it.

    A signal goes at once to every run currently listening on the channel's receiver or any of
    its clones, so each of those runs sees it at its next stopping point; when no run is listening
    it waits in the stream's buffer for the next run (which then stops before its first step).
    """

    __slots__ = ("_closed", "_hub", "_sender")

    def __init__(self, sender: MemoryObjectSendStream[InterruptSignal], hub: _Hub | None = None) -> None:
        """Wrap `sender`. Use `interrupt_channel()` rather than calling this directly."""
        self._sender = sender
        self._hub = hub if hub is not None else _Hub()
        self._closed = False

    def interrupt(self, reason: str = "interrupted", *, force: bool = False, source: str | None = None) -> bool:
        """Send an interrupt without waiting. Never blocks and never raises.

        Call it from the event loop's thread (any task, or a step itself); a thread-safe variant
        for other threads is planned (API.md: `interrupt_threadsafe`).

        Args:
            reason: Free text shown in reports.
            force: Ask not to wait for a stopping point.
            source: Where the request came from (e.g. `"api"`).

        Returns:
            True if the signal reached a listening run or the stream's buffer; False when this
            interrupter is closed, the buffer is full, or every receiver is closed.
        """
        if self._closed:
            return False
        signal = InterruptSignal(reason=reason, force=force, source=source)
        if self._hub.broadcast(signal):
            return True
        try:
            self._sender.send_nowait(signal)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True

    async def send(self, signal: InterruptSignal) -> None:
        """Send `signal`, waiting for buffer space when no run is listening and the buffer is full.

        Raises:
            TypeError: `signal` is not an `InterruptSignal`.
            anyio.ClosedResourceError: This interrupter was closed.
        """
        if not isinstance(signal, InterruptSignal):
            raise TypeError(f"send() expects an InterruptSignal, got {type(signal).__name__}")
        if self._closed:
            raise anyio.ClosedResourceError
        if self._hub.broadcast(signal):
            return
        # Every receiver closed means nobody can be interrupted any more, which is not an error.
        with contextlib.suppress(anyio.BrokenResourceError):
            await self._sender.send(signal)

    def clone(self) -> Interrupter:
        """Another interrupter on the same channel, closed independently."""
        if self._closed:
            raise anyio.ClosedResourceError
        return Interrupter(self._sender.clone(), self._hub)

    def close(self) -> None:
        """Close this interrupter; receivers see the end of the stream once every clone is closed."""
        if not self._closed:
            self._closed = True
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

    The receiver is an ordinary anyio memory-object receive stream (clone it to share it between
    runs; each run listening on a clone sees every signal).

    Args:
        max_buffer_size: How many signals wait in the stream while no run is listening.

    Raises:
        ValueError: `max_buffer_size` is not an int >= 1.
    """
    if isinstance(max_buffer_size, bool) or not isinstance(max_buffer_size, int) or max_buffer_size < 1:
        raise ValueError(f"interrupt_channel(): max_buffer_size must be an int >= 1, got {max_buffer_size!r}")
    sender, plain = anyio.create_memory_object_stream[InterruptSignal](max_buffer_size)
    hub = _Hub()
    receiver = _LinkedReceiver(_state=plain._state, _hub=hub)
    plain.close()  # the linked receiver took its place on the shared state
    return Interrupter(sender, hub), receiver
