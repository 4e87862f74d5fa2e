"""Where interrupts come from besides a task in the loop: other threads and OS signals.

`Interrupter.interrupt_threadsafe()` hands a signal to the loop's thread; `interrupt_on_signals()`
turns OS signals into interrupts (the first graceful, the later ones forced). Every wait here is on
an event, a queue or a pipe: threads signal when to go with `threading.Event`, the child process
of the SIGINT tests says what it has seen on stdout, and `fail_after` / timeouts only guard
against hangs.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import stoppoint as sp
from stoppoint._signal import _current_loop

from .conftest import Channel

pytestmark = pytest.mark.anyio

BACKENDS = ["asyncio", "trio"]
HANG_GUARD = 10  # seconds; only reached when something hangs
ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "signal_child.py"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def line_after() -> int:
    """The line number after the caller's line (where the stopping point under test is)."""
    frame = inspect.currentframe()
    assert frame is not None
    assert frame.f_back is not None
    return frame.f_back.f_lineno + 1


def looping_flow(started: threading.Event | None = None) -> sp.Flow:
    """One step that sets `started`, then loops over stopping points until it is stopped."""
    flow = sp.Flow("looping")

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        if started is not None:
            started.set()
        while True:
            await ctx.checkpoint()
            await anyio.lowlevel.checkpoint()  # lets the loop run callbacks from other threads

    return flow


