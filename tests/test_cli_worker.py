"""The `stoppoint` commands of queues and workers (API.md §9): `submit`, `worker`, `interrupt`, and what `runs`
and `show` say of owners, epochs, leases and queues.

Every test drives real processes (the worker gets real signals) over one SQLite file. The order of things
comes from the processes' own output (the worker prints a line per claimed and ended run, the steps of
tests/worker_flows.py say where they are) or from files the test writes; timeouts only guard against hangs,
and every child is killed in a `finally`.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

import stoppoint as sp
from stoppoint._flow import plan_of
from stoppoint._launch import new_state

from .test_hardening_cli import HANG_GUARD, Proc, command, spawn, stoppoint
from .worker_flows import double

__all__ = ["spawn"]  # the fixture, used by name

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

FLOWS = str(Path(__file__).resolve().parent / "worker_flows.py")


def submitted(*args: str, cwd: Path) -> str:
    done = stoppoint("submit", *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def shown(run_id: str, cwd: Path) -> dict[str, object]:
    done = stoppoint("show", run_id, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


def row(run_id: str, cwd: Path) -> str:
    """The line of `stoppoint runs` of `run_id`."""
    listed = stoppoint("runs", cwd=cwd)
    assert listed.returncode == 0, listed.stderr
    found = [line for line in listed.stdout.splitlines() if line.split("  ")[0].rstrip() == run_id]
    assert len(found) == 1, listed.stdout
    return found[0]


def expect_all(proc: Proc, patterns: list[str]) -> None:
    """Read the child's lines until each of `patterns` has matched one, in any order."""
    left = list(patterns)
    while left:
        line = proc.expect("|".join(f"(?:{pattern})" for pattern in left))
        left = [pattern for pattern in left if not re.search(pattern, line)]


def eventually(check: Callable[[], bool]) -> None:
    """Wait, bounded, for a state another process changes on its own clock (a progress write, a lease)."""
    deadline = time.monotonic() + HANG_GUARD
    while not check():
        assert time.monotonic() < deadline, "the state never came"
        time.sleep(0.05)


