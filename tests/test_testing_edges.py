"""stoppoint.testing at its edges: flows included twice, same-named flows, failing resumes, NaN, fan-outs."""

from __future__ import annotations

import math

import anyio
import pytest

import stoppoint as sp
from stoppoint.testing import check_resumable, interrupt_at, stopping_points

pytestmark = pytest.mark.anyio


async def test_a_flow_included_twice_has_every_stopping_point_tried() -> None:
    inner = sp.Flow("inner")

    @inner.step
    async def work(ctx: sp.StepContext, x: int) -> int:
        await ctx.checkpoint()
        return x

    outer = sp.Flow("outer")
    outer.include(inner, name="a")
    outer.include(inner, name="b", after="a")

    @outer.step
    async def total(a: int, b: int) -> int:
        return a + b

    points = await stopping_points(outer, {"x": 1})
    assert len(points) == 5  # a: work#0, work#1; b: work#0, work#1; total#0
    report = await check_resumable(outer, {"x": 1})
    assert report.value == 2
    assert len(set(points)) == len(points)  # each stopping point can be named apart
    assert len(report.chains) == len(report.points)  # and each one was tried


async def test_an_included_flow_named_like_the_outer_one_is_not_reported_as_rerunning() -> None:
    inner = sp.Flow("etl")

    @inner.step
    async def load() -> int:
        return 1

    outer = sp.Flow("etl")

    @outer.step(name="load")
    async def load_outer() -> int:
        return 2

    @outer.step
    async def mid(ctx: sp.StepContext, load: int) -> int:
        await ctx.checkpoint()  # interrupted here, the checkpoint holds the outer "load" completed
        return load

    outer.include(inner, name="sub", after="mid")

    @outer.step
    async def total(mid: int, sub: int) -> int:
        return mid + sub

    report = await check_resumable(outer)  # raises: "resuming ran completed step(s) again: load"
    assert report.value == 3


async def test_a_resumed_run_that_fails_names_the_stopping_point() -> None:
    flow = sp.Flow("up")
    uploaded: set[str] = set()

    @flow.step
    async def upload(ctx: sp.StepContext) -> int:
        if "report.pdf" in uploaded:
            raise FileExistsError("report.pdf already uploaded")
        uploaded.add("report.pdf")
        await ctx.checkpoint()
        return 1

    with pytest.raises(AssertionError, match=r"interrupted at up\.upload#\d"):
        await check_resumable(flow)


async def test_a_resumable_flow_with_a_nan_result_passes() -> None:
    flow = sp.Flow("stats")

    @flow.step
    async def mean(ctx: sp.StepContext) -> float:
        await ctx.checkpoint()
        return math.nan  # the mean of no values

    report = await check_resumable(flow)
    assert math.isnan(report.value)


def _fan_out_outputs(backend: str, runs: int) -> set[tuple[str, ...]]:
    """The step outputs of `runs` runs of root -> (b, c, d) -> end interrupted at d#0, on `backend`."""

    async def main() -> set[tuple[str, ...]]:
        flow = sp.Flow("fan")

        @flow.step
        async def root() -> int:
            return 1

        @flow.step
        async def b(root: int) -> int:
            return 1

        @flow.step
        async def c(root: int) -> int:
            return 2

        @flow.step
        async def d(root: int) -> int:
            return 3

        @flow.step
        async def end(b: int, c: int, d: int) -> int:
            return b + c + d

        seen = set()
        for _ in range(runs):
            outcome = await flow.run(interrupts=interrupt_at("d"))
            assert isinstance(outcome, sp.Interrupted)
            seen.add(tuple(sorted(outcome.checkpoint.outputs)))
        return seen

    return anyio.run(main, backend=backend)


async def test_interrupt_before_a_fanned_out_step_gives_the_same_checkpoint_every_time() -> None:
    # Both backends, each in a thread of its own, compared in one test (no timing involved).
    trio_seen = await anyio.to_thread.run_sync(_fan_out_outputs, "trio", 30)
    asyncio_seen = await anyio.to_thread.run_sync(_fan_out_outputs, "asyncio", 30)
    assert len(trio_seen | asyncio_seen) == 1, (trio_seen, asyncio_seen)
