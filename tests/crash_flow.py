"""The persisted flow that tests/test_crash.py kills with SIGKILL (run as `python -m tests.crash_flow DB LOG`).

21 steps: two chains of ten (`s00 -> s02 -> ... -> s18` and `s01 -> s03 -> ... -> s19`, so two steps are in
flight at a time) joined by `total`. Every step writes `START name pid` and `END name pid` to a side log
(appended with `os.write`, so a line written is in the file whatever happens to the process next) and to
stdout, which the test reads to pick its moment to kill. Arguments: the store's path, the log's, the backend.
"""

from __future__ import annotations

import os
import sys

import anyio
import anyio.lowlevel

import stoppoint as sp

LEASE = 0.5
"""A short lease: the resume waits for the killed child's to expire (it holds the run until then)."""
RUN_ID = "crash-test"
STEPS = [f"s{i:02d}" for i in range(20)]


def expected_total() -> int:
    """What an uninterrupted run returns."""
    values: dict[int, int] = {}
    for i in range(20):
        values[i] = i * i + (values[i - 2] if i >= 2 else 0)
    return values[18] + values[19]


def make_flow(log_path: str, echo: bool) -> sp.Flow:
    """A fresh definition of the flow (each process builds its own), logging to `log_path`."""
    flow = sp.Flow("crash", max_concurrency=2)

    def note(event: str, name: str) -> None:
        line = f"{event} {name} {os.getpid()}\n"
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()

    for i, name in enumerate(STEPS):

        async def step(ctx: sp.StepContext, _i: int = i, **previous: int) -> int:
            note("START", ctx.step)
            for _ in range(300):  # some work, with stopping points, so kills land mid-step too
                await ctx.checkpoint()
                await anyio.lowlevel.checkpoint()
            value = _i * _i + sum(previous.values())
            note("END", ctx.step)
            return value

        waits = [STEPS[i - 2]] if i >= 2 else []
        step.__signature__ = _signature(waits)  # type: ignore[attr-defined]
        flow.step(name=name)(step)

    @flow.step
    async def total(ctx: sp.StepContext, s18: int, s19: int) -> int:
        note("START", "total")
        note("END", "total")
        return s18 + s19

    return flow


def _signature(waits: list[str]) -> object:
    import inspect

    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=sp.StepContext)]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=int) for name in waits]
    return inspect.Signature(params, return_annotation=int)


async def run(db_path: str, log_path: str, echo: bool) -> sp.Completed[int] | sp.Interrupted:
    async with sp.SQLiteStore(db_path, lease=LEASE) as store:
        return await make_flow(log_path, echo).run(store=store, run_id=RUN_ID)


if __name__ == "__main__":
    outcome = anyio.run(run, sys.argv[1], sys.argv[2], True, backend=sys.argv[3])
    print(f"DONE {outcome.value if isinstance(outcome, sp.Completed) else outcome!r}", flush=True)
