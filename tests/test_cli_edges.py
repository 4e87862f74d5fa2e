"""The `stoppoint` command at its edges: inputs, options, stores and output that a review drove it into."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def stoppoint(*args: str | bytes, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stoppoint", *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
        cwd=cwd,
        env=ENV,
    )


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


FAILING_ONCE = """
    from pathlib import Path
    import stoppoint as sp

    fl = sp.Flow("fl")

    @fl.step
    async def a() -> int:
        return 1

    @fl.step
    async def b(a: int) -> int:
        if not Path(__file__).with_name("ok").exists():
            raise ValueError("not yet")
        return 2
"""

# A step that waits until the test writes a line to the command's standard input.
GATED = """
    import sys
    import anyio
    import stoppoint as sp

    fl = sp.Flow("gated")

    @fl.step
    async def a(ctx: sp.StepContext) -> int:
        await anyio.to_thread.run_sync(sys.stdin.readline)
        return 1

    @fl.step
    async def b(a: int) -> int:
        return 2
"""


# -- inputs -------------------------------------------------------------------------------------------


def test_inputs_of_an_included_flow_are_accepted(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flows.py",
        """
        import stoppoint as sp
        inner = sp.Flow("inner")

        @inner.step
        async def count_it(count: int) -> int:
            assert isinstance(count, int)
            return count

        outer = sp.Flow("outer")

        @outer.step
        async def first() -> int:
            return 1

        outer.include(inner)
        """,
    )
    done = stoppoint("run", "flows.py:outer", "--input", "count=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_a_json_number_for_a_str_input_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flows.py",
        """
        import stoppoint as sp
        greet = sp.Flow("greet")

        @greet.step
        async def hello(name: str) -> str:
            return name.upper()
        """,
    )
    (tmp_path / "in.json").write_text(json.dumps({"name": 5}))
    done = stoppoint("run", "flows.py:greet", "--inputs-json", "in.json", cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)  # today: exit 1, AttributeError in the step
    assert "input 'name'" in done.stderr


def test_an_input_pydantic_cannot_handle_is_a_usage_error(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flows.py",
        """
        import stoppoint as sp

        class Conn:
            pass

        fl = sp.Flow("withconn")

        @fl.step
        async def use(conn: Conn) -> int:
            return 1
        """,
    )
    done = stoppoint("run", "flows.py:fl", "--input", "conn=x", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr


def test_inputs_are_validated_when_another_annotation_cannot_be_resolved(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flows.py",
        """
        from __future__ import annotations
        from typing import TYPE_CHECKING
        import stoppoint as sp

        if TYPE_CHECKING:
            from decimal import Decimal

        fl = sp.Flow("tc")

        @fl.step
        async def add(count: int, price: Decimal | None = None) -> int:
            return count + 1
        """,
    )
    done = stoppoint("run", "flows.py:fl", "--input", "count=5", cwd=tmp_path)
    assert done.returncode == 0, done.stdout  # today: the step gets "5" and fails with a TypeError


def test_a_bad_text_input_is_explained_by_the_type_not_by_json(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flows.py",
        """
        import datetime
        import stoppoint as sp
        fl = sp.Flow("dated")

        @fl.step
        async def when(day: datetime.date) -> str:
            return day.isoformat()
        """,
    )
    done = stoppoint("run", "flows.py:fl", "--input", "day=2024-13-01", cwd=tmp_path)
    assert done.returncode == 2
    assert "Invalid JSON" not in done.stderr, done.stderr


def test_the_error_for_an_optional_input_names_its_type(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flows.py",
        """
        from typing import Optional
        import stoppoint as sp
        fl = sp.Flow("opt")

        @fl.step
        async def use(limit: Optional[int] = None) -> int:
            return limit or 0
        """,
    )
    done = stoppoint("run", "flows.py:fl", "--input", "limit=abc", cwd=tmp_path)
    assert done.returncode == 2
    assert "not a valid Optional:" not in done.stderr, done.stderr


def test_inputs_json_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    (tmp_path / "in.json").write_bytes(b'\xff\xfe{"x": 1}')
    done = stoppoint("run", "flows.py:fl", "--inputs-json", "in.json", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr


# -- options ------------------------------------------------------------------------------------------


def test_grace_nan_is_a_usage_error(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    done = stoppoint("run", "flows.py:fl", "--grace", "nan", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr


def test_strategy_with_a_non_ascii_digit_is_a_usage_error(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    done = stoppoint("run", "flows.py:fl", "--strategy", "poll-next-²", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--strategy" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_run_id_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    done = stoppoint("run", "flows.py:fl", "--run-id", "", cwd=tmp_path)
    assert done.returncode == 2, done.stdout


def test_a_non_utf8_run_id_gives_no_traceback(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    (tmp_path / "ok").touch()
    done = stoppoint("run", "flows.py:fl", b"--run-id", b"\xff", cwd=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 2)
    resumed = stoppoint("resume", b"\xfe", cwd=tmp_path)
    assert "Traceback" not in resumed.stderr, resumed.stderr
    assert resumed.returncode == 2


# -- the store and resuming -----------------------------------------------------------------------------


def test_a_relative_target_resumes_from_another_directory(tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    write(project, "flows.py", FAILING_ONCE)
    store = str(tmp_path / "runs.db")
    assert stoppoint("run", "flows.py:fl", "--run-id", "r1", "--store", store, cwd=project).returncode == 1
    (project / "ok").touch()
    resumed = stoppoint("resume", "r1", "--store", store, cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr  # today: "no such file 'flows.py'"


def test_runs_and_show_in_a_fresh_directory_create_no_files(tmp_path: Path) -> None:
    assert stoppoint("runs", cwd=tmp_path).returncode == 0
    assert stoppoint("show", "ghost", cwd=tmp_path).returncode == 2
    assert stoppoint("resume", "ghost", cwd=tmp_path).returncode == 2
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_stored_run_not_started_by_the_command_says_why(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    script = (
        "import anyio, flows, stoppoint as sp\n"
        "async def main():\n"
        "    async with sp.SQLiteStore('api.db') as store:\n"
        "        try:\n"
        "            await flows.fl.run(store=store, run_id='api1')\n"
        "        except sp.StepFailed:\n"
        "            pass\n"
        "anyio.run(main)\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=60)
    listed = stoppoint("runs", "--store", "api.db", cwd=tmp_path)
    assert "api1" in listed.stdout  # `runs` lists it; `show` suggests no `resume` that cannot work ...
    assert "to resume" not in stoppoint("show", "api1", "--store", "api.db", cwd=tmp_path).stdout
    resumed = stoppoint("resume", "api1", "--store", "api.db", cwd=tmp_path)
    assert resumed.returncode == 2
    assert "no run 'api1'" not in resumed.stderr, resumed.stderr  # ... and `resume` says why, not "no such run"
    assert "was not started by the stoppoint command" in resumed.stderr


def test_show_gives_a_resume_command_with_the_store(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    assert stoppoint("run", "flows.py:fl", "--run-id", "r1", "--store", "other.db", cwd=tmp_path).returncode == 1
    shown = stoppoint("show", "r1", "--store", "other.db", cwd=tmp_path)
    store = shlex.quote(str((tmp_path / "other.db").resolve()))  # absolute: it works from any directory
    assert f"to resume: stoppoint resume r1 --store {store}" in shown.stdout, shown.stdout


def test_the_resume_command_can_be_pasted_into_a_shell(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    done = stoppoint("run", "flows.py:fl", "--run-id", "my run", cwd=tmp_path)
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if line.startswith("to resume: "))
    assert shlex.split(line.removeprefix("to resume: ")) == ["stoppoint", "resume", "my run"], line


def test_runs_columns_line_up_with_the_header(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    (tmp_path / "ok").touch()
    assert stoppoint("run", "flows.py:fl", "--run-id", "r1", cwd=tmp_path).returncode == 0
    header, row = stoppoint("runs", cwd=tmp_path).stdout.splitlines()[:2]
    assert header.index("FLOW") == row.index("fl "), (header, row)


# -- output -----------------------------------------------------------------------------------------------


def test_a_reader_that_goes_away_gives_no_traceback(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", GATED)
    process = subprocess.Popen(
        [sys.executable, "-m", "stoppoint", "run", "flows.py:fl"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=ENV,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    for line in process.stdout:
        if "step.started a" in line:
            break
    process.stdout.close()  # `stoppoint run ... | head -2`
    process.stdin.write("go\n")  # releases step a
    process.stdin.close()
    err = process.stderr.read()
    process.stderr.close()
    process.wait(timeout=60)
    assert "Traceback" not in err, err


def test_a_progress_message_with_brackets_on_a_terminal(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flows.py",
        """
        import stoppoint as sp
        fl = sp.Flow("copy")

        @fl.step
        async def work(ctx: sp.StepContext) -> int:
            ctx.progress(1, 2, "copying [/tmp/x]")
            return 1
        """,
    )
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "stoppoint", "run", "flows.py:fl"],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=ENV,
    )
    os.close(follower)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # drain the terminal until the process closes it
            ready, _, _ = select.select([leader], [], [], 1)
            if ready:
                try:
                    if not os.read(leader, 65536):
                        break
                except OSError:
                    break
    finally:
        os.close(leader)
    assert process.stderr is not None
    err = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    assert process.wait(timeout=60) == 0, err


def test_ctrl_c_under_ignore_does_not_promise_a_stop(tmp_path: Path) -> None:
    write(tmp_path, "flows.py", GATED)
    process = subprocess.Popen(
        [sys.executable, "-m", "stoppoint", "run", "flows.py:fl", "--strategy", "ignore"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=ENV,
    )
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if "step.started a" in line:
            process.send_signal(signal.SIGINT)
        if "SIGINT" in line:  # the note about the signal
            break
    out, _ = process.communicate("go\n", timeout=60)  # releases step a
    text = "".join(lines) + out
    assert process.returncode == 0
    assert re.search(r"\bstep\.completed b\b", text), text
    assert "stopping at the next stopping point" not in text, text
