"""Peers, same flow shape and step bodies: a chain of steps each adding one to the output of the
one before, with a chance to stop between steps.

- hand-rolled: a loop that checks an `asyncio.Event` before each body;
- anyio: a loop inside a `CancelScope`, with `checkpoint_if_cancelled()` before each body (the
  closest anyio comes to a stopping point: cancellation otherwise lands at any await);
- Prefect 3: `@task` bodies called from a `@flow`, in a subprocess (optional extra `bench`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel

import stoppoint as sp

from ._measure import Report, per_item

PREFECT_STEPS = 100


async def add_one(x: int) -> int:
    return x + 1


def counting_chain(steps: int, name: str = "count") -> sp.Flow:
    """s0 returns 1, each later step returns its input plus one."""
    flow = sp.Flow(name)

    @flow.step(name="s0")
    async def first() -> int:
        return await add_one(0)

    for i in range(1, steps):
        flow.step(name=f"s{i}", after=(f"s{i - 1}",))(_adds_one_to(f"s{i - 1}"))
    return flow


def _adds_one_to(dependency: str) -> Callable[..., Awaitable[int]]:
    """A step body taking the output of step `dependency` (its parameter is named after it)."""

    async def body(**outputs: int) -> int:
        return await add_one(outputs[dependency])

    body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(dependency, inspect.Parameter.KEYWORD_ONLY, annotation=int)], return_annotation=int
    )
    return body


async def measure(report: Report, steps: int, repeats: int, prefect: bool) -> None:
    section = report.section(f"Peers: a {steps:,}-step chain of `x + 1` bodies, per step (median of {repeats})")
    flow = counting_chain(steps)

    async def stoppoint_chain(n: int) -> None:
        outcome = await flow.run()
        assert isinstance(outcome, sp.Completed), outcome
        assert outcome.value == n

    async def event_polling(n: int) -> None:
        stop = asyncio.Event()
        value = 0
        for _ in range(n):
            if stop.is_set():
                break
            value = await add_one(value)
        assert value == n

    async def cancel_scope(n: int) -> None:
        value = 0
        with anyio.CancelScope():
            for _ in range(n):
                await anyio.lowlevel.checkpoint_if_cancelled()
                value = await add_one(value)
        assert value == n

    base = "stoppoint chain"
    times = await per_item(
        {
            base: stoppoint_chain,
            "hand-rolled asyncio.Event polling": event_polling,
            "anyio CancelScope + checkpoint_if_cancelled()": cancel_scope,
        },
        steps,
        repeats,
    )
    for name, seconds in times.items():
        section.add(name, seconds, baseline=None if name == base else base)

    label = f"at least 100x faster per step than Prefect 3 tasks ({PREFECT_STEPS}-step chain)"
    if not prefect:
        report.target(label, None, None, why="skipped in --quick mode (Prefect starts a server: ~10 s)")
        return
    if importlib.util.find_spec("prefect") is None:
        section.add("Prefect 3: skipped", 0.0, note="not installed: pip install -e '.[bench]'")
        report.target(label, None, None, why="Prefect is not installed (pip install -e '.[bench]')")
        return
    result = _prefect()
    if result is None:
        report.target(label, None, None, why="the Prefect run failed (see above)")
        return
    prefect_section = report.section(f"Peers: Prefect 3, a {PREFECT_STEPS}-step chain, per step (one subprocess)")
    prefect_section.add("stoppoint chain", result["stoppoint"])
    prefect_section.add("Prefect 3 @task in a @flow", result["prefect"], baseline="stoppoint chain")
    report.target(label, result["stoppoint"] / result["prefect"], 0.01, why="(stoppoint / Prefect per step)")


def _prefect() -> dict[str, float] | None:
    """Run `benchmarks._prefect_chain` in a subprocess: Prefect starts a local server and
    configures logging, neither of which belongs in this process."""
    with tempfile.TemporaryDirectory() as home:
        env = dict(
            os.environ,
            PREFECT_HOME=home,
            PREFECT_LOGGING_LEVEL="CRITICAL",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_TO_API_ENABLED="false",
            DO_NOT_TRACK="1",
        )
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks._prefect_chain", str(PREFECT_STEPS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        print(f"Prefect benchmark failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(lines[-1])
    return result
