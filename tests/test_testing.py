"""stoppoint.testing: interrupt at a named stopping point, count them, check resumability (issue 7)."""

from __future__ import annotations

import pytest

import stoppoint as sp
from stoppoint.testing import (
    StoppingPoint,
    check_resumable,
    count_stopping_points,
    interrupt_at,
    stopping_points,
)

from .conftest import line_after, statuses

pytestmark = pytest.mark.anyio


def pipeline() -> tuple[sp.Flow, dict[str, int]]:
    """load -> (double, square) -> total; `double` has three checkpoints. `runs` counts step starts."""
    flow = sp.Flow("pipeline")
    runs: dict[str, int] = {}

    def ran(name: str) -> None:
        runs[name] = runs.get(name, 0) + 1

    @flow.step
    async def load(n: int) -> list[int]:
        ran("load")
        return list(range(n))

    @flow.step
    async def double(ctx: sp.StepContext, load: list[int]) -> list[int]:
        ran("double")
        out = []
        async for x in ctx.iterate(load):  # a stopping point before each of the 3 items
            out.append(2 * x)
        return out

    @flow.step
    async def square(ctx: sp.StepContext, load: list[int]) -> list[int]:
        ran("square")
        await ctx.checkpoint()
        return [x * x for x in load]

    @flow.step
    async def total(double: list[int], square: list[int]) -> int:
        ran("total")
        return sum(double) + sum(square)

    return flow, runs


async def test_interrupt_at_the_stopping_point_before_a_step_keeps_it_from_starting() -> None:
    flow, runs = pipeline()
    outcome = await flow.run({"n": 3}, interrupts=interrupt_at("total"))
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.source == "test"
    assert statuses(outcome.report)["total"] is sp.StepStatus.NOT_STARTED
    assert set(outcome.checkpoint.outputs) == {"load", "double", "square"}
    assert "total" not in runs


async def test_interrupt_at_a_numbered_checkpoint_stops_the_step_exactly_there() -> None:
    flow = sp.Flow("counted")
    passed: list[int] = []
    lines: list[int] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        for i in range(1, 6):
            lines.append(line_after())
            await ctx.checkpoint()
            passed.append(i)

    for _ in range(5):  # every time, on either backend
        passed.clear()
        outcome = await flow.run(interrupts=interrupt_at("work", 3))
        assert isinstance(outcome, sp.Interrupted)
        assert passed == [1, 2]
        assert outcome.report.steps["work"].stopped_at == f"test_testing.py:{lines[0]}"


async def test_stopping_points_are_one_before_each_step_and_one_per_checkpoint() -> None:
    flow, _ = pipeline()
    points = await stopping_points(flow, {"n": 3})
    assert sorted(points) == sorted(
        [StoppingPoint("pipeline", "load", 0)]
        + [StoppingPoint("pipeline", "double", n) for n in range(4)]  # 0, then one per item
        + [StoppingPoint("pipeline", "square", n) for n in range(2)]
        + [StoppingPoint("pipeline", "total", 0)]
    )
    assert await count_stopping_points(flow, {"n": 3}) == 8
    assert points[0] == StoppingPoint("pipeline", "load", 0)
    assert points[-1] == StoppingPoint("pipeline", "total", 0)


async def test_a_well_behaved_flow_resumes_to_the_same_value_from_every_stopping_point() -> None:
    flow, _ = pipeline()
    report = await check_resumable(flow, {"n": 3}, max_chain=2)
    assert report.value == (0 + 2 + 4) + (0 + 1 + 4)
    assert len(report.points) == 8
    assert set(report.chains) == set(report.points)
    assert all(chain[0] == point for point, chain in report.chains.items())
    assert max(len(chain) for chain in report.chains.values()) == 2
    assert report.runs > 8


async def test_a_flow_whose_result_depends_on_running_twice_is_caught_with_its_stopping_point() -> None:
    flow = sp.Flow("leaky")
    sent: dict[str, set[str]] = {}  # the remote side, by run id: the parts it already has

    @flow.step
    async def upload(ctx: sp.StepContext) -> list[str]:
        done = sent.setdefault(ctx.run_id, set())
        this_attempt = []
        async for part in ctx.iterate(["a", "b"]):
            if part not in done:  # skips what an earlier attempt of this run sent ...
                done.add(part)
                this_attempt.append(part)
        return this_attempt  # ... but reports only this attempt's parts: wrong once resumed

    # Every chain is the uninterrupted run again (same run id), whose parts the remote side has: a
    # resumed upload sends nothing and reports nothing. The message names the whole chain.
    with pytest.raises(AssertionError) as caught:
        await check_resumable(flow)
    assert str(caught.value) == (
        "flow 'leaky', interrupted at leaky.upload#0, then leaky.upload#1, then leaky.upload#2: "
        "resumed to [], but the uninterrupted run gave ['a', 'b']"
    )
    sent.clear()
    with pytest.raises(AssertionError, match=r"^flow 'leaky', interrupted at leaky\.upload#0: resumed to \[\]"):
        await check_resumable(flow, max_chain=1)


async def test_points_inside_included_flows_are_named_by_their_flow() -> None:
    inner = sp.Flow("inner")

    @inner.step
    async def work(ctx: sp.StepContext) -> int:
        await ctx.checkpoint()
        return 1

    outer = sp.Flow("outer")
    outer.include(inner, name="sub")

    @outer.step
    async def work2(sub: int) -> int:
        return sub + 1

    points = await stopping_points(outer)
    assert points == [
        StoppingPoint("inner", "work", 0, ("sub",)),
        StoppingPoint("inner", "work", 1, ("sub",)),
        StoppingPoint("outer", "work2", 0),
    ]
    assert [str(point) for point in points] == ["sub/inner.work#0", "sub/inner.work#1", "outer.work2#0"]
    outcome = await outer.run(interrupts=interrupt_at("work", 1, flow="inner"))
    assert isinstance(outcome, sp.Interrupted)
    assert statuses(outcome.report)["sub"] is sp.StepStatus.INTERRUPTED
    report = await check_resumable(outer)
    assert report.value == 2


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="checkpoint must be an int >= 0, got -1"):
        interrupt_at("a", -1)
    with pytest.raises(ValueError, match="step must be a step's name"):
        interrupt_at("")
    flow, _ = pipeline()
    with pytest.raises(ValueError, match="max_chain must be an int >= 1, got 0"):
        await check_resumable(flow, {"n": 1}, max_chain=0)


async def test_interrupt_at_a_step_the_flow_lacks_is_refused_before_the_run() -> None:
    """A misspelt step would never be reached: the run refuses it instead of completing unnoticed."""
    flow, runs = pipeline()
    with pytest.raises(
        ValueError, match=r"interrupt_at\('dubble'\): flow 'pipeline' has no step 'dubble' \(its steps: "
    ):
        await flow.run({"n": 1}, interrupts=interrupt_at("dubble"))
    assert runs == {}
    inner = sp.Flow("inner")

    @inner.step
    async def work() -> int:
        return 1

    outer = sp.Flow("outer")
    outer.include(inner, name="sub")
    with pytest.raises(ValueError, match="'sub' is an include step of flow 'outer', which has no stopping point"):
        await outer.run(interrupts=interrupt_at("sub"))
    with pytest.raises(ValueError, match="has no step 'work' in flow 'outer'"):
        await outer.run(interrupts=interrupt_at("work", flow="outer"))
    assert isinstance(await outer.run(interrupts=interrupt_at("work", flow="inner")), sp.Interrupted)
