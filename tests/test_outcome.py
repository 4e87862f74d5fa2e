"""Outcomes and reports (API.md §4)."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

import stoppoint as sp
from tests.conftest import Channel

pytestmark = pytest.mark.anyio


def test_step_status_values() -> None:
    assert [s.value for s in sp.StepStatus] == [
        "pending",
        "running",
        "completed",
        "interrupted",
        "cancelled",
        "failed",
        "not_started",
    ]
    assert sp.StepStatus("interrupted") is sp.StepStatus.INTERRUPTED


async def test_outcomes_are_frozen_and_matchable(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("f")

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(ctx: sp.StepContext, a: int) -> int:
        if ctx.run_id == "stop me":
            interrupter.interrupt("halt", source="test")
        return a + 1

    @flow.step
    async def c(b: int) -> int:
        return b + 1

    completed = await flow.run()
    interrupted = await flow.run(interrupts=receiver, run_id="stop me")

    match completed:
        case sp.Completed(value, report):
            assert value == 3
            assert report is completed.report
        case _:
            pytest.fail("a completed run must match Completed(value, report)")
    match interrupted:
        case sp.Interrupted(signal, report, checkpoint, forced):
            assert signal.reason == "halt"
            assert report.completed == ["a", "b"]
            assert report.not_started == ["c"]
            assert checkpoint.outputs == {"a": 1, "b": 2}
            assert checkpoint.flow == "f"
            assert checkpoint.flow_version == "1"
            assert forced is False
        case _:
            pytest.fail("an interrupted run must match Interrupted(signal, report, checkpoint, forced)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        completed.value = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        interrupted.forced = True  # type: ignore[misc]
    assert isinstance(interrupted, sp.Interrupted)
    assert interrupted.report.steps["c"].started_at is None
    assert interrupted.report.steps["c"].duration_s is None


async def test_report_round_trips_through_json(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("f")

    @flow.step
    async def a(ctx: sp.StepContext) -> int:
        interrupter.interrupt("halt", source="test")
        await ctx.checkpoint()
        return 1

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    text = outcome.report.model_dump_json()
    again = sp.RunReport.model_validate_json(text)
    assert again == outcome.report
    assert again.stopped == ["a"]
    assert again.interrupts[0].reason == "halt"
    assert again.steps["a"].stopped_at == outcome.report.steps["a"].stopped_at


def test_completed_is_generic() -> None:
    alias = sp.Completed[int]
    assert alias.__origin__ is sp.Completed  # type: ignore[attr-defined]


async def test_outcomes_pickle_and_copy(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("f")

    @flow.step
    async def a(ctx: sp.StepContext) -> int:
        if ctx.run_id == "stop":
            interrupter.interrupt("halt")
            await ctx.checkpoint()
        return 1

    completed = await flow.run()
    interrupted = await flow.run(interrupts=receiver, run_id="stop")
    for outcome in (completed, interrupted):
        again = pickle.loads(pickle.dumps(outcome))
        assert again == outcome
        assert again.report == outcome.report
        assert copy.copy(outcome) == outcome
    assert isinstance(interrupted, sp.Interrupted)
    assert pickle.loads(pickle.dumps(interrupted)).report.stopped == ["a"]


async def test_completed_step_reports_set_the_same_fields_with_or_without_progress() -> None:
    """Every completed step's report sets the same fields, whether or not the step reported
    progress: a report dumped with `exclude_unset=True` has the same keys for each."""
    flow = sp.Flow("fields")

    @flow.step
    async def plain() -> int:
        return 1

    @flow.step
    async def counted(ctx: sp.StepContext, plain: int) -> int:
        ctx.progress(1, 1)
        return plain + 1

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    steps = outcome.report.steps
    assert steps["plain"].status is steps["counted"].status is sp.StepStatus.COMPLETED
    assert steps["plain"].model_fields_set == steps["counted"].model_fields_set
    assert set(steps["plain"].model_dump(exclude_unset=True)) >= {"stopped_at", "error", "progress", "nested"}
