"""Retries and timeouts (API.md §11, issue 16 item 1): `sp.Retry`, `timeout=`, `sp.StepTimeout`,
`StepReport.attempts`/`.errors`, the `step.retrying` event, and how they meet interrupts.

Waits between attempts go through `stoppoint._control._sleep`, replaced here so that no test
sleeps: `instant_sleep` records the seconds and returns at once, `FakeSleep` (conftest) blocks
until released, so a test knows a step is in its retry wait without timing anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pydantic import TypeAdapter

import stoppoint as sp
from stoppoint import _display
from stoppoint._events import log_event
from stoppoint._flow import plan_of
from stoppoint.testing import interrupt_at

from .conftest import Channel, FakeSleep

pytestmark = pytest.mark.anyio


class InstantSleep:
    """The retry waits' sleep, returning at once (after one turn of the loop): records the seconds."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await anyio.lowlevel.checkpoint()


@pytest.fixture
def instant_sleep(monkeypatch: pytest.MonkeyPatch) -> InstantSleep:
    sleep = InstantSleep()
    monkeypatch.setattr("stoppoint._control._sleep", sleep)
    return sleep


def failing(times: int, exc: type[Exception] = ValueError) -> Any:
    """A step body that raises `exc` the first `times` calls, then returns the number of calls."""
    calls = 0

    async def body() -> int:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise exc(f"failure {calls}")
        return calls

    return body


# -- Retry: a frozen, validated value ----------------------------------------------------------------


def test_retry_defaults_and_frozen() -> None:
    retry = sp.Retry()
    assert (retry.attempts, retry.delay, retry.backoff, retry.max_delay, retry.jitter, retry.on) == (
        3,
        1.0,
        2.0,
        60.0,
        0.0,
        (Exception,),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.attempts = 5  # type: ignore[misc]
    assert sp.Retry(attempts=2) == sp.Retry(attempts=2)
    assert hash(sp.Retry(attempts=2)) == hash(sp.Retry(attempts=2))
    assert sp.Retry(on=OSError).on == (OSError,)  # one class is taken as a tuple of it


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"attempts": 0}, ValueError, "attempts"),
        ({"attempts": -1}, ValueError, "attempts"),
        ({"attempts": 2.0}, TypeError, "attempts"),
        ({"attempts": True}, TypeError, "attempts"),
        ({"delay": -1}, ValueError, "delay"),
        ({"delay": float("nan")}, ValueError, "delay"),
        ({"delay": "1"}, TypeError, "delay"),
        ({"backoff": 0.5}, ValueError, "backoff"),
        ({"max_delay": -0.1}, ValueError, "max_delay"),
        ({"max_delay": float("inf")}, ValueError, "max_delay"),
        ({"jitter": 1.5}, ValueError, "jitter"),
        ({"jitter": -0.1}, ValueError, "jitter"),
        ({"on": [ValueError]}, TypeError, "on"),
        ({"on": ()}, TypeError, "on"),
        ({"on": (KeyboardInterrupt,)}, TypeError, "on"),
        ({"on": (sp.StopRequested,)}, TypeError, "on"),
        ({"on": ("ValueError",)}, TypeError, "on"),
    ],
)
def test_bad_retry_arguments_name_the_field(kwargs: dict[str, Any], error: type[Exception], field: str) -> None:
    with pytest.raises(error, match=rf"Retry\({field}=\)"):
        sp.Retry(**kwargs)


