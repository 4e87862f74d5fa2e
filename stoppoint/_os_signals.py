"""`interrupt_on_signals()`: OS signals (Ctrl-C, SIGTERM) turned into interrupts while a block runs."""

from __future__ import annotations

import contextlib
import functools
import signal as _os_signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any, Self

from ._signal import Interrupter, InterruptSignal, _current_loop

__all__ = ["OnSignals", "hand_to_loop", "interrupt_on_signals"]


def interrupt_on_signals(
    interrupter: Interrupter,
    signals: int | Iterable[int] = (_os_signal.SIGINT, _os_signal.SIGTERM),
    *,
    chain: bool = False,
) -> OnSignals:
    """Turn OS signals into interrupts while the block runs: Ctrl-C once stops, twice forces.

    The first signal received (of any of `signals`) sends a graceful interrupt, every later one a
    forced interrupt (`force=True`); `source` is the signal's name (`"SIGINT"`). The previous
    handlers are put back when the block exits, even on error.

    Use it in the main thread (only that thread may set signal handlers), inside the event loop:

        async with sp.interrupt_on_signals(interrupter):
            outcome = await flow.run(inputs, interrupts=receiver)

    By default the signals are the block's alone: the handlers installed before do not run while
    it is active. Inside a program that handles the signals itself (a web server's lifespan: the
    server's handler is how it learns to shut down), pass `chain=True`: each signal then also calls
    the handler installed before, right after handing the interrupt to the loop. Only a handler an
    application installed is chained: not `SIG_DFL` (for SIGTERM that would kill the process, and
    the graceful stop with it), `SIG_IGN`, one set outside Python, nor the KeyboardInterrupt
    handlers of Python (`signal.default_int_handler`), asyncio and trio, which would tear through
    the run the block is there to stop gracefully.

    Args:
        interrupter: Where the interrupts go.
        signals: The OS signals to handle (default SIGINT and SIGTERM); one signal or several.
        chain: Also call the handler installed before, for each signal (see above).

    Returns:
        An async context manager; its `received` counts the signals that arrived.

    Raises:
        TypeError: `interrupter` is not an `Interrupter`, or `chain` not a bool.
        ValueError: The interrupter is closed; `signals` is empty, holds something that is not a
            signal, or (on entering) a signal the OS lets nobody handle, such as SIGKILL.
        RuntimeError: Entered outside the main thread, or while already active.
    """
    return OnSignals(interrupter, signals, chain=chain)


class OnSignals:
    """What `interrupt_on_signals()` returns: an async context manager holding the handlers."""

    def __init__(
        self,
        interrupter: Interrupter,
        signals: int | Iterable[int] = (_os_signal.SIGINT, _os_signal.SIGTERM),
        *,
        chain: bool = False,
    ) -> None:
        if not isinstance(interrupter, Interrupter):
            raise TypeError(f"interrupt_on_signals() needs an Interrupter, got {type(interrupter).__name__}")
        if not isinstance(chain, bool):
            raise TypeError(f"interrupt_on_signals(): chain must be a bool, got {chain!r}")
        self._chain = chain
        if interrupter._closed:
            # Its signals would go nowhere, and Ctrl-C would be swallowed silently.
            raise ValueError("interrupt_on_signals(): the interrupter is closed")
        self._interrupter = interrupter
        if isinstance(signals, int):
            signals = (signals,)
        try:
            self._signals = tuple(_os_signal.Signals(s) for s in signals)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"interrupt_on_signals(): signals must be signal numbers such as signal.SIGINT, got {signals!r}"
            ) from exc
        if not self._signals:
            raise ValueError("interrupt_on_signals(): give at least one signal")
        self._previous: dict[_os_signal.Signals, Any] = {}
        self._chained: dict[int, Callable[[int, FrameType | None], object]] = {}
        self._received = 0

    @property
    def received(self) -> int:
        """How many of the signals arrived while the block ran (the latest block, if reused)."""
        return self._received

    async def __aenter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("interrupt_on_signals() must be entered in the main thread")
        loop = _current_loop()
        if loop is None:  # pragma: no cover - an async method always runs in a loop anyio knows
            raise RuntimeError("interrupt_on_signals() must be entered inside an asyncio or trio event loop")
        if self._previous:
            raise RuntimeError("interrupt_on_signals() is already active; it cannot be entered twice")
        self._received = 0  # a block used again starts graceful again
        call_soon = loop.call_soon
        interrupter = self._interrupter

        def handler(signum: int, frame: FrameType | None) -> None:
            self._received += 1
            hand_to_loop(call_soon, interrupter, _os_signal.Signals(signum).name, force=self._received > 1)
            chained = self._chained.get(signum)
            if chained is not None:  # after the hand-over: the interrupt is on its way if this raises
                chained(signum, frame)

        try:
            for sig in self._signals:
                previous = _os_signal.getsignal(sig)
                try:
                    _os_signal.signal(sig, handler)
                except OSError as exc:  # SIGKILL, SIGSTOP: the OS lets nobody handle them
                    raise ValueError(f"interrupt_on_signals(): {sig.name} cannot be handled: {exc}") from exc
                self._previous[sig] = previous  # only what was installed is put back
                chained = _chainable(previous) if self._chain else None
                if chained is not None:
                    self._chained[sig] = chained
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        self._chained = {}
        for sig, handler in previous.items():
            # None means the handler was not installed from Python; the default is the best guess.
            _os_signal.signal(sig, handler if handler is not None else _os_signal.SIG_DFL)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()


def hand_to_loop(
    call_soon: Callable[[Callable[[], object]], object], interrupter: Interrupter, name: str, *, force: bool
) -> None:
    """Send the interrupt of OS signal `name` through `interrupter`, from a signal handler.

    The handler runs in the main thread between two bytecodes of whatever the loop was doing, so it
    only hands over to the loop (`call_soon` of `_current_loop()`: both variants are signal-safe);
    the signal is made and delivered there (the channel is not reentrant). A loop that is closing
    has no run left to stop: nothing happens.
    """

    def deliver() -> None:
        reason = f"{name} received" + (" again: forcing" if force else "")
        interrupter._deliver(InterruptSignal(reason=reason, force=force, source=name))

    with contextlib.suppress(RuntimeError):
        call_soon(deliver)


def _chainable(handler: object) -> Callable[[int, FrameType | None], object] | None:
    """`handler` if `chain=True` may call it: a Python callable an application installed."""
    if not callable(handler) or handler is _os_signal.default_int_handler:
        return None  # SIG_DFL, SIG_IGN (not callable), None (set outside Python), KeyboardInterrupt
    # asyncio.run() and trio.run() put KeyboardInterrupt handlers of their own in Python's place
    # (asyncio's is a functools.partial of a method of its Runner).
    inner: Any = handler
    while isinstance(inner, functools.partial):
        inner = inner.func
    if (getattr(inner, "__module__", None) or "").partition(".")[0] in ("asyncio", "trio"):
        return None
    return handler
