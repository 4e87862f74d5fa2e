"""The `stoppoint` command's ending, and `interrupt_on_signals(chain=True)` (issue 13, items 5 and 6).

Every test drives real processes with real signals. The order of things comes from the processes' own
output (a line read on stdout says where they are) or from lines the test writes to their stdin; timeouts
only guard against hangs, and every child is killed in a `finally`.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import select
import shlex
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import pytest

import stoppoint as sp
from stoppoint._display import Display

from .test_cli_edges import FAILING_ONCE

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

ROOT = Path(__file__).resolve().parent.parent
SERVER_CHILD = Path(__file__).resolve().parent / "server_child.py"
HANG_GUARD = 60  # seconds; only reached when something hangs
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def stoppoint(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stoppoint", *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
        cwd=cwd,
        env=ENV,
    )


class Proc:
    """A child whose stdout lines are read by a thread into a queue, so every wait has a timeout."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str] = ENV) -> None:
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._stdout, daemon=True), threading.Thread(target=self._stderr)]
        for reader in self.readers:
            reader.start()

    def _stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _stderr(self) -> None:
        assert self.proc.stderr is not None
        self.err.extend(self.proc.stderr)

    def expect(self, pattern: str) -> str:
        """Read lines until one matches `pattern`."""
        deadline = time.monotonic() + HANG_GUARD
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} in time; seen {self.seen}; stderr {self.err}")
            if line is None:
                pytest.fail(f"the output ended without {pattern!r}; seen {self.seen}; stderr {self.err}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def finish(self) -> tuple[int, str, str]:
        """Wait for the exit (closing stdin first); the exit code, all of stdout and stderr."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=HANG_GUARD)
        for reader in self.readers:
            reader.join(HANG_GUARD)
        while (line := self.lines.get(timeout=HANG_GUARD)) is not None:
            self.seen.append(line)
        return code, "\n".join(self.seen), "".join(self.err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=HANG_GUARD)
        for reader in self.readers:
            reader.join(HANG_GUARD)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Proc]]:
    """Start children with `spawn(args, cwd=...)`; each is killed after the test if still running."""
    started: list[Proc] = []

    def start(args: list[str], **kwargs: Any) -> Proc:
        started.append(Proc(args, **kwargs))
        return started[-1]

    yield start
    for child in started:
        child.close()


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "stoppoint", *args]


# -- 5.1: a signal after the run has ended does not change the exit code ---------------------------------

# One step whose name is half a megabyte: the summary that lists it cannot fit in a pipe, so the command is
# still printing it (blocked, since the test stops reading) when the signal lands.
LONG_SUMMARY = """
    import stoppoint as sp

    fl = sp.Flow("long")

    @fl.step(name="s" * 500_000)
    async def step() -> int:
        return 1
"""


def test_ctrl_c_while_the_summary_prints_after_the_run_completed_exits_0(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", LONG_SUMMARY)
    proc = subprocess.Popen(
        command("run", "flows.py:fl", "--run-id", "r1"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        seen = b""
        deadline = time.monotonic() + HANG_GUARD
        # Raw reads, 4 KiB at a time: once "summary:" is here the command is inside the summary's print,
        # and more than a pipe's worth of it is still to come, so it cannot have exited.
        while b"\nsummary:\n" not in seen[-8192:]:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no summary in time: {seen[-300:]!r}"
            chunk = os.read(fd, 4096)
            assert chunk, f"the output ended without a summary: {seen[-300:]!r}"
            seen += chunk
        assert b"flow.completed" in seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 0, err.decode()  # was 130, or death by SIGINT
    assert out.endswith(b"s" * 1000 + b"\n")  # the whole summary was printed
    shown = json.loads(stoppoint("show", "r1", "--json", cwd=tmp_path).stdout)
    assert shown["status"] == "completed"


# -- 5.2: a signal during start-up ------------------------------------------------------------------------

# A file whose import waits for a line on stdin, after saying so.
SLOW_IMPORT = """
    import sys
    import stoppoint as sp

    print("LOADING", flush=True)
    sys.stdin.readline()

    fl = sp.Flow("fl")

    @fl.step
    async def a() -> int:
        return 1
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_signal_while_the_target_is_imported_is_one_line_and_exit_130(
    tmp_path: Path, spawn: Callable[..., Proc], sig: signal.Signals
) -> None:
    write(tmp_path, "flows.py", SLOW_IMPORT)
    child = spawn(command("run", "flows.py:fl"), cwd=tmp_path)
    child.expect("^LOADING$")
    child.send(sig)
    code, out, err = child.finish()
    assert code == 130, (out, err)
    assert err == f"stoppoint: interrupted ({sig.name}) before the run started\n"  # one line, no traceback
    assert not (tmp_path / ".stoppoint").exists()  # nothing was stored


# -- 5.3: a step that swallows its cancellation cannot hold the command ----------------------------------

STUBBORN = """
    from pathlib import Path
    import anyio
    import stoppoint as sp

    fl = sp.Flow("stubborn")

    @fl.step
    async def first() -> int:
        return 1

    @fl.step
    async def stubborn(first: int) -> int:
        if Path(__file__).with_name("ok").exists():
            return first + 1
        print("STUBBORN", flush=True)
        swallowed = False
        while True:  # no stopping point, and a cancellation is caught and dropped: nothing stops it
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                if not swallowed:
                    print("SWALLOWED", flush=True)
                    swallowed = True
"""

# What the command says after each signal but the last, as it takes effect.
AFTER = ["stopping at the next stopping point", "^SWALLOWED$"]


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGINT, signal.SIGINT, signal.SIGINT],  # stop, force, quit
        [signal.SIGTERM, signal.SIGTERM],  # a second SIGTERM quits
        [signal.SIGINT, signal.SIGTERM],  # so does a SIGTERM after any earlier signal
    ],
    ids=["int-int-int", "term-term", "int-term"],
)
def test_the_last_signal_quits_past_a_step_that_swallows_cancellation(
    tmp_path: Path, spawn: Callable[..., Proc], signals: list[signal.Signals]
) -> None:
    write(tmp_path, "flows.py", STUBBORN)
    child = spawn(command("run", "flows.py:fl", "--run-id", "r1", "--lease", "1"), cwd=tmp_path)
    child.expect("^STUBBORN$")
    for i, sig in enumerate(signals):
        child.send(sig)
        if i < len(signals) - 1:
            child.expect(AFTER[i])  # the signal took effect: now the next one
    code, out, err = child.finish()
    assert code == 130, (out, err)
    assert f"stoppoint: {signals[-1].name} received again: quitting" in err, err
    assert "step(s) that could not be stopped: stubborn;" in err, err
    assert "to resume: stoppoint resume r1" in err, err
    assert "Traceback" not in err, err

    store = tmp_path / ".stoppoint" / "runs.db"
    db = sqlite3.connect(store)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()
    # It quit holding the run: the run stays running, owned, until its lease (1 s) expires.
    deadline = time.monotonic() + 10
    while not re.search(r"^r1\s+stubborn\s+orphaned\s", stoppoint("runs", cwd=tmp_path).stdout, re.MULTILINE):
        assert time.monotonic() < deadline, stoppoint("runs", cwd=tmp_path).stdout
        time.sleep(0.1)
    (tmp_path / "ok").touch()
    resumed = stoppoint("resume", "r1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: first completed before, not run again" in resumed.stdout


# -- 5.4: one run id, several commands at once ---------------------------------------------------------

# The import waits for a line on stdin (the test's barrier), then the flow's one step logs who ran it.
RACED = """
    import os
    import sys
    from pathlib import Path
    import stoppoint as sp

    print("LOADED", flush=True)
    sys.stdin.readline()

    fl = sp.Flow("raced")

    @fl.step
    async def work() -> int:
        with open(Path(__file__).with_name("ran.log"), "a") as log:
            log.write(f"{os.getpid()}\\n")
        return 1
"""


def test_one_run_id_run_by_four_commands_at_once_runs_once(tmp_path: Path, spawn: Callable[..., Proc]) -> None:
    write(tmp_path, "flows.py", RACED)
    store = tmp_path / "runs.db"

    async def make_store() -> None:  # made beforehand: the race under test is the run id's, not the file's
        async with sp.SQLiteStore(store):
            pass

    anyio.run(make_store)
    children = [
        spawn(command("run", "flows.py:fl", "--run-id", "same", "--store", str(store)), cwd=tmp_path) for _ in range(4)
    ]
    for child in children:
        child.expect("^LOADED$")
    for child in children:  # all four are past start-up: let them go at once
        assert child.proc.stdin is not None
        child.proc.stdin.write("go\n")
        child.proc.stdin.flush()
    ended = [child.finish() for child in children]

    assert sorted(code for code, _, _ in ended) == [0, 2, 2, 2], ended
    assert len((tmp_path / "ran.log").read_text().splitlines()) == 1  # exactly one command ran the step
    for code, _, err in ended:
        if code == 2:
            # Found stored by the look-up, stored meanwhile and ended, or held by the winner's live lease.
            assert (
                "stoppoint: error: run 'same' is already in the store" in err
                or "stoppoint: error: RunOwned: flow 'raced', run 'same' is owned by" in err
            ), err
            assert "Traceback" not in err, err
    listed = stoppoint("runs", "--store", str(store), cwd=tmp_path).stdout
    assert re.search(r"^same\s+raced\s+completed\s", listed, re.MULTILINE), listed


# -- 5.5: the printed resume command works from any directory --------------------------------------------


def test_the_printed_resume_command_works_from_another_directory(tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "my project", tmp_path / "elsewhere"
    (project / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    write(project, "flows.py", FAILING_ONCE)
    done = stoppoint("run", "flows.py:fl", "--run-id", "r1", "--store", "sub/x.db", cwd=project)
    assert done.returncode == 1, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("to resume: "))
    words = shlex.split(line.removeprefix("to resume: "))
    assert words == ["stoppoint", "resume", "r1", "--store", str((project / "sub" / "x.db").resolve())], line
    (project / "ok").touch()
    resumed = stoppoint(*words[1:], cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: a completed before, not run again" in resumed.stdout


# -- 5.6: control characters in a run id -----------------------------------------------------------------

ODD_ID = "odd\nid\twith [/b] in it"


def test_a_run_id_with_control_characters_keeps_runs_and_show_in_line(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    done = stoppoint("run", "flows.py:fl", "--run-id", ODD_ID, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[0] == f"run {ODD_ID!r} of flow fl"
    assert stoppoint("run", "flows.py:fl", "--run-id", "plain", cwd=tmp_path).returncode == 1

    listed = stoppoint("runs", cwd=tmp_path).stdout.splitlines()
    assert len(listed) == 3, listed  # the header and one line per run
    header, rows = listed[0], listed[1:]
    assert {row.split("  ")[0].rstrip() for row in rows} == {repr(ODD_ID), "plain"}, listed
    for row in rows:
        assert row.index(" fl ") + 1 == header.index("FLOW"), listed  # the columns line up

    shown = stoppoint("show", ODD_ID, cwd=tmp_path).stdout.splitlines()
    assert shown[0] == f"run {ODD_ID!r} of flow fl: failed", shown
    assert json.loads(stoppoint("show", ODD_ID, "--json", cwd=tmp_path).stdout)["run_id"] == ODD_ID


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal (the display then draws its live table)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.anyio
async def test_the_live_table_shows_a_run_id_with_markup_and_a_newline_on_one_line(anyio_backend: str) -> None:
    flow = sp.Flow("shown")

    @flow.step
    async def work() -> int:
        return 1

    out = _Terminal()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, run_id=ODD_ID)
        async with Display(handle, out) as display:
            tg.start_soon(display.follow)
            await handle.outcome()  # "[/b]" was read as rich markup: MarkupError
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    assert f"shown - run {ODD_ID!r}" in text, text


# -- 6: interrupt_on_signals(chain=True) ------------------------------------------------------------------


def server(backend: str, chain: str, spawn: Callable[..., Proc]) -> Proc:
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return spawn([sys.executable, "-W", "error", str(SERVER_CHILD), backend, chain], cwd=ROOT, env=env)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_chain_lets_a_servers_own_handler_see_the_signal(
    backend: str, sig: signal.Signals, spawn: Callable[..., Proc]
) -> None:
    child = server(backend, "chain", spawn)
    child.expect("^READY$")
    child.send(sig)
    code, out, err = child.finish()
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result == {
        "outcome": "Interrupted",  # the stoppoint interrupt happened: graceful, from the signal
        "source": sig.name,
        "force": False,
        "restored": True,
        "server_handled": [sig.value],  # and the server's own handler ran: the server exited
        "server_exited_by_its_handler": True,
    }


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_without_chain_the_block_keeps_the_signal_to_itself(backend: str, spawn: Callable[..., Proc]) -> None:
    child = server(backend, "nochain", spawn)
    child.expect("^READY$")
    child.send(signal.SIGTERM)
    code, out, err = child.finish()
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["outcome"] == "Interrupted"
    assert (result["server_handled"], result["server_exited_by_its_handler"]) == ([], False)


@pytest.fixture
def usr1() -> Iterator[list[tuple[int, FrameType | None]]]:
    """A Python handler of SIGUSR1 that records its calls (the old handler is put back after the test)."""
    calls: list[tuple[int, FrameType | None]] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append((signum, frame)))
    try:
        yield calls
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.anyio
async def test_chain_calls_the_previous_python_handler_after_each_interrupt(
    anyio_backend: str, usr1: list[tuple[int, FrameType | None]]
) -> None:
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        async with sp.interrupt_on_signals(interrupter, signals=signal.SIGUSR1, chain=True):
            signal.raise_signal(signal.SIGUSR1)
            assert [signum for signum, _ in usr1] == [signal.SIGUSR1]
            with anyio.fail_after(HANG_GUARD):
                first = await receiver.receive()
            signal.raise_signal(signal.SIGUSR1)
            with anyio.fail_after(HANG_GUARD):
                second = await receiver.receive()
        assert len(usr1) == 2
        assert usr1[0][1] is not None  # called as a signal handler is: with the frame
    assert (first.force, second.force) == (False, True)


@pytest.mark.anyio
async def test_chain_does_not_raise_keyboard_interrupt_for_pythons_default(anyio_backend: str) -> None:
    old = signal.signal(signal.SIGUSR1, signal.default_int_handler)
    interrupter, receiver = sp.interrupt_channel()
    try:
        with interrupter, receiver:
            async with sp.interrupt_on_signals(interrupter, signals=signal.SIGUSR1, chain=True):
                signal.raise_signal(signal.SIGUSR1)
                with anyio.fail_after(HANG_GUARD):
                    assert (await receiver.receive()).source == "SIGUSR1"
    except KeyboardInterrupt:
        pytest.fail("chain=True called default_int_handler: KeyboardInterrupt tore through the block")
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_only_an_applications_handler_is_chained() -> None:
    """Not SIG_DFL (SIGTERM's kills the process), SIG_IGN, None (set outside Python), nor the KeyboardInterrupt
    handlers of Python, asyncio.run() and trio.run() (they would tear through the run being stopped)."""
    from stoppoint._os_signals import _chainable

    def handler(signum: int, frame: FrameType | None) -> None:
        pass

    assert _chainable(handler) is handler
    for refused in (signal.SIG_DFL, signal.SIG_IGN, None, signal.default_int_handler):
        assert _chainable(refused) is None

    async def loops_own() -> object:
        return signal.getsignal(signal.SIGINT)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # what the loops replace with their own
    try:
        for backend in ("asyncio", "trio"):
            installed = anyio.run(loops_own, backend=backend)
            assert installed is not signal.default_int_handler, backend
            assert _chainable(installed) is None, (backend, installed)
    finally:
        signal.signal(signal.SIGINT, old)


def test_chain_must_be_a_bool() -> None:
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver, pytest.raises(TypeError, match="chain must be a bool, got 'yes'"):
        sp.interrupt_on_signals(interrupter, chain="yes")  # type: ignore[arg-type]


ANY_INPUT = """
    import stoppoint as sp

    fl = sp.Flow("fl")

    @fl.step
    async def a(x: object = None, n: list[int] | None = None) -> int:
        return 1
"""


def test_inputs_nested_too_deep_are_a_usage_error_that_does_not_echo_them(tmp_path: Path) -> None:
    """Python's JSON parser raised RecursionError (a traceback, exit 1) on an --inputs-json file nested
    20,000 deep; pydantic's refusal of a deep --input echoed the whole value."""
    write(tmp_path, "flows.py", ANY_INPUT)
    (tmp_path / "deep.json").write_text('{"x": ' + "[" * 20_000 + "]" * 20_000 + "}")
    from_file = stoppoint("run", "flows.py:fl", "--inputs-json", "deep.json", cwd=tmp_path)
    assert from_file.returncode == 2, from_file.stderr
    assert from_file.stderr == "stoppoint: error: --inputs-json 'deep.json': nested too deep to read as JSON\n"

    from_text = stoppoint("run", "flows.py:fl", "--input", "n=" + "[" * 20_000 + "]" * 20_000, cwd=tmp_path)
    assert from_text.returncode == 2, from_text.stderr
    assert "input 'n' of flow 'fl': '[[[" in from_text.stderr
    assert "... (40,002 characters) is not a valid list[int] | None: Invalid JSON: recursion limit" in from_text.stderr
    assert len(from_text.stderr) < 400


def test_an_input_whose_validator_raises_type_error_is_a_usage_error(tmp_path: Path) -> None:
    """pydantic wraps a validator's ValueError, not its TypeError: the command gave a traceback and exit 1."""
    write(
        tmp_path,
        "flows.py",
        """
        from pydantic import BaseModel, field_validator
        import stoppoint as sp

        class Port(BaseModel):
            number: int

            @field_validator("number")
            @classmethod
            def in_range(cls, value: int) -> int:
                if value > 65535:
                    raise TypeError("a port is at most 65535")
                return value

        fl = sp.Flow("fl")

        @fl.step
        async def a(port: Port) -> int:
            return port.number
        """,
    )
    done = stoppoint("run", "flows.py:fl", "--input", 'port={"number": 70000}', cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "stoppoint: error: input 'port' of flow 'fl': '{\"number\": 70000}' cannot be validated as "
        "Port: TypeError('a port is at most 65535')\n"
    )
