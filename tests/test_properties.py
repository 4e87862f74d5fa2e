"""Property tests (issue 7): random flows, strategies and interrupt points, resumed until they complete.

Invariants: every run ends Completed or Interrupted (nothing hangs, no exception group leaks); after
resuming, the value is the uninterrupted one; each step completes exactly once over the whole chain;
and no report shows a step started before the steps it waits for completed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stoppoint as sp
from stoppoint.testing import interrupt_at, stopping_points

pytestmark = pytest.mark.anyio

# CI: the same examples every run (a failure there reproduces here).
PROFILE = settings(
    max_examples=40,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)

STARTED_STATUSES = {sp.StepStatus.COMPLETED, sp.StepStatus.RUNNING, sp.StepStatus.INTERRUPTED, sp.StepStatus.FAILED}


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[list[int]], list[int], sp.Strategy, list[int]]:
    """A random DAG of 1-12 steps (each waits for some earlier ones), how many checkpoints each step
    passes, a strategy, and where to interrupt each run of the chain (indexes into its stopping
    points, taken modulo their number; the chain ends with an uninterrupted run)."""
    size = draw(st.integers(1, 12))
    deps = [draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else [] for i in range(size)]
    checkpoints = draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
    strategy = draw(
        st.one_of(
            st.just(sp.AtCheckpoint()),
            st.just(sp.FinishCurrent()),
            st.builds(sp.PollNextN, st.integers(0, 3)),
            st.just(sp.IgnoreInterruptions()),
        )
    )
    interrupts = draw(st.lists(st.integers(0, 200), min_size=1, max_size=3))
    return deps, checkpoints, strategy, interrupts


def build(deps: list[list[int]], checkpoints: list[int], completions: dict[str, int]) -> sp.Flow:
    """s0..sN: s_i returns i + the sum of what it waits for, after `checkpoints[i]` checkpoints."""
    flow = sp.Flow("random")
    for i, waits in enumerate(deps):
        flow.step(name=f"s{i}")(_body(i, [f"s{d}" for d in waits], checkpoints[i], completions))
    return flow


def _body(i: int, inputs: list[str], checkpoints: int, completions: dict[str, int]) -> Callable[..., Any]:
    async def body(ctx: sp.StepContext, **values: int) -> int:
        for _ in range(checkpoints):
            await ctx.checkpoint()
        completions[ctx.step] = completions.get(ctx.step, 0) + 1
        return i + sum(values.values())

    parameters = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=sp.StepContext)]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=int) for name in inputs]
    body.__signature__ = inspect.Signature(parameters, return_annotation=int)  # type: ignore[attr-defined]
    return body


def check_report(report: sp.RunReport, deps: list[list[int]]) -> None:
    for i, waits in enumerate(deps):
        if report.steps[f"s{i}"].status in STARTED_STATUSES:
            for d in waits:
                assert report.steps[f"s{d}"].status is sp.StepStatus.COMPLETED, (i, d, report)


@PROFILE
@given(case=cases())
async def test_random_flows_resume_to_the_uninterrupted_value(
    case: tuple[list[list[int]], list[int], sp.Strategy, list[int]],
) -> None:
    deps, checkpoints, strategy, interrupts = case
    baseline_completions: dict[str, int] = {}
    baseline_flow = build(deps, checkpoints, baseline_completions)
    points = await stopping_points(baseline_flow)
    expected = await baseline_flow.run()
    assert isinstance(expected, sp.Completed)

    completions: dict[str, int] = {}
    flow = build(deps, checkpoints, completions)
    checkpoint: sp.Checkpoint | None = None
    outcome: sp.Completed[Any] | sp.Interrupted | None = None
    for index in [*interrupts, None]:
        source = None
        if index is not None:
            point = points[index % len(points)]
            source = interrupt_at(point.step, point.n)
        if checkpoint is None:
            outcome = await flow.run(interrupts=source, strategy=strategy)
        else:
            outcome = await flow.run(resume=checkpoint, interrupts=source, strategy=strategy)
        assert isinstance(outcome, sp.Completed | sp.Interrupted)
        check_report(outcome.report, deps)
        if isinstance(outcome, sp.Completed):
            break
        checkpoint = flow.load_checkpoint(outcome.checkpoint.to_json())
    assert isinstance(outcome, sp.Completed)  # the last run of the chain has no interrupt
    assert outcome.value == expected.value
    assert completions == dict.fromkeys((f"s{i}" for i in range(len(deps))), 1)
