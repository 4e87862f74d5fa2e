"""What a run returns: `Completed` or `Interrupted`, each with a `RunReport`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import FrozenInstanceError
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeVar, final

from pydantic import BaseModel, ConfigDict, model_validator

from ._checkpoint import Checkpoint
from ._signal import InterruptSignal

__all__ = ["Completed", "Interrupted", "Progress", "RunReport", "StepReport", "StepStatus"]

T = TypeVar("T")


class StepStatus(StrEnum):
    """Where a step stands in a run."""

    PENDING = "pending"
    """Not started yet; the run is still going (live reports only)."""
    RUNNING = "running"
    """Started and not finished (live reports only)."""
    COMPLETED = "completed"
    """Returned; its output is in the checkpoint."""
    INTERRUPTED = "interrupted"
    """Stopped at a stopping point (`StepReport.stopped_at` says where)."""
    CANCELLED = "cancelled"
    """Cancelled mid-flight: forced, or because a sibling step failed."""
    FAILED = "failed"
    """Raised an exception (`StepReport.error`)."""
    NOT_STARTED = "not_started"
    """Never started: the run stopped or failed first."""


_NOT_RUN = frozenset({"pending", "not_started", StepStatus.PENDING, StepStatus.NOT_STARTED})


class Progress(BaseModel):
    """The last progress a step reported with `ctx.progress(done, total, message)`.

    Attributes:
        done: Work done so far, in the step's own unit.
        total: The amount of work, if the step knows it.
        message: A short note for people watching.
    """

    model_config = ConfigDict(frozen=True)

    done: float
    total: float | None = None
    message: str | None = None


class StepReport(BaseModel):
    """What happened to one step.

    Attributes:
        name: The step's name.
        status: Its final (or, in a live report, current) status.
        started_at: When it started (UTC), None if it never did.
        finished_at: When it ended (UTC), None if it never started or is still running.
        duration_s: Seconds between start and end.
        stopped_at: `"file.py:LINE"` of the stopping point where an interrupted step stopped (for a
            stop in the wait between two attempts of a retried step: the step function's
            `"file.py:LINE"` followed by `" (retry wait after attempt N)"`).
        error: `"ExcType: message"` of a failed step.
        progress: The last value the step reported with `ctx.progress()`.
        nested: For a step that includes another flow (`Flow.include`), that flow's report.
        resumed: True when the step completed in an earlier attempt of the run: its output came
            from the checkpoint (`run(resume=...)` or a store) and it did not run again.
        attempts: How many times the step was tried in this attempt of the run (more than 1 only
            with a `Retry`; 0 for a step that has not started; 1 for a resumed step). Counting
            restarts at 1 when a run resumes.
        errors: `"ExcType: message"` of each failed attempt, in order (a step that failed for
            good has its last error here too, and in `error`).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    status: StepStatus
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    stopped_at: str | None = None
    error: str | None = None
    progress: Progress | None = None
    nested: RunReport | None = None
    resumed: bool = False
    attempts: int = 1
    errors: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _never_started(cls, data: Any) -> Any:
        # A report stored before `attempts` existed: a step that never started made no attempt.
        if isinstance(data, dict) and "attempts" not in data and data.get("status") in _NOT_RUN:
            data = {**data, "attempts": 0}
        return data


