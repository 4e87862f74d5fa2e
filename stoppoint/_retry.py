"""Retries and timeouts (API.md §11): `Retry`, and the slow path of a step that has either.

A step without a retry policy or a timeout never comes here: `Run.run_step` branches once, on
`StepSpec.guarded`, and its own path stays as it was. A guarded step always gets a context (handed
to the step only if it asks for one), so that an interrupt reaches the wait between two attempts
even in a step without stopping points of its own.

Rules:

* `attempts` counts every try. An attempt fails with an exception matching `on` (an `Exception`
  subclass; an `ExceptionGroup` matches as a whole) and attempts are left: it is recorded in the
  step's `errors`, `step.retrying` is told, and the step waits `delay` before the next attempt.
  `StopRequested`, cancellation, `KeyboardInterrupt` and `SystemExit` are never retried.
* The wait is a stopping point. A stop requested before it or during it (by the strategy, as for
  `ctx.checkpoint()`: `AtCheckpoint` stops there, `FinishCurrent`, `PollNextN` and
  `IgnoreInterruptions` let the retries go on) ends the step `INTERRUPTED` at once: the interrupt
  cancels the wait. A forced signal or the end of `grace` cancels it like any await (`CANCELLED`).
* `timeout` bounds each attempt: a cancel scope with that deadline around the attempt (shields
  delay it), which then fails with `StepTimeout`, retried like any error when `on` matches it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from . import _control
from ._context import StepContext
from ._control import cancellation_in_effect
from ._errors import StepTimeout, StopRequested
from ._observers import step_ended, step_retrying, step_started
from ._outcome import StepStatus
from ._timeline import StepRecord

if TYPE_CHECKING:
    from ._executor import Run
    from ._plan import StepSpec

__all__ = ["Retry", "run_guarded"]

_random: Callable[[], float] = random.random
"""The jitter's random source, in [0, 1); tests replace it."""


def _seconds(field: str, value: object, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"Retry({field}=): must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Retry({field}=): must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Retry:
    """How a step is tried again when it fails: `@flow.step(retry=sp.Retry(attempts=3))`.

    The wait before attempt `k + 1` (after `k` failed attempts) is
    `min(delay * backoff ** (k - 1), max_delay)`, then spread by `jitter`: multiplied by a random
    factor in `[1 - jitter, 1 + jitter]`. The wait is a stopping point.

    Args:
        attempts: How many tries in all (an int >= 1; 1 means no retry).
        delay: Seconds before the second attempt (>= 0).
        backoff: Factor applied to the delay after each failed attempt (>= 1).
        max_delay: Upper bound of a wait before jitter, in seconds (None: no bound).
        jitter: Relative spread of each wait, from 0 (none) to 1.
        on: The exception classes that are retried (subclasses of `Exception`; `StepTimeout`
            and `TimeoutError` included when given). Others fail the step at once.

    Raises:
        TypeError: A field has the wrong type (the message names it).
        ValueError: A field is out of range (the message names it).
    """

    attempts: int = 3
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float | None = 60.0
    jitter: float = 0.0
    on: tuple[type[Exception], ...] = (Exception,)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"Retry(attempts=): must be an int >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"Retry(attempts=): must be an int >= 1, got {self.attempts!r}")
        object.__setattr__(self, "delay", _seconds("delay", self.delay))
        backoff = _seconds("backoff", self.backoff)
        assert backoff is not None
        if backoff < 1:
            raise ValueError(f"Retry(backoff=): must be >= 1, got {self.backoff!r}")
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "max_delay", _seconds("max_delay", self.max_delay, allow_none=True))
        jitter = _seconds("jitter", self.jitter)
        assert jitter is not None
        if jitter > 1:
            raise ValueError(f"Retry(jitter=): must be between 0 and 1, got {self.jitter!r}")
        object.__setattr__(self, "jitter", jitter)
        on = self.on
        if isinstance(on, type):
            on = (on,)
        if not isinstance(on, tuple) or not on:
            raise TypeError(f"Retry(on=): must be a non-empty tuple of exception classes, got {self.on!r}")
        for cls in on:
            if not isinstance(cls, type) or not issubclass(cls, Exception):
                raise TypeError(
                    f"Retry(on=): {cls!r} is not an Exception subclass (StopRequested, cancellation, "
                    "KeyboardInterrupt and SystemExit are never retried)"
                )
        object.__setattr__(self, "on", on)

    def wait(self, failed: int) -> float:
        """Seconds to wait after `failed` failed attempts (>= 1), jitter included."""
        seconds = self.delay * self.backoff ** (failed - 1) if self.delay else 0.0
        if self.max_delay is not None and seconds > self.max_delay:
            seconds = self.max_delay
        if self.jitter and seconds:
            seconds *= 1 + self.jitter * (2 * _random() - 1)
        return seconds


