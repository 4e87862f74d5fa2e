"""A long batch that stops cleanly: extract -> transform -> load over 100,000 records.

Run it with `stoppoint run examples/etl.py:etl` (Ctrl-C stops it at the next stopping point, then
`stoppoint resume RUN_ID`), or `python examples/etl.py`, which interrupts it itself once 30,000 records
are transformed and then resumes it.

`transform` loops with `ctx.iterate(rows, every=1000)`: a stopping point every 1,000 records keeps the
loop as fast as a plain `for` while a stop still lands within a thousand records. Every `SAVE_EVERY`
records it saves its position and what it made so far (`ctx.save()`, durable with a store), so a resume
goes on from the last saved position, not from record 0 (`ctx.restored()`). A save writes all it holds,
so it comes every 10,000 records here, not at every stopping point: a stop redoes at most that many.
`ctx.progress()` feeds the live display of `stoppoint run`.
"""

from __future__ import annotations

import anyio
from pydantic import BaseModel

import stoppoint as sp

etl = sp.Flow("etl")
SAVE_EVERY = 10_000  # records between two saves of `transform` (each save writes what it made so far)
# Set by `main()` to stop the run once this many records are transformed (None: never).
stop_after: int | None = None
interrupter: sp.Interrupter | None = None
# Where each attempt of `transform` began (0, then the last saved position): `main()` prints it.
began_at: list[int] = []


class Batch(BaseModel):
    """What `transform` saves: how many records it has done, and their values."""

    done: int
    out: list[int]


@etl.step
async def extract(records: int = 100_000) -> list[dict[str, int]]:
    return [{"id": i, "amount": i % 97} for i in range(records)]


@etl.step
async def transform(ctx: sp.StepContext, extract: list[dict[str, int]]) -> list[int]:
    # What an earlier attempt of this run saved (a resume's): go on from there.
    out = ctx.restored(Batch, default=Batch(done=0, out=[])).out
    began_at.append(len(out))
    async for row in ctx.iterate(extract[len(out) :], every=1000):
        out.append(row["amount"] * 2)
        if len(out) % SAVE_EVERY == 0:
            await ctx.save(Batch(done=len(out), out=out))
        if len(out) % 10_000 == 0:
            ctx.progress(len(out), len(extract), "records transformed")
            if stop_after is not None and len(out) == stop_after and interrupter is not None:
                interrupter.interrupt(f"stop after {stop_after} records", source="example")
    return out


@etl.step
async def load(ctx: sp.StepContext, transform: list[int]) -> int:
    total = 0
    async for value in ctx.iterate(transform, every=1000):
        total += value
    return total


async def main() -> tuple[sp.Interrupted | sp.Completed[int], sp.Interrupted | sp.Completed[int]]:
    """Interrupt the batch part-way through `transform`, then resume it; both outcomes."""
    global stop_after, interrupter
    began_at.clear()
    channel, receiver = sp.interrupt_channel()
    stop_after, interrupter = 30_000, channel
    with channel, receiver:
        stopped = await etl.run({"records": 100_000}, interrupts=receiver)
    stop_after = interrupter = None
    assert isinstance(stopped, sp.Interrupted)
    step = stopped.report.steps["transform"]
    print(f"stopped: transform at {step.stopped_at}, {step.progress.done if step.progress else 0:g} records in")
    resumed = await etl.run(resume=stopped.checkpoint)
    print(f"resumed: transform went on from record {began_at[-1]:,}, not from record 0")
    print(f"resumed: {type(resumed).__name__}, total {resumed.value if isinstance(resumed, sp.Completed) else '-'}")
    return stopped, resumed


if __name__ == "__main__":
    anyio.run(main)
