"""Progress events (`StepProgressEvent`, throttled per step) and stored history (`EventStore`): what a run with a
store keeps of its events, on every store and both backends. The throttle is tested on a patched clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
import structlog

import stoppoint as sp
import stoppoint._context
import stoppoint._persist
from stoppoint._events import log_event

pytestmark = pytest.mark.anyio


class Clock:
    """The progress throttle's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(stoppoint._context, "_progress_clock", fake)
    return fake


def progress_flow(clock: Clock, name: str = "progress") -> sp.Flow:
    """One step reporting at 0, 0.05, 0.08, 0.2 and 0.25 s, then a step after it."""
    flow = sp.Flow(name)

    @flow.step
    async def count(ctx: sp.StepContext) -> int:
        for done, at in enumerate((0.0, 0.05, 0.08, 0.2, 0.25), 1):
            clock.now = 100.0 + at
            ctx.progress(done, 5, f"item {done}")
            await ctx.checkpoint()
        return 5

    @flow.step
    async def after(count: int) -> int:
        return count + 1

    return flow


def names(events: list[Any]) -> list[str]:
    return [event.event for event in events]


async def test_progress_is_told_at_most_every_tenth_of_a_second_and_the_last_one_always(clock: Clock) -> None:
    events: list[sp.RunEvent] = []
    await progress_flow(clock).run(on_event=events.append)
    progress = [event for event in events if isinstance(event, sp.StepProgressEvent)]
    # 1 told; 2 and 3 too soon (3 waits, then 4 replaces it); 4 told at 0.2; 5 too soon: told at the step's end
    assert [(event.done, event.total, event.message) for event in progress] == [
        (1, 5, "item 1"),
        (4, 5, "item 4"),
        (5, 5, "item 5"),
    ]
    assert names(events)[:6] == [
        "flow.started",
        "step.started",
        "step.progress",
        "step.progress",
        "step.progress",
        "step.completed",
    ]
    assert all(event.step == "count" and event.run_id == events[0].run_id for event in progress)


async def test_a_step_whose_last_progress_was_told_tells_no_more(clock: Clock) -> None:
    flow = sp.Flow("once")

    @flow.step
    async def one(ctx: sp.StepContext) -> None:
        ctx.progress(1)

    events: list[sp.RunEvent] = []
    await flow.run(on_event=events.append)
    assert names(events) == ["flow.started", "step.started", "step.progress", "step.completed", "flow.completed"]


async def test_a_retried_step_tells_its_waiting_progress_before_it_ends(clock: Clock) -> None:
    flow = sp.Flow("retried")
    attempts = []

    @flow.step(retry=sp.Retry(attempts=2, delay=0))
    async def flaky(ctx: sp.StepContext) -> None:
        attempts.append(1)
        ctx.progress(len(attempts) * 10)
        ctx.progress(len(attempts) * 10 + 1)  # too soon: waits
        if len(attempts) == 1:
            raise ValueError("once")

    events: list[sp.RunEvent] = []
    await flow.run(on_event=events.append)
    progress = [event.done for event in events if isinstance(event, sp.StepProgressEvent)]
    assert progress[0] == 10
    assert progress[-1] == 21
    assert names(events)[-3:] == ["step.progress", "step.completed", "flow.completed"]