def in_plain_thread(target: Callable[[], Any]) -> Any:
    """Run `target` in a fresh `threading.Thread` (no event loop there) and return its result."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            result.append(target())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(HANG_GUARD)
    assert not thread.is_alive(), "worker thread hung"
    if errors:
        raise errors[0]
    return result[0]


async def run_stopped_from_a_thread(interrupter: sp.Interrupter, receiver: Any, reason: str) -> object:
    """Run `looping_flow()`; a plain `threading.Thread` calls `interrupt_threadsafe()` once its step runs."""
    started = threading.Event()
    errors: list[BaseException] = []

    def interrupt_when_started() -> None:
        try:
            if started.wait(HANG_GUARD):
                interrupter.interrupt_threadsafe(reason, source="thread")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=interrupt_when_started)
    thread.start()
    try:
        with anyio.fail_after(HANG_GUARD):
            outcome = await looping_flow(started).run(interrupts=receiver)
    finally:
        started.set()  # let the thread end even if the run failed before its step started
        await anyio.to_thread.run_sync(thread.join)
        if errors:
            raise errors[0]
    return outcome


def assert_stopped_by(outcome: object, reason: str, source: str) -> sp.Interrupted:
    assert isinstance(outcome, sp.Interrupted), outcome
    assert outcome.forced is False
    assert outcome.signal.reason == reason
    assert outcome.signal.source == source
    assert outcome.report.steps["work"].status is sp.StepStatus.INTERRUPTED
    assert [s.reason for s in outcome.report.interrupts] == [reason]
    return outcome


# -- interrupt_threadsafe ---------------------------------------------------------------------------


async def test_current_loop_is_known_in_the_loop_and_none_in_threads() -> None:
    """`_current_loop()` sees the running loop (its thread) and nothing in a loopless thread."""
    loop = _current_loop()
    assert loop is not None
    assert loop.thread == threading.get_ident()
    assert await anyio.to_thread.run_sync(_current_loop) is None
    assert in_plain_thread(_current_loop) is None


def test_current_loop_is_none_outside_any_loop() -> None:
    """A plain (sync) test runs in no loop: a channel made here does not know one."""
    assert _current_loop() is None


async def test_threadsafe_from_a_plain_thread_stops_the_run(channel: Channel) -> None:
    """A `threading.Thread` (not anyio's) stops a run at a stopping point, with its reason and source."""
    interrupter, receiver = channel
    outcome = await run_stopped_from_a_thread(interrupter, receiver, "from thread")
    assert_stopped_by(outcome, "from thread", "thread")


async def test_threadsafe_through_anyio_to_thread_returns_at_once(channel: Channel) -> None:
    """Called via `anyio.to_thread.run_sync` from a step: returns at once; the step's next stopping points stop it."""
    interrupter, receiver = channel
    flow = sp.Flow("to_thread")
    returned: list[object] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        send = functools.partial(interrupter.interrupt_threadsafe, "via to_thread", source="to_thread")
        returned.append(await anyio.to_thread.run_sync(send))
        while True:
            await ctx.checkpoint()
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(HANG_GUARD):
        outcome = await flow.run(interrupts=receiver)
    assert returned == [None]
    assert_stopped_by(outcome, "via to_thread", "to_thread")


async def test_threadsafe_in_the_loop_thread_is_delivered_at_once(channel: Channel) -> None:
    """From the loop's own thread it acts like `interrupt()`: the very next checkpoint stops."""
    interrupter, receiver = channel
    flow = sp.Flow("same_thread")
    seen: list[bool] = []
    line: list[int] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        seen.append(ctx.stop_requested)
        interrupter.interrupt_threadsafe("in loop", source="loop")
        seen.append(ctx.stop_requested)  # no loop turn in between: delivered synchronously
        line.append(line_after())
        await ctx.checkpoint()
        pytest.fail("the checkpoint right after interrupt_threadsafe() did not stop")

    outcome = await flow.run(interrupts=receiver)
    assert seen == [False, True]
    stopped = assert_stopped_by(outcome, "in loop", "loop")
    assert stopped.report.steps["work"].stopped_at == f"test_sources.py:{line[0]}"


async def test_threadsafe_in_the_loop_thread_buffers_at_once() -> None:
    """A channel made in the loop knows it: with no run listening, the signal is in the buffer at once."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        interrupter.interrupt_threadsafe("buffered", source="loop")
        signal_ = receiver.receive_nowait()
    assert (signal_.reason, signal_.source, signal_.force) == ("buffered", "loop", False)


async def test_threadsafe_from_a_thread_reaches_a_buffer_of_a_channel_made_in_the_loop() -> None:
    """No run needed: a channel made inside the loop takes signals from threads into its buffer."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        in_plain_thread(lambda: interrupter.interrupt_threadsafe("from thread", force=True, source="thread"))
        with anyio.fail_after(HANG_GUARD):
            signal_ = await receiver.receive()
    assert (signal_.reason, signal_.source, signal_.force) == ("from thread", "thread", True)


def make_channel_and_interrupt() -> tuple[sp.Interrupter, Any, RuntimeError | None]:
    """In a loopless thread: make a channel and try `interrupt_threadsafe()` right away."""
    assert _current_loop() is None
    interrupter, receiver = sp.interrupt_channel()
    try:
        interrupter.interrupt_threadsafe("too early", source="thread")
    except RuntimeError as exc:
        return interrupter, receiver, exc
    return interrupter, receiver, None


async def test_threadsafe_on_a_loopless_channel_raises_until_a_run_listens() -> None:
    """A channel made outside any loop: RuntimeError while no run listened; once a run listens it works."""
    interrupter, receiver, error = in_plain_thread(make_channel_and_interrupt)
    with interrupter, receiver:
        assert isinstance(error, RuntimeError)
        assert "does not know its event loop" in str(error)
        with pytest.raises(anyio.WouldBlock):
            receiver.receive_nowait()  # the refused signal went nowhere

        outcome = await run_stopped_from_a_thread(interrupter, receiver, "after listen")
        assert_stopped_by(outcome, "after listen", "thread")

        # The run has ended, but the channel still knows the loop: a thread's signal is buffered.
        in_plain_thread(lambda: interrupter.interrupt_threadsafe("later", source="thread"))
        with anyio.fail_after(HANG_GUARD):
            assert (await receiver.receive()).reason == "later"


@pytest.mark.parametrize("backend", BACKENDS)
def test_threadsafe_after_the_loop_closed_does_nothing(backend: str) -> None:
    """The loop that made the channel has closed: `interrupt_threadsafe()` from any thread neither
    raises nor delivers (not even from a new thread that reuses the dead loop thread's ident)."""
    made: list[Channel] = []

    async def make() -> None:
        made.append(sp.interrupt_channel())

    in_plain_thread(lambda: anyio.run(make, backend=backend))
    interrupter, receiver = made[0]
    with interrupter, receiver:
        interrupter.interrupt_threadsafe("too late", source="main")
        interrupter.interrupt_threadsafe("too late", force=True, source="main")
        with pytest.raises(anyio.WouldBlock):
            receiver.receive_nowait()
        for _ in range(5):  # new threads often get the dead loop thread's recycled ident
            in_plain_thread(lambda: interrupter.interrupt_threadsafe("too late", source="thread"))
        with pytest.raises(anyio.WouldBlock):
            receiver.receive_nowait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_threadsafe_from_the_closed_loops_own_thread_does_nothing(backend: str) -> None:
    """The loop that made the channel ran in this thread and has closed: a late signal goes nowhere."""
    made: list[Channel] = []

    async def make() -> None:
        made.append(sp.interrupt_channel())

    anyio.run(make, backend=backend)
    interrupter, receiver = made[0]
    with interrupter, receiver:
        interrupter.interrupt_threadsafe("too late", source="main")
        with pytest.raises(anyio.WouldBlock):
            receiver.receive_nowait()


async def test_threadsafe_on_a_closed_interrupter_does_nothing() -> None:
    """A closed interrupter returns at once, from any thread, without raising, even with no known loop."""
    interrupter, receiver = sp.interrupt_channel()
    clone = interrupter.clone()  # keeps the channel open, so a delivered signal would be buffered
    with receiver, clone:
        interrupter.close()
        interrupter.interrupt_threadsafe("closed", source="loop")

        def from_thread() -> None:
            interrupter.interrupt_threadsafe("closed", source="thread")
            clone.interrupt_threadsafe("marker", source="thread")  # queued after anything the first queued

        in_plain_thread(from_thread)
        with anyio.fail_after(HANG_GUARD):
            assert (await receiver.receive()).reason == "marker"
        with pytest.raises(anyio.WouldBlock):
            receiver.receive_nowait()

    loopless, loopless_receiver, _ = in_plain_thread(make_channel_and_interrupt)
    with loopless_receiver:
        loopless.close()
        loopless.interrupt_threadsafe("closed")  # no RuntimeError: a closed interrupter does nothing


# -- interrupt_on_signals, in process -------------------------------------------------------------------


@pytest.fixture
def user_handlers() -> Iterator[dict[signal.Signals, Callable[[int, FrameType | None], None]]]:
    """Custom SIGUSR1/SIGUSR2 handlers installed for the test, the old ones put back afterwards."""
    sigs = (signal.SIGUSR1, signal.SIGUSR2)
    old = {sig: signal.getsignal(sig) for sig in sigs}
    handlers: dict[signal.Signals, Callable[[int, FrameType | None], None]] = {}
    for sig in sigs:

        def handler(signum: int, frame: FrameType | None) -> None:
            raise AssertionError(f"the user's handler for {signum} ran inside interrupt_on_signals()")

        handlers[sig] = handler
        signal.signal(sig, handler)
    try:
        yield handlers
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def test_on_signals_rejects_bad_arguments(channel: Channel) -> None:
    """TypeError for a non-Interrupter, ValueError for no signals or a number that is no signal."""
    interrupter, receiver = channel
    with pytest.raises(TypeError, match="needs an Interrupter, got _LinkedReceiver"):
        sp.interrupt_on_signals(receiver)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs an Interrupter"):
        sp.interrupt_on_signals(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one signal"):
        sp.interrupt_on_signals(interrupter, signals=())
    with pytest.raises(ValueError, match=r"signals must be signal numbers such as signal\.SIGINT, got \(123456,\)"):
        sp.interrupt_on_signals(interrupter, signals=(123456,))
    with pytest.raises(ValueError, match="signals must be signal numbers"):
        sp.interrupt_on_signals(interrupter, signals=("SIGINT",))  # type: ignore[arg-type]
    assert sp.interrupt_on_signals(interrupter, signals=signal.SIGINT)._signals == (signal.SIGINT,)
    closed = interrupter.clone()
    closed.close()
    with pytest.raises(ValueError, match="the interrupter is closed"):
        sp.interrupt_on_signals(closed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_signals_outside_the_main_thread_raises(backend: str, channel: Channel) -> None:
    """Only the main thread may set handlers: entering in a loop in another thread raises, handlers untouched."""
    interrupter, _ = channel
    before = signal.getsignal(signal.SIGINT)

    async def enter() -> str:
        with pytest.raises(RuntimeError, match="main thread") as info:
            async with sp.interrupt_on_signals(interrupter, signals=(signal.SIGINT,)):
                pytest.fail("entered outside the main thread")
        return str(info.value)

    message = in_plain_thread(lambda: anyio.run(enter, backend=backend))
    assert "interrupt_on_signals() must be entered in the main thread" in message
    assert signal.getsignal(signal.SIGINT) is before


@posix_only
async def test_on_signals_restores_previous_handlers(user_handlers: dict[signal.Signals, Any]) -> None:
    """The handlers in place before the block are back after it, also when the block raises."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        sigs = (signal.SIGUSR1, signal.SIGUSR2)
        async with sp.interrupt_on_signals(interrupter, signals=sigs):
            for sig in sigs:
                assert signal.getsignal(sig) is not user_handlers[sig]
        for sig in sigs:
            assert signal.getsignal(sig) is user_handlers[sig]

        with pytest.raises(LookupError, match="boom"):
            async with sp.interrupt_on_signals(interrupter, signals=sigs):
                raise LookupError("boom")
        for sig in sigs:
            assert signal.getsignal(sig) is user_handlers[sig]

        # SIG_IGN / SIG_DFL are handlers too, and come back as such.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        async with sp.interrupt_on_signals(interrupter, signals=sigs):
            assert signal.getsignal(signal.SIGUSR2) is not signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN


@posix_only
async def test_on_signals_restores_handlers_when_one_cannot_be_installed(
    user_handlers: dict[signal.Signals, Any],
) -> None:
    """SIGKILL cannot be handled: entering raises ValueError naming it, and the handlers installed so far
    are put back."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        on_signals = sp.interrupt_on_signals(interrupter, signals=(signal.SIGUSR1, signal.SIGKILL))
        with pytest.raises(ValueError, match="interrupt_on_signals\\(\\): SIGKILL cannot be handled"):
            await on_signals.__aenter__()
        assert signal.getsignal(signal.SIGUSR1) is user_handlers[signal.SIGUSR1]


@posix_only
async def test_on_signals_cannot_be_entered_twice_at_once(user_handlers: dict[signal.Signals, Any]) -> None:
    """The same OnSignals entered while active raises, and leaves the active handlers alone."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        on_signals = sp.interrupt_on_signals(interrupter, signals=(signal.SIGUSR1,))
        async with on_signals:
            active = signal.getsignal(signal.SIGUSR1)
            with pytest.raises(RuntimeError, match="already active"):
                await on_signals.__aenter__()
            assert signal.getsignal(signal.SIGUSR1) is active
        assert signal.getsignal(signal.SIGUSR1) is user_handlers[signal.SIGUSR1]


@posix_only
async def test_a_reused_on_signals_starts_graceful_again(user_handlers: dict[signal.Signals, Any]) -> None:
    """Entering the same OnSignals a second time: its first signal is graceful again and counted from zero."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        on_signals = sp.interrupt_on_signals(interrupter, signals=(signal.SIGUSR1,))
        async with on_signals:
            signal.raise_signal(signal.SIGUSR1)
            with anyio.fail_after(HANG_GUARD):
                assert (await receiver.receive()).force is False
        async with on_signals:
            signal.raise_signal(signal.SIGUSR1)
            with anyio.fail_after(HANG_GUARD):
                again = await receiver.receive()
            assert (on_signals.received, again.force) == (1, False)


@posix_only
async def test_real_signals_first_graceful_then_forced(user_handlers: dict[signal.Signals, Any]) -> None:
    """A real SIGUSR1: counted at once in `.received`, delivered by the loop; the first graceful, the next forced."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        async with sp.interrupt_on_signals(interrupter, signals=(signal.SIGUSR1,)) as on_signals:
            assert on_signals.received == 0
            # raise_signal() runs the Python handler before it returns (main thread): counted now,
            # handed to the loop, which delivers it when it next runs its callbacks.
            signal.raise_signal(signal.SIGUSR1)
            assert on_signals.received == 1
            with anyio.fail_after(HANG_GUARD):
                first = await receiver.receive()
            signal.raise_signal(signal.SIGUSR1)
            assert on_signals.received == 2
            with anyio.fail_after(HANG_GUARD):
                second = await receiver.receive()
        assert on_signals.received == 2
    assert (first.source, first.force, first.reason) == ("SIGUSR1", False, "SIGUSR1 received")
    assert (second.source, second.force, second.reason) == ("SIGUSR1", True, "SIGUSR1 received again: forcing")


@posix_only
async def test_real_signals_stop_a_run_gracefully_then_force_it(user_handlers: dict[signal.Signals, Any]) -> None:
    """In process: two signals raised by a step with no stopping point: the second cancels it (forced)."""
    interrupter, receiver = sp.interrupt_channel()
    flow = sp.Flow("signalled")

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        signal.raise_signal(signal.SIGUSR2)
        signal.raise_signal(signal.SIGUSR1)  # any of the signals counts: this one is the second
        await anyio.sleep_forever()

    with interrupter, receiver:
        async with sp.interrupt_on_signals(interrupter, signals=(signal.SIGUSR1, signal.SIGUSR2)) as on_signals:
            with anyio.fail_after(HANG_GUARD):
                outcome = await flow.run(interrupts=receiver)
    assert on_signals.received == 2
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced is True
    assert (outcome.signal.source, outcome.signal.force) == ("SIGUSR2", False)
    assert [(s.source, s.force) for s in outcome.report.interrupts] == [("SIGUSR2", False), ("SIGUSR1", True)]
    assert outcome.report.steps["work"].status is sp.StepStatus.CANCELLED


# -- interrupt_on_signals, real SIGINT in a child process -----------------------------------------------


class Child:
    """The child process of `signal_child.py`; its stdout is read line by line with a timeout."""

    def __init__(self, backend: str, mode: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-W", "error", str(CHILD), backend, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout as out:
            for line in out:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # end of output

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr as err:
            self.stderr.extend(err)

    def fail(self, message: str) -> NoReturn:
        self.close()
        pytest.fail(f"{message}; stderr:\n{''.join(self.stderr)}")

    def expect(self, wanted: str) -> str:
        """The next line, which must start with `wanted`; a hang or an early end fails the test."""
        try:
            line = self.lines.get(timeout=HANG_GUARD * 3)
        except queue.Empty:
            self.fail(f"the child hung after saying {self.seen}")
        if line is None:
            self.fail(f"the child ended after saying {self.seen}, expected {wanted!r}")
        self.seen.append(line)
        if not line.startswith(wanted):
            self.fail(f"expected {wanted!r}, the child said {self.seen}")
        return line

    def interrupt(self) -> None:
        os.kill(self.proc.pid, signal.SIGINT)

    def finish(self) -> dict[str, Any]:
        """The JSON outcome line; then the child must exit 0."""
        result: dict[str, Any] = json.loads(self.expect("{"))
        returncode = self.proc.wait(timeout=HANG_GUARD * 3)
        for reader in self.readers:
            reader.join(HANG_GUARD)
        assert returncode == 0, "".join(self.stderr)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=HANG_GUARD)
        for reader in self.readers:
            reader.join(HANG_GUARD)


@pytest.fixture
def child() -> Iterator[Callable[[str, str], Child]]:
    children: list[Child] = []

    def start(backend: str, mode: str) -> Child:
        children.append(Child(backend, mode))
        return children[-1]

    yield start
    for proc in children:
        proc.close()


@posix_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigint_in_a_child_stops_the_run_gracefully(backend: str, child: Callable[[str, str], Child]) -> None:
    """One real SIGINT: the step stops at its stopping point, source "SIGINT"; the old handler is back."""
    proc = child(backend, "graceful")
    proc.expect("READY")
    proc.interrupt()
    proc.expect("SIGNAL SIGINT force=False")
    result = proc.finish()
    assert result == {
        "outcome": "Interrupted",
        "forced": False,
        "source": "SIGINT",
        "force": False,
        "reason": "SIGINT received",
        "steps": {"work": "interrupted"},
        "interrupts": [["SIGINT", False]],
        "received": 1,
        "restored": True,
    }


@posix_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_sigint_in_a_child_forces_the_run(backend: str, child: Callable[[str, str], Child]) -> None:
    """A step with no stopping point ignores the first SIGINT; the second forces: cancelled, 2 interrupts."""
    proc = child(backend, "forced")
    proc.expect("READY")
    proc.interrupt()
    proc.expect("SIGNAL SIGINT force=False")  # the run has the first signal: now the second
    proc.interrupt()
    proc.expect("SIGNAL SIGINT force=True")
    result = proc.finish()
    assert result == {
        "outcome": "Interrupted",
        "forced": True,
        "source": "SIGINT",
        "force": False,
        "reason": "SIGINT received",
        "steps": {"work": "cancelled"},
        "interrupts": [["SIGINT", False], ["SIGINT", True]],
        "received": 2,
        "restored": True,
    }
