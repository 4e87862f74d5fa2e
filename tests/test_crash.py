"""Crash safety, for real: a persisted run killed with SIGKILL at seeded random moments, then resumed.

A child process runs `tests/crash_flow.py` (21 steps, two in flight at a time) on an SQLite store. The test reads
the child's side log as it goes, kills it with SIGKILL after a seeded random number of log lines, and resumes the
run in this process. Then:

* no step whose completion the store had committed runs again;
* every step the store had not committed runs in the resume, and the steps that run twice are only those that
  were in flight at the kill (started, and not yet committed: at most two);
* the result equals an uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import stoppoint as sp

from . import crash_flow
from .conftest import until

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

ROOT = Path(__file__).resolve().parent.parent
EVENTS = 2 * (len(crash_flow.STEPS) + 1)  # a START and an END line per step
SEED = 20261127
KILL_POINTS = sorted(random.Random(SEED).sample(range(1, EVENTS), 20))  # 20 different moments
# Each kill point on one backend, alternating: the child and the resume both run on it.
CASES = [(lines, "asyncio" if i % 2 == 0 else "trio") for i, lines in enumerate(KILL_POINTS)]


def log_events(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        event, name, pid = line.split()
        events.append((event, name, int(pid)))
    return events


def kill_after(db: Path, log: Path, lines: int, backend: str) -> None:
    """Run the flow in a child process and SIGKILL it once it has logged `lines` events."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-u", "-m", "tests.crash_flow", str(db), str(log), backend],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        seen = 0
        while seen < lines:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"the child ended before {lines} events: {child.stderr.read() if child.stderr else ''}")
            if line.startswith(("START", "END")):
                seen += 1
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()


async def committed(db: Path) -> set[str]:
    """Steps whose output the store holds."""
    flow = crash_flow.make_flow(os.devnull, echo=False)
    async with sp.SQLiteStore(db) as store:
        stored = await store.load(flow.name, crash_flow.RUN_ID)
    if stored is None:
        return set()
    return set(flow.load_checkpoint(stored.checkpoint_json).outputs)


@pytest.mark.anyio
@pytest.mark.parametrize(("lines", "anyio_backend"), CASES)
async def test_a_killed_run_resumes_without_redoing_committed_steps(
    tmp_path: Path, lines: int, anyio_backend: str
) -> None:
    db, log = tmp_path / "runs.db", tmp_path / "side.log"
    kill_after(db, log, lines, anyio_backend)
    before = log_events(log)
    started_before = {name for event, name, _ in before if event == "START"}
    done = await committed(db)
    ended_before = {name for event, name, _ in before if event == "END"}
    assert done <= ended_before  # the store never claims a step that had not finished

    flow = crash_flow.make_flow(str(log), echo=False)
    with anyio.fail_after(60):
        async with sp.SQLiteStore(db, lease=crash_flow.LEASE) as store:

            async def not_held() -> bool:  # the killed child's lease expires: the run is orphaned
                return all(record.status is not sp.RunStatus.RUNNING for record in await store.list_runs())

            await until(not_held)
            outcome = await flow.run(store=store, run_id=crash_flow.RUN_ID)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == crash_flow.expected_total()

    resumed_starts = [name for event, name, pid in log_events(log)[len(before) :] if event == "START"]
    everything = {*crash_flow.STEPS, "total"}
    assert not set(resumed_starts) & done, "a committed step ran again"
    assert sorted(resumed_starts) == sorted(everything - done), "each uncommitted step runs once in the resume"
    ran_twice = started_before - done
    assert len(ran_twice) <= 2, f"only steps in flight at the kill may run again, got {sorted(ran_twice)}"
    assert {name for name, step in outcome.report.steps.items() if step.resumed} == done
    # The figures for the record (pytest -s shows them): where it was killed, what was kept, what ran twice.
    print(f"kill after {lines:2d} events: {len(done):2d} committed, re-ran {sorted(ran_twice)}")


def test_the_kill_points_cover_the_whole_run() -> None:
    """The seeded kill points are spread from the first steps to the last ones."""
    assert len(set(KILL_POINTS)) == 20
    assert KILL_POINTS[0] < EVENTS // 4
    assert KILL_POINTS[-1] > 3 * EVENTS // 4