def test_computed_delays_backoff_and_max_delay() -> None:
    retry = sp.Retry(attempts=6, delay=1.0, backoff=2.0, max_delay=5.0)
    assert [retry.wait(k) for k in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert [sp.Retry(delay=0.5, backoff=1.0, max_delay=None).wait(k) for k in (1, 2, 3)] == [0.5, 0.5, 0.5]
    assert sp.Retry(delay=0).wait(3) == 0.0


def test_jitter_spreads_each_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    retry = sp.Retry(delay=2.0, backoff=1.0, jitter=0.5)
    for drawn, expected in ((0.0, 1.0), (0.5, 2.0), (0.75, 2.5)):
        monkeypatch.setattr("stoppoint._retry._random", lambda drawn=drawn: drawn)
        assert retry.wait(1) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retry": 3}, "retry= must be a stoppoint.Retry"),
        ({"timeout": 0}, "timeout= must be > 0"),
        ({"timeout": -1.0}, "timeout= must be > 0"),
        ({"timeout": "1"}, "timeout= must be None or a number"),
        ({"timeout": float("nan")}, "timeout= must be > 0"),
    ],
)
def test_bad_retry_or_timeout_on_a_flow_or_step(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(sp.FlowDefinitionError, match=match):
        sp.Flow("bad", **kwargs)
    flow = sp.Flow("bad")
    with pytest.raises(sp.FlowDefinitionError, match=rf"flow 'bad', step 'a': {match}"):

        @flow.step(**kwargs)
        async def a() -> None: ...


def test_flow_defaults_a_step_own_wins_and_none_opts_out() -> None:
    default = sp.Retry(attempts=2)
    own = sp.Retry(attempts=5)
    flow = sp.Flow("defaults", retry=default, timeout=10.0)

    @flow.step
    async def inherits() -> None: ...

    @flow.step(retry=own, timeout=1.5)
    async def overrides() -> None: ...

    @flow.step(retry=None, timeout=None)
    async def opts_out() -> None: ...

    @flow.step(retry=None)
    async def keeps_timeout() -> None: ...

    specs = plan_of(flow).specs
    assert (specs["inherits"].retry, specs["inherits"].timeout, specs["inherits"].guarded) == (default, 10.0, True)
    assert (specs["overrides"].retry, specs["overrides"].timeout) == (own, 1.5)
    assert (specs["opts_out"].retry, specs["opts_out"].timeout, specs["opts_out"].guarded) == (None, None, False)
    assert (specs["keeps_timeout"].retry, specs["keeps_timeout"].timeout) == (None, 10.0)


# -- retrying ----------------------------------------------------------------------------------------


async def test_a_failing_step_is_retried_until_it_succeeds(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("retried")
    body = failing(2)
    events: list[sp.RunEvent] = []

    @flow.step(retry=sp.Retry(attempts=3, delay=1.0, backoff=3.0))
    async def flaky() -> int:
        return await body()  # type: ignore[no-any-return]

    @flow.step
    async def after(flaky: int) -> int:
        return flaky * 10

    outcome = await flow.run(on_event=events.append)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 30
    step = outcome.report.steps["flaky"]
    assert (step.status, step.attempts, step.error) == (sp.StepStatus.COMPLETED, 3, None)
    assert step.errors == ["ValueError: failure 1", "ValueError: failure 2"]
    assert instant_sleep.calls == [1.0, 3.0]
    assert outcome.report.steps["after"].attempts == 1
    assert outcome.report.steps["after"].errors == []
    retrying = [event for event in events if isinstance(event, sp.StepRetryingEvent)]
    assert [(e.step, e.attempt, e.error, e.delay_s) for e in retrying] == [
        ("flaky", 1, "ValueError: failure 1", 1.0),
        ("flaky", 2, "ValueError: failure 2", 3.0),
    ]
    names = [(event.event, getattr(event, "step", None)) for event in events]
    assert names[1:5] == [
        ("step.started", "flaky"),
        ("step.retrying", "flaky"),
        ("step.retrying", "flaky"),
        ("step.completed", "flaky"),
    ]


async def test_jittered_waits_through_a_run(instant_sleep: InstantSleep, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stoppoint._retry._random", lambda: 1.0)  # the top of the spread
    flow = sp.Flow("jitter")
    body = failing(3)

    @flow.step(retry=sp.Retry(attempts=4, delay=1.0, backoff=2.0, max_delay=3.0, jitter=0.1))
    async def flaky() -> int:
        return await body()  # type: ignore[no-any-return]

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert instant_sleep.calls == pytest.approx([1.1, 2.2, 3.3])


async def test_attempts_run_out_the_step_fails_with_every_error(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("exhausted")
    events: list[sp.RunEvent] = []

    @flow.step(retry=sp.Retry(attempts=3, delay=0.5, backoff=1.0))
    async def never() -> None:
        raise ValueError("no")

    with pytest.raises(sp.StepFailed) as info:
        await flow.run(on_event=events.append)
    assert isinstance(info.value.__cause__, ValueError)
    step = info.value.report.steps["never"]
    assert (step.status, step.attempts, step.error) == (sp.StepStatus.FAILED, 3, "ValueError: no")
    assert step.errors == ["ValueError: no"] * 3
    assert instant_sleep.calls == [0.5, 0.5]  # no wait after the last attempt
    assert [e.attempt for e in events if isinstance(e, sp.StepRetryingEvent)] == [1, 2]


async def test_only_errors_matching_on_are_retried(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("filtered")
    calls: list[str] = []

    @flow.step(retry=sp.Retry(attempts=5, delay=0, on=(ConnectionError, TimeoutError)))
    async def picky() -> None:
        calls.append("x")
        if len(calls) == 1:
            raise ConnectionResetError("reset")  # a ConnectionError: retried
        raise KeyError("bug")  # not retried

    with pytest.raises(sp.StepFailed) as info:
        await flow.run()
    step = info.value.report.steps["picky"]
    assert (step.attempts, step.errors) == (2, ["ConnectionResetError: reset", "KeyError: 'bug'"])
    assert len(calls) == 2


async def test_a_step_with_one_attempt_is_not_retried(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("once")

    @flow.step(retry=sp.Retry(attempts=1))
    async def once() -> None:
        raise ValueError("once")

    with pytest.raises(sp.StepFailed) as info:
        await flow.run()
    assert info.value.report.steps["once"].attempts == 1
    assert instant_sleep.calls == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
async def test_keyboard_interrupt_and_system_exit_are_never_retried(
    instant_sleep: InstantSleep, exc: type[BaseException]
) -> None:
    flow = sp.Flow("fatal")
    calls = 0

    @flow.step(retry=sp.Retry(attempts=3, delay=0))
    async def fatal() -> None:
        nonlocal calls
        calls += 1
        raise exc()

    with pytest.raises(exc):
        await flow.run()
    assert calls == 1
    assert instant_sleep.calls == []


async def test_stop_requested_raised_unasked_is_a_failure_not_retried(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("unasked")
    calls = 0

    @flow.step(retry=sp.Retry(attempts=3, delay=0))
    async def rogue() -> None:
        nonlocal calls
        calls += 1
        raise sp.StopRequested("rogue")

    with pytest.raises(sp.StepFailed):
        await flow.run()
    assert calls == 1


async def test_a_stray_cancelled_error_on_asyncio_is_a_failure_not_retried(
    anyio_backend: str, instant_sleep: InstantSleep
) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("asyncio only: a CancelledError raised while nobody cancelled")
    flow = sp.Flow("stray")
    calls = 0

    @flow.step(retry=sp.Retry(attempts=3, delay=0))
    async def stray() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError()

    with pytest.raises(sp.StepFailed):
        await flow.run()
    assert calls == 1


async def test_an_exception_group_is_retried_as_a_whole(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("group")
    calls = 0

    @flow.step(retry=sp.Retry(attempts=2, delay=0))
    async def fan_out() -> int:
        nonlocal calls
        calls += 1

        async def fail() -> None:
            raise ValueError("inner")

        if calls == 1:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fail)
        return calls

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 2
    assert outcome.report.steps["fan_out"].errors[0].startswith("ExceptionGroup")


async def test_iterate_generators_are_closed_between_attempts(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("closing")
    closed: list[int] = []
    attempt = 0

    def numbers(n: int) -> Any:
        try:
            yield from range(10)
        finally:
            closed.append(n)

    @flow.step(retry=sp.Retry(attempts=2, delay=0))
    async def loop(ctx: sp.StepContext) -> int:
        nonlocal attempt
        attempt += 1
        async for item in ctx.iterate(numbers(attempt)):
            if attempt == 1 and item == 3:
                raise ValueError("midway")
        return attempt

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert closed == [1, 2]


async def test_flow_defaults_apply_and_none_opts_out_at_run_time(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("flow-defaults", retry=sp.Retry(attempts=2, delay=0.25))
    first, second = failing(1), failing(1)

    @flow.step
    async def inherits() -> int:
        return await first()  # type: ignore[no-any-return]

    @flow.step(retry=None)
    async def opts_out(inherits: int) -> int:
        return await second()  # type: ignore[no-any-return]

    with pytest.raises(sp.StepFailed) as info:
        await flow.run()
    steps = info.value.report.steps
    assert (steps["inherits"].status, steps["inherits"].attempts) == (sp.StepStatus.COMPLETED, 2)
    assert (steps["opts_out"].status, steps["opts_out"].attempts) == (sp.StepStatus.FAILED, 1)
    assert steps["opts_out"].errors == ["ValueError: failure 1"]
    assert instant_sleep.calls == [0.25]


# -- the wait is a stopping point ----------------------------------------------------------------------


async def test_an_interrupt_during_the_wait_stops_the_step_at_once(fake_sleep: FakeSleep, channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("wait-stop")
    events: list[sp.RunEvent] = []

    @flow.step(retry=sp.Retry(attempts=3, delay=3600.0, max_delay=None))
    async def flaky() -> None:  # no ctx, no checkpoint: the wait is its only stopping point
        raise ValueError("down")

    @flow.step
    async def later(flaky: None) -> None: ...

    outcome: sp.Completed[Any] | sp.Interrupted | None = None

    async def run() -> None:
        nonlocal outcome
        outcome = await flow.run(interrupts=receiver, on_event=events.append)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await fake_sleep.entered.wait()  # in the wait after attempt 1 (an hour: never released)
        interrupter.interrupt("enough")
    assert isinstance(outcome, sp.Interrupted)
    assert not outcome.forced
    step = outcome.report.steps["flaky"]
    assert (step.status, step.attempts, step.errors) == (sp.StepStatus.INTERRUPTED, 1, ["ValueError: down"])
    assert step.stopped_at is not None
    assert step.stopped_at.startswith("test_retry.py:")
    assert step.stopped_at.endswith("(retry wait after attempt 1)")
    assert outcome.report.steps["later"].status is sp.StepStatus.NOT_STARTED
    assert outcome.report.steps["later"].attempts == 0
    assert fake_sleep.calls == [3600.0]
    stopped = [event for event in events if isinstance(event, sp.StepStoppedEvent)]
    assert [event.stopped_at for event in stopped] == [step.stopped_at]


async def test_interrupt_at_the_wait_stops_before_sleeping(fake_sleep: FakeSleep) -> None:
    """The wait is a stopping point stoppoint.testing counts: 1 is the first (the step has no checkpoint)."""
    flow = sp.Flow("probe")

    @flow.step(retry=sp.Retry(attempts=3, delay=1.0))
    async def flaky() -> None:
        raise ValueError("down")

    outcome = await flow.run(interrupts=interrupt_at("flaky", 1))
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.steps["flaky"].status is sp.StepStatus.INTERRUPTED
    assert fake_sleep.calls == []


async def test_a_stop_requested_during_the_attempt_stops_at_the_wait(fake_sleep: FakeSleep) -> None:
    """An interrupt the attempt did not stop for (inside a shield) stops the step at the wait,
    without waiting."""
    flow = sp.Flow("earlier")

    @flow.step(retry=sp.Retry(attempts=3, delay=1.0))
    async def flaky(ctx: sp.StepContext) -> None:
        async with ctx.shield():
            await ctx.checkpoint()  # stopping point 1: interrupted here, but shielded
        raise ValueError("down")

    outcome = await flow.run(interrupts=interrupt_at("flaky", 1))
    assert isinstance(outcome, sp.Interrupted)
    step = outcome.report.steps["flaky"]
    assert (step.status, step.attempts) == (sp.StepStatus.INTERRUPTED, 1)
    assert fake_sleep.calls == []


@pytest.mark.parametrize("strategy", [sp.FinishCurrent(), sp.PollNextN(0), sp.IgnoreInterruptions()])
async def test_strategies_that_let_steps_finish_let_the_retries_go_on(
    instant_sleep: InstantSleep, strategy: sp.Strategy
) -> None:
    flow = sp.Flow("finish")
    body = failing(2)

    @flow.step(retry=sp.Retry(attempts=3, delay=1.0))
    async def flaky() -> int:
        return await body()  # type: ignore[no-any-return]

    outcome = await flow.run(interrupts=interrupt_at("flaky", 1), strategy=strategy)
    step = outcome.report.steps["flaky"]
    assert (step.status, step.attempts) == (sp.StepStatus.COMPLETED, 3)
    assert instant_sleep.calls == [1.0, 2.0]


async def test_a_forced_interrupt_during_the_wait_cancels_the_step(fake_sleep: FakeSleep, channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("forced")

    @flow.step(retry=sp.Retry(attempts=3, delay=3600.0, max_delay=None))
    async def flaky() -> None:
        raise ValueError("down")

    outcome: sp.Completed[Any] | sp.Interrupted | None = None

    async def run() -> None:
        nonlocal outcome
        outcome = await flow.run(interrupts=receiver, strategy=sp.FinishCurrent())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await fake_sleep.entered.wait()
        interrupter.interrupt("now", force=True)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    step = outcome.report.steps["flaky"]
    assert (step.status, step.attempts, step.errors) == (sp.StepStatus.CANCELLED, 1, ["ValueError: down"])


async def test_grace_running_out_cancels_a_retrying_step(channel: Channel, monkeypatch: pytest.MonkeyPatch) -> None:
    """FinishCurrent lets the retries go on; the end of `grace` cancels the step in its wait."""
    interrupter, receiver = channel
    waits: list[float] = []
    in_wait, grace_over = anyio.Event(), anyio.Event()

    async def sleep(seconds: float) -> None:  # the retry wait (3600) blocks; the grace timer (5) ends on cue
        waits.append(seconds)
        if seconds == 3600.0:
            in_wait.set()
            await anyio.Event().wait()
        await grace_over.wait()

    monkeypatch.setattr("stoppoint._control._sleep", sleep)
    flow = sp.Flow("grace")

    @flow.step(retry=sp.Retry(attempts=3, delay=3600.0, max_delay=None))
    async def flaky() -> None:
        raise ValueError("down")

    outcome: sp.Completed[Any] | sp.Interrupted | None = None

    async def run() -> None:
        nonlocal outcome
        outcome = await flow.run(interrupts=receiver, strategy=sp.FinishCurrent(), grace=5.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await in_wait.wait()
        interrupter.interrupt("please")
        await anyio.lowlevel.checkpoint()
        grace_over.set()
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    assert outcome.report.steps["flaky"].status is sp.StepStatus.CANCELLED
    assert sorted(waits) == [5.0, 3600.0]


async def test_attempts_restart_at_one_on_resume(fake_sleep: FakeSleep) -> None:
    flow = sp.Flow("resume")
    body = failing(1)

    @flow.step(retry=sp.Retry(attempts=3, delay=1.0))
    async def flaky() -> int:
        return await body()  # type: ignore[no-any-return]

    first = await flow.run(interrupts=interrupt_at("flaky", 1))
    assert isinstance(first, sp.Interrupted)
    assert first.report.steps["flaky"].attempts == 1
    again = await flow.run(resume=first.checkpoint)
    assert isinstance(again, sp.Completed)
    step = again.report.steps["flaky"]
    assert (step.attempts, step.errors, again.value) == (1, [], 2)


# -- timeouts ----------------------------------------------------------------------------------------


async def test_an_attempt_over_its_timeout_fails_with_step_timeout() -> None:
    flow = sp.Flow("timeout")
    cancelled = False

    @flow.step(timeout=0.01)
    async def slow() -> None:
        nonlocal cancelled
        try:
            await anyio.Event().wait()
        finally:
            cancelled = True

    with pytest.raises(sp.StepFailed) as info:
        await flow.run()
    cause = info.value.__cause__
    assert isinstance(cause, sp.StepTimeout)
    assert isinstance(cause, TimeoutError)
    assert isinstance(cause, sp.StoppointError)
    assert (cause.step, cause.seconds) == ("slow", 0.01)
    assert cancelled
    step = info.value.report.steps["slow"]
    assert step.status is sp.StepStatus.FAILED
    assert step.error is not None
    assert step.error.startswith("StepTimeout: step 'slow'")
    assert (step.attempts, len(step.errors)) == (1, 1)


async def test_a_timed_out_attempt_is_retried(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("timeout-retried")
    calls = 0

    @flow.step(retry=sp.Retry(attempts=3, delay=0.5, on=(TimeoutError,)), timeout=0.01)
    async def slow_once() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.Event().wait()
        return calls

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 2
    step = outcome.report.steps["slow_once"]
    assert step.attempts == 2
    assert step.errors[0].startswith("StepTimeout:")
    assert instant_sleep.calls == [0.5]


async def test_a_timeout_not_matching_on_is_not_retried(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("timeout-not-retried")

    @flow.step(retry=sp.Retry(attempts=3, delay=0, on=(ValueError,)), timeout=0.01)
    async def slow() -> None:
        await anyio.Event().wait()

    with pytest.raises(sp.StepFailed) as info:
        await flow.run()
    assert isinstance(info.value.__cause__, sp.StepTimeout)
    assert info.value.report.steps["slow"].attempts == 1


async def test_a_shield_delays_the_timeout() -> None:
    flow = sp.Flow("shielded-timeout")
    finished_shield = False

    @flow.step(timeout=0.01)
    async def critical(ctx: sp.StepContext) -> str:
        nonlocal finished_shield
        deadline = anyio.current_time() + 0.05
        async with ctx.shield():
            while anyio.current_time() < deadline:  # past the timeout, inside the shield
                await anyio.lowlevel.checkpoint()
            finished_shield = True
        await anyio.lowlevel.checkpoint()  # the first await after the block: cancelled here
        return "not reached"

    with pytest.raises(sp.StepFailed) as info:
        await flow.run()
    assert finished_shield
    assert isinstance(info.value.__cause__, sp.StepTimeout)


async def test_the_timeout_is_per_attempt_and_flow_wide_by_default(instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("flow-timeout", timeout=30.0)

    @flow.step
    async def quick() -> int:
        return 1

    @flow.step(timeout=None)
    async def unbounded(quick: int) -> int:
        return quick + 1

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 2
    assert outcome.report.steps["quick"].attempts == 1


# -- reports, events, the command's display -----------------------------------------------------------


def test_stored_reports_without_attempts_still_load() -> None:
    old = {
        "name": "a",
        "status": "completed",
        "duration_s": 1.0,
    }
    assert (sp.StepReport.model_validate(old).attempts, sp.StepReport.model_validate(old).errors) == (1, [])
    assert sp.StepReport.model_validate({"name": "b", "status": "not_started"}).attempts == 0
    assert sp.StepReport.model_validate({"name": "b", "status": "pending"}).attempts == 0


def test_the_retrying_event_reads_back_and_logs(capsys: pytest.CaptureFixture[str]) -> None:
    event = sp.StepRetryingEvent(
        run_id="r", flow="f", at="2026-01-01T00:00:00Z", step="s", attempt=2, error="ValueError: x", delay_s=1.5
    )
    again = TypeAdapter(sp.Event).validate_json(event.model_dump_json())
    assert again == event
    assert event.model_dump(exclude={"event", "at"}) == {
        "run_id": "r",
        "flow": "f",
        "step": "s",
        "attempt": 2,
        "error": "ValueError: x",
        "delay_s": 1.5,
    }
    log_event(event)  # structlog: the name as the event, the fields as key-values


async def test_a_late_listener_hears_the_retries(fake_sleep: FakeSleep) -> None:
    flow = sp.Flow("late")

    @flow.step(retry=sp.Retry(attempts=2, delay=7.0))
    async def flaky() -> None:
        raise ValueError("down")

    async with anyio.create_task_group() as tg:
        run = await flow.start(tg)
        await fake_sleep.entered.wait()
        stream = run.events()  # opened late: the retry so far is rebuilt from the run's records
        fake_sleep.released.set()
        seen = [event async for event in stream]
        with pytest.raises(sp.StepFailed):
            await run.outcome()
    retrying = [event for event in seen if isinstance(event, sp.StepRetryingEvent)]
    assert [(event.attempt, event.delay_s) for event in retrying] == [(1, 7.0)]


def test_the_display_shows_attempts_above_one() -> None:
    report = sp.RunReport(
        run_id="r",
        flow="f",
        started_at="2026-01-01T00:00:00Z",
        steps={
            "once": sp.StepReport(name="once", status=sp.StepStatus.COMPLETED),
            "thrice": sp.StepReport(name="thrice", status=sp.StepStatus.COMPLETED, attempts=3),
            "again": sp.StepReport(name="again", status=sp.StepStatus.RUNNING, attempts=2),
            "broken": sp.StepReport(name="broken", status=sp.StepStatus.FAILED, attempts=4, error="ValueError: x"),
        },
    )
    lines = _display.step_lines(report)
    assert lines[0].split() == ["once", "completed"]
    assert "completed (3 attempts)" in lines[1]
    assert "running (attempt 2)" in lines[2]
    text = _display.summary(report, resume=None)
    assert "thrice (3 attempts)" in text
    assert "once," in text
    assert "once (" not in text
    assert "broken (after 4 attempts: ValueError: x)" in text


async def test_the_event_lines_show_a_retry(fake_sleep: FakeSleep) -> None:
    out = io.StringIO()
    flow = sp.Flow("lines")
    fake_sleep.released.set()

    @flow.step(retry=sp.Retry(attempts=2, delay=2.0))
    async def flaky() -> None:
        raise ValueError("down")

    async with anyio.create_task_group() as tg:
        run = await flow.start(tg)
        async with _display.Display(run, out) as display:
            await display.follow()
        with pytest.raises(sp.StepFailed):
            await run.outcome()
    assert "step.retrying flaky: attempt 1 failed (ValueError: down), next in 2.00 s" in out.getvalue()


# -- with a store --------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def a_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        yield sp.MemoryStore()
    else:
        async with sp.SQLiteStore(tmp_path / "runs.db") as sqlite:
            yield sqlite


async def test_retries_with_a_store_leave_no_stale_failure(a_store: sp.Store, fake_sleep: FakeSleep) -> None:
    flow = sp.Flow("stored")
    body = failing(1)

    @flow.step
    async def first() -> int:
        return 1

    @flow.step(retry=sp.Retry(attempts=2, delay=1.0))
    async def flaky(first: int) -> int:
        return first + await body()  # type: ignore[no-any-return]

    async with anyio.create_task_group() as tg:
        run = await flow.start(tg, store=a_store, run_id="r1")
        await fake_sleep.entered.wait()  # attempt 1 failed: what does the store say meanwhile?
        stored = await a_store.load("stored", "r1")
        assert stored is not None
        assert stored.record.status is sp.RunStatus.RUNNING
        assert sp.RunReport.model_validate_json(stored.report_json).steps["flaky"].status is not sp.StepStatus.FAILED
        fake_sleep.released.set()
        outcome = await run.outcome()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 3
    stored = await a_store.load("stored", "r1")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.COMPLETED
    report = sp.RunReport.model_validate_json(stored.report_json)
    step = report.steps["flaky"]
    assert (step.status, step.attempts, step.errors) == (sp.StepStatus.COMPLETED, 2, ["ValueError: failure 1"])
    assert flow.load_checkpoint(stored.checkpoint_json).outputs == {"first": 1, "flaky": 3}


async def test_a_step_failing_for_good_with_a_store(a_store: sp.Store, instant_sleep: InstantSleep) -> None:
    flow = sp.Flow("stored-failure")

    @flow.step(retry=sp.Retry(attempts=3, delay=0))
    async def never() -> None:
        raise ValueError("no")

    with pytest.raises(sp.StepFailed):
        await flow.run(store=a_store, run_id="r2")
    stored = await a_store.load("stored-failure", "r2")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.FAILED
    step = sp.RunReport.model_validate_json(stored.report_json).steps["never"]
    assert (step.status, step.attempts, step.errors) == (sp.StepStatus.FAILED, 3, ["ValueError: no"] * 3)
