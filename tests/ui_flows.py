"""Flows the dashboard's browser test (tests/test_ui_browser.py) runs with `stoppoint worker tests/ui_flows.py`
(not a test module).

`spin`: a short first step, then `turn`, which goes round reaching a stopping point each turn (reporting its turn
count as progress, and saving it so that a resumed run goes on counting) until its release file exists, then a
short last step. `publish`: a flow that fails in its second step, so that the runs list has a failed run too.
"""

import anyio

import stoppoint as sp

spin = sp.Flow("spin")


@spin.step
async def prepare(release: str) -> str:
    return release


@spin.step
async def turn(ctx: sp.StepContext, prepare: str) -> int:
    turns = ctx.restored(int, 0)  # a resumed run goes on from the count its last attempt saved
    release = anyio.Path(prepare)
    while not await release.exists():
        turns += 1
        ctx.progress(turns, message="turns, until the release file exists")
        await ctx.save(turns)
        await ctx.checkpoint()  # the stopping point: an interrupt stops the run here (the test finds this line)
        await anyio.sleep(0.02)  # a turn's (simulated) work
    return turns


@spin.step
async def finish(turn: int) -> str:
    return f"released after {turn} turns"


publish = sp.Flow("publish")


@publish.step
async def render(pages: int) -> list[str]:
    return [f"page-{number}.html" for number in range(pages)]


@publish.step
async def upload(render: list[str]) -> int:
    raise ConnectionError(f"the bucket refused {render[0]}: 403 Forbidden")
