"""Flows the worker CLI tests serve with `stoppoint worker tests/worker_flows.py` (not a test module).

Each step says on stdout where it is (the test reads the worker's output for it); `held` goes on once the
file `<marker>.go` exists, reaching a stopping point every 10 ms meanwhile.
"""

import anyio

import stoppoint as sp

double = sp.Flow("double")


@double.step
async def twice(n: int) -> int:
    return 2 * n


held = sp.Flow("held")


@held.step
async def first(ctx: sp.StepContext, marker: str) -> str:
    print(f"first {ctx.run_id}", flush=True)
    return marker


@held.step
async def wait(ctx: sp.StepContext, first: str) -> str:
    print(f"waiting {ctx.run_id} (epoch {ctx.epoch})", flush=True)
    polls = 0
    go = anyio.Path(first + ".go")
    while not await go.exists():
        polls += 1
        ctx.progress(polls, message="waiting for the go file")
        await ctx.checkpoint()
        await anyio.sleep(0.01)
    return "done"


stuck = sp.Flow("stuck")


@stuck.step
async def forever(ctx: sp.StepContext) -> None:
    print(f"sleeping {ctx.run_id}", flush=True)
    await anyio.sleep_forever()  # no stopping point: only a forced stop ends it
