"""The `stoppoint` command, driven in subprocesses as users run it (issue 6)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import stoppoint as sp
from stoppoint._display import Display

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = str(ROOT / "examples" / "deploy.py")
FLOWS = str(ROOT / "tests" / "cli_flows.py")


def stoppoint(*args: str, cwd: Path, part_seconds: float = 0.01) -> subprocess.CompletedProcess[str]:
    """Run `python -m stoppoint ARGS` in `cwd` and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "stoppoint", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={**os.environ, "DEPLOY_PART_SECONDS": str(part_seconds)},
    )


class Running:
    """A `stoppoint` process whose output is read line by line while it runs."""

    def __init__(self, *args: str, cwd: Path, part_seconds: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stoppoint", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, "DEPLOY_PART_SECONDS": str(part_seconds)},
        )
        self.lines: list[str] = []

    def wait_for(self, pattern: str) -> str:
        """Read output until a line matches `pattern` (the process's own progress is the clock)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if re.search(pattern, line):
                return line
        raise AssertionError(f"the output ended without {pattern!r}:\n" + "\n".join(self.lines))

    def finish(self) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=120)
        return self.process.returncode, "\n".join(self.lines) + "\n" + out, err


def test_run_completes_then_runs_and_show_list_it(tmp_path: Path) -> None:
    done = stoppoint("run", f"{DEPLOY}:deploy", "--run-id", "first", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "step.completed upload" in done.stdout
    assert re.search(r"^  completed: server, upload, config, start$", done.stdout, re.MULTILINE), done.stdout
    assert "to resume" not in done.stdout
    assert (tmp_path / ".stoppoint" / "runs.db").is_file()  # the default store, under the working directory

    runs = stoppoint("runs", cwd=tmp_path)
    assert runs.returncode == 0, runs.stderr
    assert re.search(r"^first\s+deploy\s+completed\s", runs.stdout, re.MULTILINE), runs.stdout
    assert stoppoint("runs", "--flow", "other", cwd=tmp_path).stdout.strip() == "no runs of flow 'other'"

    shown = stoppoint("show", "first", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["run_id"] == "first"
    assert data["flow"] == "deploy"
    assert data["status"] == "completed"
    assert data["target"] == f"{DEPLOY}:deploy"
    report = sp.RunReport.model_validate(data["report"])
    assert report.completed == ["server", "upload", "config", "start"]
    text = stoppoint("show", "first", cwd=tmp_path)
    assert "run first of flow deploy: completed" in text.stdout


def test_ctrl_c_once_stops_at_the_next_stopping_point_and_resume_finishes(tmp_path: Path) -> None:
    running = Running("run", f"{DEPLOY}:deploy", "--run-id", "r1", cwd=tmp_path, part_seconds=0.5)
    running.wait_for(r"step\.started upload")
    running.process.send_signal(signal.SIGINT)
    code, out, err = running.finish()
    assert code == 130, err
    assert "stopping at the next stopping point" in out
    assert "press Ctrl-C again to force" in out
    assert re.search(r"^  completed: +server$", out, re.MULTILINE), out
    assert re.search(r"^  stopped: +upload \(at deploy\.py:\d+\)$", out, re.MULTILINE), out
    assert re.search(r"^  not started: +config, start$", out, re.MULTILINE), out
    assert "to resume: stoppoint resume r1" in out

    resumed = stoppoint("resume", "r1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: server completed before, not run again" in resumed.stdout
    assert "step.started server" not in resumed.stdout
    assert re.search(r"^  completed: server \(resumed\), upload, config, start$", resumed.stdout, re.MULTILINE)
    assert json.loads(stoppoint("show", "r1", "--json", cwd=tmp_path).stdout)["status"] == "completed"


def test_ctrl_c_twice_forces_the_stop(tmp_path: Path) -> None:
    running = Running("run", f"{FLOWS}:stubborn", "--run-id", "s1", cwd=tmp_path, part_seconds=0.01)
    running.wait_for(r"step\.started wait_long")
    running.process.send_signal(signal.SIGINT)
    running.wait_for(r"stopping at the next stopping point")
    running.process.send_signal(signal.SIGINT)
    code, out, err = running.finish()
    assert code == 130, err
    assert "forced: cancelling the steps in flight" in out
    assert re.search(r"^  cancelled: +wait_long$", out, re.MULTILINE), out
    assert "to resume: stoppoint resume s1" in out


def test_a_failing_step_exits_1_and_says_why(tmp_path: Path) -> None:
    done = stoppoint("run", f"{FLOWS}:failing", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "step 'broken' failed: ValueError: the disk is full" in done.stdout
    assert re.search(r"^  failed: +broken \(ValueError: the disk is full\)$", done.stdout, re.MULTILINE), done.stdout


def test_inputs_are_validated_against_the_step_annotations(tmp_path: Path) -> None:
    settings = tmp_path / "inputs.json"
    settings.write_text(json.dumps({"settings": {"name": "prod", "retries": 2}, "count": 1}))
    done = stoppoint(
        "run",
        f"{FLOWS}:typed",
        "--inputs-json",
        str(settings),
        "--input",
        "count=5",  # wins over the file's
        "--input",
        "items=[1, 2]",
        "--run-id",
        "t1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(stoppoint("show", "t1", "--json", cwd=tmp_path).stdout)
    assert data["status"] == "completed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.py:flow"], "target 'missing.py:flow': no such file 'missing.py'"),
        (["run", "no-colon"], "expected FILE.py:FLOW"),
        (["run", f"{FLOWS}:nope"], "has no flow named 'nope' (its flows: failing, stubborn, typed)"),
        (["run", f"{FLOWS}:not_a_flow"], "'not_a_flow' is a int, not a stoppoint Flow"),
        (["run", f"{FLOWS}:typed", "--input", "count=abc"], "input 'count' of flow 'typed': 'abc' is not a valid int"),
        (["run", f"{FLOWS}:typed", "--input", "colour=red"], "flow 'typed' has no input 'colour'"),
        (["run", f"{FLOWS}:typed", "--input", "count"], "--input 'count': expected NAME=VALUE"),
        (["run", f"{FLOWS}:typed", "--input", "count=1"], "missing input(s)"),
        (["run", f"{FLOWS}:typed", "--inputs-json", "nope.json"], "--inputs-json 'nope.json': cannot read it"),
        (["run", f"{FLOWS}:failing", "--strategy", "sometimes"], "--strategy 'sometimes': expected"),
        (["run", f"{FLOWS}:failing", "--grace", "-1"], "--grace -1.0: expected a number of seconds >= 0"),
        (["resume", "ghost"], "no run 'ghost': there is no store at .stoppoint/runs.db yet"),
        (["show", "ghost"], "no run 'ghost': there is no store at .stoppoint/runs.db yet"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2_naming_the_problem(tmp_path: Path, args: list[str], message: str) -> None:
    done = stoppoint(*args, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_id_in_use_is_refused(tmp_path: Path) -> None:
    assert stoppoint("run", f"{FLOWS}:failing", "--run-id", "dup", cwd=tmp_path).returncode == 1
    again = stoppoint("run", f"{FLOWS}:failing", "--run-id", "dup", cwd=tmp_path)
    assert again.returncode == 2
    assert "run 'dup' is already in the store; use `stoppoint resume dup`" in again.stderr


def test_the_target_is_kept_as_a_run_label(tmp_path: Path) -> None:
    store = tmp_path / "runs.db"
    assert stoppoint("run", f"{FLOWS}:failing", "--run-id", "f1", "--store", str(store), cwd=tmp_path).returncode == 1

    async def labels() -> dict[str, str]:
        async with sp.SQLiteStore(store) as opened:
            return await opened.labels("failing", "f1")

    assert anyio.run(labels) == {"stoppoint.target": f"{FLOWS}:failing"}
    with sqlite3.connect(store) as db:  # through the store's API: no table of the command's own beside it
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert tables == {"meta", "runs", "steps", "interrupts", "labels", "events", "sqlite_sequence"}  # schema 2's


ONCE = """\
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
    return a + 1
