"""SIGINT and SIGTERM in the `stoppoint` command, from the start of `main()` to the end of the process.

One handler owns both signals for the whole command, so that what a signal does depends on where the
command is, never on which handler happens to be installed at that moment:

* start-up (parsing, importing the target, opening the store): KeyboardInterrupt, which `main()` turns into
  a one-line message and exit code 130;
* while the run runs: the first signal stops it at its next stopping point, the second forces it (cancels
  the steps in flight);
* after the run has ended: nothing; the run's outcome decides the exit code;
* always: a third signal, or a SIGTERM after any earlier one, quits at once (exit code 130, or the run's
  own once it has ended), naming on stderr the steps that could not be stopped. A step that swallows its
  cancellation cannot hold the process any longer. The store is left as of its last save: SQLite rolls a
  write that was cut off back, and the run resumes from its last completed steps, as after a crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self

from ._display import printable
from ._os_signals import hand_to_loop
from ._outcome import StepStatus
from ._signal import Interrupter, _current_loop

if TYPE_CHECKING:
    from ._handle import FlowRun

__all__ = ["CommandSignals", "StartUpInterrupted"]

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartUpInterrupted(KeyboardInterrupt):
    """A signal before the run started: `main()` says so in one line and exits 130."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class _Phase(Enum):
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"


class CommandSignals:
    """The command's handler of SIGINT and SIGTERM; a context manager that puts the old ones back
    (`main()` called in-process), or `install()` for the rest of the process (the console script)."""

    def __init__(self) -> None:
        self._previous: dict[signal.Signals, Any] = {}
        self._phase = _Phase.STARTING
        self._received = 0
        self._interrupter: Interrupter | None = None
        self._call_soon: Callable[[Callable[[], object]], object] | None = None
        self._handle: FlowRun | None = None
        self._resume: str | None = None
        self._exit_code: int | None = None

    def install(self) -> Self:
        """Handle both signals from now on (a no-op outside the main thread, where Python cannot)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()

    @contextlib.contextmanager
    def running(self, interrupter: Interrupter, *, resume: str) -> Iterator[None]:
        """While the block runs, signals are interrupts for the run; `resume` is the command that goes
        on with it (for the message on quitting). Enter it inside the event loop."""
        loop = _current_loop()
        assert loop is not None, "CommandSignals.running() needs the event loop"
        self._interrupter, self._call_soon, self._resume = interrupter, loop.call_soon, resume
        self._phase = _Phase.RUNNING
        try:
            yield
        finally:
            self._interrupter = self._call_soon = None
            self._phase = _Phase.ENDED  # also when the run raised: nothing goes back to start-up

    def watch(self, handle: FlowRun) -> None:
        """The run, whose steps still running are named on quitting."""
        self._handle = handle

    def ended(self, exit_code: int) -> None:
        """The run has ended with this exit code: later signals cannot change it."""
        self._phase, self._exit_code = _Phase.ENDED, exit_code
        self._interrupter = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of whatever the command was doing.
        self._received += 1
        name = signal.Signals(signum).name
        if self._received >= 3 or (signum == signal.SIGTERM and self._received >= 2):
            self._quit(name)
        if self._phase is _Phase.STARTING:
            raise StartUpInterrupted(name)
        interrupter, call_soon = self._interrupter, self._call_soon
        if self._phase is _Phase.ENDED or interrupter is None or call_soon is None:
            return  # the run is over: its outcome decides the exit code
        hand_to_loop(call_soon, interrupter, name, force=self._received > 1)

    def _quit(self, name: str) -> NoReturn:
        """End the process now, without waiting for the steps still running (nor any finally)."""
        message = f"stoppoint: {name} received again: quitting"
        steps = self._running_steps()
        if steps:
            message += f"; step(s) that could not be stopped: {', '.join(map(printable, steps))}"
        if self._phase is _Phase.RUNNING and self._resume is not None:
            message += (
                "; the store keeps the run as of its last save, held by this process until its lease expires; "
                f"then, to resume: {self._resume}"
            )
        with contextlib.suppress(OSError):
            # os.write: print() may be the very call this handler interrupted (it is not reentrant),
            # and stdout is not flushed, since a full pipe on it may be what the user is escaping.
            if os.isatty(1):
                os.write(1, b"\x1b[?25h")  # the live table hid the cursor
            os.write(2, (message + "\n").encode("utf-8", "backslashreplace"))
        os._exit(self._exit_code if self._exit_code is not None else EXIT_INTERRUPTED)

    def _running_steps(self) -> list[str]:
        if self._handle is None or self._phase is not _Phase.RUNNING:
            return []
        try:
            steps = self._handle.report.steps
        except Exception:  # the run's records caught half-way through an update: name no step
            return []
        return [name for name, step in steps.items() if step.status is StepStatus.RUNNING]