@pytest.mark.usefixtures("unconfigured_structlog")
async def test_without_listeners_no_progress_event_is_built(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("a progress event was built while nobody listened")

    monkeypatch.setattr(stoppoint._context, "step_progress", refuse)
    outcome = await progress_flow(clock).run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.report.steps["count"].progress == sp.Progress(done=5, total=5, message="item 5")


async def test_a_progress_event_is_logged_with_its_fields() -> None:
    event = sp.StepProgressEvent(run_id="r1", flow="f", at=datetime.now(UTC), step="a", done=2, total=4)
    with structlog.testing.capture_logs() as logs:
        log_event(event)
    assert logs == [
        {
            "event": "step.progress",
            "log_level": "info",
            "run_id": "r1",
            "flow": "f",
            "step": "a",
            "done": 2.0,
            "total": 4.0,
            "message": None,
        }
    ]


# -- stored history -------------------------------------------------------------------------------------------


def as_json(events: list[Any]) -> list[dict[str, Any]]:
    return [event.model_dump(mode="json") for event in events]


async def test_a_run_with_a_store_keeps_the_events_its_listeners_heard(clock: Clock, store: sp.Store) -> None:
    assert isinstance(store, sp.EventStore)
    heard: list[sp.RunEvent] = []
    outcome = await progress_flow(clock).run(store=store, run_id="r1", on_event=heard.append)
    assert isinstance(outcome, sp.Completed)
    stored = await store.events("progress", "r1")
    assert stored.dropped == 0
    assert as_json(stored) == as_json(heard)
    assert names(stored)[-1] == "flow.completed"
    assert [event.done for event in stored if isinstance(event, sp.StepProgressEvent)] == [1, 4, 5]


async def test_a_run_without_listeners_keeps_its_events_in_its_store(clock: Clock, store: sp.Store) -> None:
    assert isinstance(store, sp.EventStore)
    await progress_flow(clock).run(store=store, run_id="r1")
    stored = await store.events("progress", "r1")
    assert names(stored) == [
        "flow.started",
        "step.started",
        "step.progress",
        "step.progress",
        "step.progress",
        "step.completed",
        "step.started",
        "step.completed",
        "flow.completed",
    ]


async def test_a_resumed_run_appends_to_its_history(store: sp.Store) -> None:
    assert isinstance(store, sp.EventStore)
    flow = sp.Flow("resumed")
    fail = [True]

    @flow.step
    async def first() -> int:
        return 1

    @flow.step
    async def second(first: int) -> int:
        if fail[0]:
            raise ValueError("not yet")
        return first + 1

    with pytest.raises(sp.StepFailed):
        await flow.run(store=store, run_id="r1")
    fail[0] = False
    outcome = await flow.run(store=store, run_id="r1")
    assert isinstance(outcome, sp.Completed)
    stored = await store.events("resumed", "r1")
    assert names(stored) == [
        "flow.started",
        "step.started",
        "step.completed",
        "step.started",
        "step.failed",
        "flow.failed",
        "flow.started",
        "step.started",
        "step.completed",
        "flow.completed",
    ]
    started = [event for event in stored if isinstance(event, sp.FlowStartedEvent)]
    assert started[1].resumed == ("first",)


async def test_events_are_stored_while_the_run_goes_on(store: sp.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The background writer appends them as they come, so another process sees a running run's history."""
    assert isinstance(store, sp.EventStore)
    monkeypatch.setattr(stoppoint._persist, "EVENTS_INTERVAL", 0.01)
    flow = sp.Flow("watched")
    seen: list[str] = []

    @flow.step
    async def wait(ctx: sp.StepContext) -> None:
        ctx.progress(1, message="waiting to be seen")
        with anyio.fail_after(10):
            while "step.progress" not in seen:
                seen[:] = names(await store.events("watched", "r1"))
                await ctx.checkpoint()
                await anyio.sleep(0.01)

    await flow.run(store=store, run_id="r1")
    assert seen == ["flow.started", "step.started", "step.progress"]


class FailingHistory(sp.MemoryStore):
    """A store whose history cannot be written."""

    async def append_events(self, lease: sp.Lease, events: Any) -> None:
        raise sp.StoreError("no room for events")


async def test_a_store_that_cannot_keep_events_does_not_stop_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stoppoint._persist, "EVENTS_INTERVAL", 0.001)
    flow = sp.Flow("unkept")

    @flow.step
    async def slow() -> int:
        await anyio.sleep(0.02)  # the background writer tries meanwhile
        return 1

    store = FailingHistory()
    outcome = await flow.run(store=store, run_id="r1")
    assert isinstance(outcome, sp.Completed)
    assert list(await store.events("unkept", "r1")) == []