"""


def test_a_store_of_the_command_before_run_labels_still_resumes(tmp_path: Path) -> None:
    """The command used to keep each run's target in a cli_targets table of its own, beside the store's."""
    flows = tmp_path / "flows.py"
    flows.write_text(ONCE)
    store = tmp_path / "runs.db"
    assert stoppoint("run", "flows.py:fl", "--run-id", "r1", "--store", str(store), cwd=tmp_path).returncode == 1
    target = f"{flows.resolve()}:fl"
    with sqlite3.connect(store) as db:  # the file as that command left it
        db.execute("DROP TABLE IF EXISTS labels")
        db.execute(
            "CREATE TABLE IF NOT EXISTS cli_targets (run_id TEXT PRIMARY KEY, flow TEXT NOT NULL, target TEXT NOT NULL)"
        )
        db.execute("INSERT OR REPLACE INTO cli_targets VALUES ('r1', 'fl', ?)", (target,))
    db.close()
    (tmp_path / "ok").touch()

    resumed = stoppoint("resume", "r1", "--store", str(store), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: a completed before, not run again" in resumed.stdout
    assert re.search(r"^  completed: a \(resumed\), b$", resumed.stdout, re.MULTILINE), resumed.stdout
    shown = json.loads(stoppoint("show", "r1", "--json", "--store", str(store), cwd=tmp_path).stdout)
    assert (shown["status"], shown["target"]) == ("completed", target)
    with sqlite3.connect(store) as db:  # the target is a label now, and the old table is gone
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        labels = db.execute("SELECT flow, run_id, key, value FROM labels").fetchall()
    db.close()
    assert "cli_targets" not in tables
    assert labels == [("fl", "r1", "stoppoint.target", target)]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.anyio
async def test_on_a_terminal_the_display_is_a_live_table(anyio_backend: str) -> None:
    flow = sp.Flow("shown")

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        ctx.progress(1, 2, "half way")
        return 1

    out = _Terminal()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, run_id="r1")
        async with Display(handle, out) as display:
            tg.start_soon(display.follow)
            await handle.outcome()
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())  # without colours and cursor moves
    assert "shown - run r1" in text
    assert re.search(r"work\s*│\s*completed\s*│\s*1/2 half way", text), text


def test_show_events_prints_a_runs_stored_history_across_its_attempts(tmp_path: Path) -> None:
    running = Running("run", f"{DEPLOY}:deploy", "--run-id", "r1", cwd=tmp_path, part_seconds=0.3)
    running.wait_for(r"step\.started upload")
    running.process.send_signal(signal.SIGINT)
    code, _, err = running.finish()
    assert code == 130, err
    resumed = stoppoint("resume", "r1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "step.progress" not in resumed.stdout  # the live lines leave progress to the terminal's table

    shown = stoppoint("show", "r1", "--events", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.split("events:\n", 1)[1].splitlines()
    stamp = r"  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    names = [re.sub(stamp, "", line).split(" ")[0] for line in lines]
    assert names[:3] == ["flow.started", "step.started", "step.completed"], shown.stdout
    assert "interrupt.received" in names
    assert names.count("flow.started") == 2
    assert names[-1] == "flow.completed"
    assert all(re.match(stamp, line) for line in lines), shown.stdout
    assert any(re.match(stamp + r"step\.progress upload \d+/\d+ sending ", line) for line in lines), shown.stdout
    assert any(re.match(stamp + r"flow\.started \(resumed: server completed before\)$", line) for line in lines)
    assert any(re.match(stamp + r"step\.stopped upload at deploy\.py:\d+$", line) for line in lines)

    data = json.loads(stoppoint("show", "r1", "--events", "--json", cwd=tmp_path).stdout)
    assert [event["event"] for event in data["events"]] == names
    assert data["events_dropped"] == 0
    assert "events" not in json.loads(stoppoint("show", "r1", "--json", cwd=tmp_path).stdout)