class RunReport(BaseModel):
    """What happened in one run, step by step (steps in declaration order).

    Attributes:
        run_id: The run's id.
        flow: The flow's name.
        started_at: When the run started (UTC).
        finished_at: When it ended (UTC); None in a live report.
        steps: Every step of the flow, by name, in declaration order.
        interrupts: Every signal the run received, in order, each once (ignored ones too).
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    flow: str
    started_at: datetime
    finished_at: datetime | None = None
    steps: dict[str, StepReport]
    interrupts: list[InterruptSignal] = []

    def _names(self, status: StepStatus) -> list[str]:
        return [name for name, step in self.steps.items() if step.status is status]

    @property
    def completed(self) -> list[str]:
        """Names of the steps that completed."""
        return self._names(StepStatus.COMPLETED)

    @property
    def stopped(self) -> list[str]:
        """Names of the steps stopped at a stopping point (`INTERRUPTED`)."""
        return self._names(StepStatus.INTERRUPTED)

    @property
    def cancelled(self) -> list[str]:
        """Names of the steps cancelled mid-flight."""
        return self._names(StepStatus.CANCELLED)

    @property
    def failed(self) -> list[str]:
        """Names of the steps that raised."""
        return self._names(StepStatus.FAILED)

    @property
    def not_started(self) -> list[str]:
        """Names of the steps that never started."""
        return self._names(StepStatus.NOT_STARTED)


class _Outcome:
    """Shared by the outcomes: frozen attributes and a report built on first use.

    A run keeps its per-step records as plain objects; turning them into pydantic reports costs
    more than running thousands of trivial steps, so that happens only when `.report` is read.
    """

    __slots__ = ("_make_report", "_report")
    _fields: ClassVar[tuple[str, ...]]
    _report: RunReport | None
    _make_report: Callable[[], RunReport] | None

    def _init_report(self, report: RunReport | Callable[[], RunReport]) -> None:
        if isinstance(report, RunReport):
            object.__setattr__(self, "_report", report)
            object.__setattr__(self, "_make_report", None)
        else:
            object.__setattr__(self, "_report", None)
            object.__setattr__(self, "_make_report", report)

    @property
    def report(self) -> RunReport:
        """What happened in the run, step by step."""
        report = self._report
        if report is None:
            assert self._make_report is not None
            report = self._make_report()
            object.__setattr__(self, "_report", report)
            object.__setattr__(self, "_make_report", None)
        return report

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    __hash__ = None  # type: ignore[assignment]  # values and reports may be unhashable

    def __reduce__(self) -> tuple[type[_Outcome], tuple[object, ...]]:
        # The frozen __setattr__ would refuse the default slot-by-slot unpickling.
        return type(self), tuple(getattr(self, f) for f in self._fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({fields})"


@final
class Completed(_Outcome, Generic[T]):
    """Every step completed.

    Frozen; matches `case Completed(value, report)`.

    Attributes:
        value: The flow's result: the output of its result step.
        report: The run's report (it lists any interrupt that arrived too late to matter).
    """

    __slots__ = ("value",)
    __match_args__ = ("value", "report")
    _fields = ("value", "report")
    value: T

    def __init__(self, value: T, report: RunReport | Callable[[], RunReport]) -> None:
        object.__setattr__(self, "value", value)
        self._init_report(report)


@final
class Interrupted(_Outcome):
    """The run was stopped by an interrupt before every step completed.

    Frozen; matches `case Interrupted(signal, report, checkpoint, forced)`.

    Attributes:
        signal: The first signal received: the one that stopped the run.
        report: Which steps completed, which stopped (and where), which never started.
        checkpoint: What a later run needs to go on: the completed steps' outputs, and the state unfinished
            steps saved (`StepContext.save()`).
        forced: True when the run was escalated before it ended (a signal with `force=True`, or
            `grace` ran out): the steps then in flight were cancelled (`CANCELLED`) instead of
            being left to reach a stopping point.
    """

    __slots__ = ("checkpoint", "forced", "signal")
    __match_args__ = ("signal", "report", "checkpoint", "forced")
    _fields = ("signal", "report", "checkpoint", "forced")
    signal: InterruptSignal
    checkpoint: Checkpoint
    forced: bool

    def __init__(
        self,
        signal: InterruptSignal,
        report: RunReport | Callable[[], RunReport],
        checkpoint: Checkpoint,
        forced: bool = False,
    ) -> None:
        object.__setattr__(self, "signal", signal)
        object.__setattr__(self, "checkpoint", checkpoint)
        object.__setattr__(self, "forced", forced)
        self._init_report(report)


StepReport.model_rebuild()  # `nested` refers to RunReport, defined after it
