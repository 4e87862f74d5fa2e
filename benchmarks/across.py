"""Across processes on one SQLite file (issue 14, item 8):

- Interrupt latency: another process keeps 10 runs going (each a step looping on `await ctx.checkpoint();
  await anyio.sleep(0.001)`); this one calls `store.interrupt(flow, run_id)` on one at a time, and the
  latency is from just before the call to when that run's outcome was returned in the other process
  (`time.time()` on both sides: the same host clock). The owner finds a request by polling the store
  (`SQLiteStore.interrupt_poll`), then stores its end.
- Recovery of an orphaned run: a process running a run on `SQLiteStore(lease=L)` is killed (SIGKILL) in
  its first step; a `Worker` of this process, already serving the flow, claims the run once its lease has
  expired and runs the step again. Measured: from the kill to that step running.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

import stoppoint as sp

from . import _across_child
from ._across_child import ORPHAN, SPIN, open_store
from ._measure import Report, percentile

ROOT = Path(__file__).resolve().parent.parent  # where `benchmarks` is importable from


async def _child(*args: str) -> tuple[Process, BufferedByteReceiveStream]:
    process = await anyio.open_process([sys.executable, "-m", "benchmarks._across_child", *args], cwd=ROOT)
    assert process.stdout is not None
    return process, BufferedByteReceiveStream(process.stdout)


async def _line(lines: BufferedByteReceiveStream) -> list[str]:
    return (await lines.receive_until(b"\n", 1 << 16)).decode().split()


async def _stop(process: Process) -> None:
    with anyio.CancelScope(shield=True):
        if process.stdin is not None:
            await process.stdin.aclose()
        with anyio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def interrupt_latency(spec: str, runs: int, count: int, backend: str) -> tuple[list[float], list[float]]:
    """(latencies, durations of the interrupt() calls) of `count` interrupts, `runs` runs active at each, on
    the store `spec` names (a SQLite file's path, or `_across_child.pg_spec()`)."""
    latencies, calls = [], []
    async with open_store(spec) as store:  # the store exists before the other process opens it
        process, lines = await _child("spin", spec, str(runs), backend)
        try:
            with anyio.fail_after(60 + count):
                running: set[str] = set()
                while len(running) < runs:
                    kind, run_id, *_ = await _line(lines)
                    assert kind == "started", kind
                    running.add(run_id)
                for _ in range(count):
                    target = min(running, key=lambda run_id: int(run_id.rsplit("-", 1)[1]))  # the oldest
                    sent = time.time()
                    assert await store.interrupt(SPIN.name, target, "bench", source="bench")
                    calls.append(time.time() - sent)
                    stopped = None
                    while stopped is None or len(running) < runs:  # its end, and the run in its place
                        kind, run_id, *rest = await _line(lines)
                        if kind == "started":
                            running.add(run_id)
                        else:
                            running.discard(run_id)
                            if run_id == target:
                                stopped = float(rest[0])
                    latencies.append(stopped - sent)
        finally:
            await _stop(process)
    return latencies, calls


async def orphan_recovery(spec: str, lease: float, count: int, backend: str) -> list[float]:
    """Seconds from the kill of a run's owner to its first step running again in a Worker, `count` times, on
    the store `spec` names."""
    rng = random.Random(8)
    delays = []
    _across_child.resumed.clear()
    async with open_store(spec, lease) as store, anyio.create_task_group() as tg:
        worker = sp.Worker(store, ORPHAN)
        tg.start_soon(worker.run)
        for i in range(count):
            _across_child.on_resumed = resumed = anyio.Event()
            process, lines = await _child("orphan", spec, repr(lease), backend, f"orphan-{i}")
            try:
                with anyio.fail_after(60):
                    assert (await _line(lines))[0] == "running"
                await anyio.sleep(rng.uniform(0, lease / 3))  # anywhere between two renewals
                process.kill()
                killed = time.time()
                await process.wait()
            finally:
                await _stop(process)
            with anyio.fail_after(lease + 30):
                await resumed.wait()
            delays.append(_across_child.resumed[i] - killed)
        worker.stop()
    return delays


async def measure(report: Report, rounds: int, recoveries: int, backend: str) -> None:
    runs, lease = 10, 2.0
    poll = sp.SQLiteStore.interrupt_poll
    with tempfile.TemporaryDirectory() as tmp:
        latencies, calls = await interrupt_latency(str(Path(tmp) / "across.db"), runs, rounds * runs, backend)
        section = report.section(
            f"Across processes (SQLite): interrupt latency, {runs} runs active, {len(latencies)} interrupts "
            f"(owners poll every {poll * 1e3:g} ms)"
        )
        p99 = percentile(latencies, 99)
        section.add(
            "store.interrupt() -> Interrupted returned in the other process", percentile(latencies, 50), p99=p99
        )
        section.add("the store.interrupt() call itself", percentile(calls, 50), p99=percentile(calls, 99))
        report.target(f"cross-process interrupt latency p99 <= 250 ms ({runs} runs active)", p99, 0.25, unit="s")

        delays = await orphan_recovery(str(Path(tmp) / "orphan.db"), lease, recoveries, backend)
    section = report.section(
        f"Across processes (SQLite): recovery of an orphaned run, lease {lease:g} s ({len(delays)} kills)"
    )
    section.add(
        "kill -9 of the owner -> its step runs again in a Worker",
        statistics.median(delays),
        p99=max(delays),
        note="p99: the worst",
    )
    report.target(
        f"orphaned run recovered <= lease + 2 s (lease {lease:g} s; worst of {len(delays)})",
        max(delays),
        lease + 2.0,
        unit="s",
    )