def check_timeout(where: str, timeout: object) -> float | None:
    """`timeout=` of a step or a flow: None, or a number of seconds > 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{where}: timeout= must be None or a number of seconds, got {timeout!r}")
    if not (timeout > 0) or math.isnan(timeout):
        raise ValueError(f"{where}: timeout= must be > 0 seconds, got {timeout!r}")
    return float(timeout)


class _GuardedContext(StepContext):
    """The context of a guarded step: an interrupt that asks it to stop also cuts its retry wait short."""

    __slots__ = ("_wake",)
    _wake: anyio.CancelScope | None  # the retry wait's scope, while it waits

    def _request_stop(self) -> None:
        super()._request_stop()
        wake = self._wake
        if wake is not None:
            wake.cancel()


def _location(fn: Callable[..., Any]) -> str:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return getattr(fn, "__qualname__", repr(fn))
    return f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"


async def _retry_wait(ctx: _GuardedContext, seconds: float, where: str) -> None:
    """The stopping point between two attempts: wait `seconds`, unless a stop comes first."""
    if ctx._probe is not None:
        ctx._probe()  # stoppoint.testing: a stopping point like a checkpoint (may interrupt here)
    if not ctx._stop:
        with anyio.CancelScope() as scope:
            ctx._wake = scope
            try:
                await _control._sleep(seconds)
            finally:
                ctx._wake = None
    if ctx._stop:
        raise StopRequested(where)


def _retried(group: BaseExceptionGroup[Any], retry: Retry) -> bool:
    """An exception group is retried as a whole: an `ExceptionGroup` (no stop, no cancellation in
    it) that `on` matches."""
    return isinstance(group, Exception) and isinstance(group, retry.on)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def run_guarded(run: Run, name: str, spec: StepSpec, kwargs: dict[str, Any]) -> bool:
    """Run step `name` of `run` under its retry policy and timeout; True if it completed."""
    fn = spec.fn
    assert fn is not None
    retry: Retry | None = spec.retry
    timeout: float | None = spec.timeout
    attempts = retry.attempts if retry is not None else 1
    control = run.control
    started = perf_counter()
    ctx: _GuardedContext = _GuardedContext._for_step(run.run_id, run.name, name, started)  # type: ignore[assignment]
    ctx._wake = None
    if control.epoch:
        ctx._epoch = control.epoch
    if control.probe is not None:
        ctx._probe = control.probe.counter(run.path, run.name, name)
    if spec.context_param is not None:
        kwargs[spec.context_param] = ctx
    running = control.running
    running.add(ctx)
    run.records[name] = record = StepRecord(started, ctx)
    errors: list[str] = []
    retries: list[tuple[float, int, str, float]] = []
    record.errors, record.retries = errors, retries
    tell = run.observers.tell
    if tell is not None:
        tell(step_started(run.timeline, name, started))
    cancelled_exc = run.cancelled_exc
    where = _location(fn)
    attempt = 0
    try:
        while True:
            attempt += 1
            record.attempts = attempt
            ctx._attempt(run)  # restored() gives what the attempts before this one saved
            error: BaseException | None = None
            try:
                if timeout is None:
                    value = await fn(**kwargs)
                else:
                    with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
                        value = await fn(**kwargs)
                    if scope.cancelled_caught:
                        if cancellation_in_effect():
                            await anyio.lowlevel.checkpoint()  # cancelled from outside too: that wins
                        raise StepTimeout(name, timeout)
            except StopRequested as stop:
                run.stopped(name, record, ctx, stop, stop)
                return False
            except cancelled_exc as exc:
                if cancelled_exc is asyncio.CancelledError and not cancellation_in_effect():
                    run.failed(name, record, exc)  # raised while nobody cancelled: a failure, not retried
                    return False
                record.finish(StepStatus.CANCELLED)
                raise
            except BaseExceptionGroup as group:
                if retry is None or attempt >= attempts or not _retried(group, retry):
                    run.ended_in_group(name, record, ctx, group)
                    return False
                error = group
            except Exception as exc:
                if retry is None or attempt >= attempts or not isinstance(exc, retry.on):
                    run.failed(name, record, exc)
                    return False
                error = exc
            except BaseException as exc:
                run.fatal_error(record, exc)
                return False
            else:
                now = perf_counter()
                record.status = StepStatus.COMPLETED
                record.finished = now
                record.duration = now - started
                run.outputs[name] = value
                if run.progress:
                    run.progress.pop(name, None)  # its saved state is dropped: its output replaces it
                if run.persist:
                    await run.commit_step(name)
                if ctx._shielded and cancellation_in_effect():
                    control.close()
                return True
            # A retried failure: record it, clean up the attempt, then wait (a stopping point).
            assert retry is not None
            text = _error_text(error)
            errors.append(text)
            if ctx._open:
                await run.close_iterations(name, record, ctx)
                if record.status is StepStatus.FAILED:
                    return False
            seconds = retry.wait(attempt)
            at = perf_counter()
            retries.append((at, attempt, text, seconds))
            tell = run.observers.tell
            if tell is not None:
                tell(step_retrying(run.timeline, name, at, attempt, text, seconds))
            try:
                await _retry_wait(ctx, seconds, f"{where} (retry wait after attempt {attempt})")
            except StopRequested as stop:
                run.stopped(name, record, ctx, stop, stop)
                return False
            except cancelled_exc:
                record.finish(StepStatus.CANCELLED)
                raise
    finally:
        running.discard(ctx)
        if ctx._open and record.status is not StepStatus.COMPLETED:
            await run.close_iterations(name, record, ctx)
        if record.status is StepStatus.FAILED and record.error is not None and len(errors) < attempt:
            errors.append(record.error)  # the last attempt's error (the others' are there already)
        record.progress = ctx._progress
        record.ctx = None
        record.told = True
        tell = run.observers.tell
        if tell is not None:
            ctx._tell_progress(run, True)  # a progress event that waited: the last one
            tell(step_ended(run.timeline, name, record))
