"""The persisted flow that tests/test_save.py kills with SIGKILL mid-step (run as `python -m tests.save_flow DB LOG
BACKEND`).

One step, `upload`, sends ITEMS items, saving how many it sent after each (`ctx.save()`), then writing `SAVED n`
to a side log (appended with `os.write`, so a line written is in the file whatever happens next) and to stdout,
which the test reads to pick its moment to kill. Each attempt first logs `RESTORED n`: where it began.
"""

from __future__ import annotations

import os
import sys

import anyio

import stoppoint as sp

LEASE = 0.5
"""A short lease: the resume waits for the killed child's to expire (it holds the run until then)."""
RUN_ID = "save-crash"
ITEMS = 2000


def expected() -> int:
    return sum(range(ITEMS))


def make_flow(log_path: str, echo: bool = False) -> sp.Flow:
    flow = sp.Flow("saves")

    def note(line: str) -> None:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)
        if echo:
            sys.stdout.write(f"{line}\n")
            sys.stdout.flush()

    @flow.step
    async def upload(ctx: sp.StepContext) -> int:
        sent, total = ctx.restored(tuple[int, int], default=(0, 0))
        note(f"RESTORED {sent}")
        for i in range(sent, ITEMS):
            await ctx.checkpoint()
            total += i
            await ctx.save((i + 1, total))
            note(f"SAVED {i + 1}")
        return total

    return flow


async def run(db_path: str, log_path: str) -> sp.Completed[int] | sp.Interrupted:
    async with sp.SQLiteStore(db_path, lease=LEASE) as store:
        return await make_flow(log_path, echo=True).run(store=store, run_id=RUN_ID)


if __name__ == "__main__":
    outcome = anyio.run(run, sys.argv[1], sys.argv[2], backend=sys.argv[3])
    print(f"DONE {outcome.value if isinstance(outcome, sp.Completed) else outcome!r}", flush=True)