def test_submit_queues_runs_which_a_worker_runs_and_sigterm_stops_it(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    assert submitted(f"{FLOWS}:double", "--input", "n=2", "--run-id", "d1", cwd=tmp_path) == (
        "run d1 of flow double queued in default\n"
    )
    submitted(f"{FLOWS}:double", "--input", "n=3", "--run-id", "d2", "--queue", "other", cwd=tmp_path)
    assert re.fullmatch(r"d1\s+double\s+queued\s+\S+ \S+\s+default\s+0\s+-\s+-", row("d1", tmp_path))

    worker = spawn(command("worker", f"{FLOWS}:double"), cwd=tmp_path)
    worker.expect(r"worker \S+:\d+/\w+: serving flows double from queues default of ")
    worker.expect(r"claimed run d1 of flow double \(epoch 1, was queued\)$")
    worker.expect(r"ended run d1 of flow double: completed$")
    worker.send(signal.SIGTERM)
    worker.expect(r"stopped$")
    code, out, err = worker.finish()
    assert code == 0, err
    assert "run d2" not in out  # queued in a queue this worker does not serve

    assert re.fullmatch(r"d1\s+double\s+completed\s+\S+ \S+\s+default\s+1\s+-\s+-", row("d1", tmp_path))
    assert re.fullmatch(r"d2\s+double\s+queued\s+\S+ \S+\s+other\s+0\s+-\s+-", row("d2", tmp_path))
    data = shown("d1", tmp_path)
    assert (data["status"], data["owner"], data["epoch"], data["queue"]) == ("completed", None, 1, "default")
    assert data["target"] == f"{FLOWS}:double"  # kept, so `stoppoint resume` knows the file
    text = stoppoint("show", "d1", cwd=tmp_path).stdout
    assert "  owner: none (epoch 1)\n  queue: default\n" in text


def test_sigterm_queues_a_running_run_again_and_another_worker_finishes_it(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    marker = str(tmp_path / "h1")
    submitted(f"{FLOWS}:held", "--input", f"marker={marker}", "--run-id", "h1", cwd=tmp_path)
    first = spawn(command("worker", f"{FLOWS}:held"), cwd=tmp_path)
    first.expect(r"claimed run h1 of flow held \(epoch 1, was queued\)$")
    first.expect(r"^waiting h1 \(epoch 1\)$")

    # Seen from another process while it runs: its owner, its lease, and its steps as the store has them.
    owner = rf"\S+:{first.proc.pid}/\w+"
    assert re.fullmatch(rf"h1\s+held\s+running\s+\S+ \S+\s+default\s+1\s+in \d+ s\s+{owner}", row("h1", tmp_path))
    eventually(lambda: "waiting for the go file" in stoppoint("show", "h1", cwd=tmp_path).stdout)
    text = stoppoint("show", "h1", cwd=tmp_path).stdout
    assert re.search(rf"^  owner: {owner} \(epoch 1\), lease expires in \d+ s$", text, re.MULTILINE), text
    assert re.search(r"^steps:\n  first  completed\n  wait   running  \d+ waiting for the go file$", text, re.M), text
    assert "to stop it: stoppoint interrupt h1" in text

    first.send(signal.SIGTERM)
    first.expect(r"stopping: 1 run\(s\) stop at their next stopping point and are queued again")
    first.expect(r"ended run h1 of flow held: queued again \(worker stopping\)$")
    code, _, err = first.finish()
    assert code == 0, err
    assert re.fullmatch(r"h1\s+held\s+queued\s+\S+ \S+\s+default\s+1\s+-\s+-", row("h1", tmp_path))

    Path(marker + ".go").touch()
    second = spawn(command("worker", FLOWS), cwd=tmp_path)  # the file alone: all of its flows
    second.expect(r"serving flows double, held, stuck from queues default")
    second.expect(r"claimed run h1 of flow held \(epoch 2, was queued\)$")
    second.expect(r"^waiting h1 \(epoch 2\)$")
    second.expect(r"ended run h1 of flow held: completed$")
    second.send(signal.SIGINT)
    code, out, err = second.finish()
    assert code == 0, err
    assert "first h1" not in out  # completed in the first attempt: not run again
    data = shown("h1", tmp_path)
    assert (data["status"], data["epoch"], data["owner"]) == ("completed", 2, None)


def test_a_second_sigint_forces_the_worker_and_its_run_is_queued_again(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    submitted(f"{FLOWS}:stuck", "--run-id", "s1", cwd=tmp_path)
    worker = spawn(command("worker", f"{FLOWS}:stuck", "--max-runs", "1"), cwd=tmp_path)
    worker.expect(r"^sleeping s1$")
    worker.send(signal.SIGINT)
    worker.expect(r"stopping: 1 run\(s\)")  # which cannot stop: its step has no stopping point
    worker.send(signal.SIGINT)
    worker.expect(r"ended run s1 of flow stuck: queued again \(worker stopping\)$")
    code, _, err = worker.finish()
    assert code == 130, err
    data = shown("s1", tmp_path)
    assert (data["status"], data["owner"]) == ("queued", None)
    report = data["report"]
    assert isinstance(report, dict)
    assert report["steps"]["forever"]["status"] == "cancelled"


def test_interrupt_stops_a_workers_runs_by_id_and_the_worker_serves_on(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    submitted(f"{FLOWS}:held", "--input", f"marker={tmp_path / 'h1'}", "--run-id", "h1", cwd=tmp_path)
    submitted(f"{FLOWS}:stuck", "--run-id", "s1", cwd=tmp_path)
    worker = spawn(command("worker", f"{FLOWS}:held", f"{FLOWS}:stuck", f"{FLOWS}:double"), cwd=tmp_path)
    expect_all(worker, [r"^waiting h1 ", r"^sleeping s1$"])  # its runs run at once: in either order

    done = stoppoint("interrupt", "h1", "--reason", "ops asked", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        rf"asked \S+:{worker.proc.pid}/\w+ to stop run h1 of flow held at its next stopping point\n", done.stdout
    )
    worker.expect(r"ended run h1 of flow held: interrupted \(ops asked\)$")

    done = stoppoint("interrupt", "s1", "--force", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "to stop run s1 of flow stuck now, cancelling its steps in flight" in done.stdout
    worker.expect(r"ended run s1 of flow stuck: interrupted \(interrupted from the command line, forced\)$")

    again = stoppoint("interrupt", "h1", cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr == "stoppoint: nothing to stop: run h1 of flow held is interrupted and nobody is running it\n"
    ghost = stoppoint("interrupt", "ghost", cwd=tmp_path)
    assert ghost.returncode == 1
    assert "nothing to stop: no run 'ghost' in " in ghost.stderr

    submitted(f"{FLOWS}:double", "--input", "n=1", "--run-id", "d1", cwd=tmp_path)
    worker.expect(r"ended run d1 of flow double: completed$")
    worker.send(signal.SIGTERM)
    code, _, err = worker.finish()
    assert code == 0, err

    data = shown("h1", tmp_path)
    assert data["status"] == "interrupted"
    report = data["report"]
    assert isinstance(report, dict)
    assert [(signal["reason"], signal["source"]) for signal in report["interrupts"]] == [("ops asked", "cli")]
    assert report["steps"]["wait"]["status"] == "interrupted"
    assert shown("s1", tmp_path)["status"] == "interrupted"


def test_interrupt_of_a_queued_run_marks_it_interrupted_at_once(tmp_path: Path) -> None:
    submitted(f"{FLOWS}:double", "--input", "n=1", "--run-id", "q1", cwd=tmp_path)
    done = stoppoint("interrupt", "q1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "run q1 of flow double was queued, run by nobody: marked interrupted (interrupted from the command line)\n"
    )
    assert re.match(r"q1\s+double\s+interrupted\s", row("q1", tmp_path))
    nowhere = stoppoint("interrupt", "q1", cwd=tmp_path / "..")  # no store there
    assert nowhere.returncode == 1
    assert "nothing to stop: no run 'q1': there is no store at" in nowhere.stderr
    assert stoppoint("interrupt", "", cwd=tmp_path).returncode == 2


def test_runs_and_show_tell_an_orphaned_run(tmp_path: Path) -> None:
    """An owner that claimed a run and died: its lease expires, and the run shows orphaned."""
    path = tmp_path / "runs.db"

    async def die() -> None:
        async with sp.SQLiteStore(path, lease=0.2) as store:
            state = new_state(plan_of(double), "o1", {"n": 1})
            await store.claim("double", "o1", "ghost:1/dead", new=state)

    anyio.run(die)
    eventually(lambda: " orphaned " in stoppoint("runs", "--store", str(path), cwd=tmp_path).stdout)
    line = stoppoint("runs", "--store", str(path), cwd=tmp_path).stdout.splitlines()[1]
    assert re.fullmatch(r"o1\s+double\s+orphaned\s+\S+ \S+\s+-\s+1\s+expired \d+ s ago\s+ghost:1/dead", line), line
    text = stoppoint("show", "o1", "--store", str(path), cwd=tmp_path).stdout
    assert text.startswith("run o1 of flow double: orphaned\n  owner: ghost:1/dead (epoch 1), lease expired ")
    assert "steps:\n  twice  pending\n" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker", f"{FLOWS}:double", "--max-runs", "0"], "--max-runs 0: expected a whole number >= 1"),
        (["worker", f"{FLOWS}:double", "--queue", "=2"], "--queue '=2': expected NAME or NAME=LIMIT"),
        (["worker", f"{FLOWS}:double", "--queue", "q=0"], "the limit must be a whole number >= 1"),
        (["worker", f"{FLOWS}:double", "--queue", "q", "--queue", "q"], "queue 'q' is given twice"),
        (["worker", str(Path(__file__).resolve().parent / "__init__.py")], "defines no Flow"),
        (["worker", f"{FLOWS}:nothing"], "has no flow named 'nothing'"),
        (["submit", f"{FLOWS}:double"], "missing"),
        (["submit", f"{FLOWS}:double", "--input", "n=1", "--queue", ""], "a queue's name cannot be empty"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = stoppoint(*args, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
