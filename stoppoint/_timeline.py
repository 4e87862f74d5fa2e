"""Timeline: what happened to each step of one run, and the report built from it on demand.

A run keeps records, not reports: a pydantic model per step and per change would cost more than
the step. The report is built when somebody reads it (an outcome's `.report`, a live
`FlowRun.report`, a store after each completed step), and what can no longer change is cached.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ._outcome import Progress, RunReport, StepReport, StepStatus
from ._signal import InterruptSignal

if TYPE_CHECKING:
    from ._context import StepContext

__all__ = ["NOTHING", "StepRecord", "Timeline"]

NOTHING: frozenset[str] = frozenset()
"""The one empty set of resumed steps (`frozenset()` builds a new one each time)."""

# Reading an Enum member off its class costs ~90 ns on CPython 3.11 (a descriptor call); the
# per-step hot path reads these module globals instead.
_RUNNING = StepStatus.RUNNING
_COMPLETED = StepStatus.COMPLETED


class StepRecord:
    """What happened to one started step in one run (steps that never start get none).

    No __slots__: the class-level defaults spare the per-step hot path six attribute stores.
    """

    finished: float | None = None
    duration: float | None = None
    stopped_at: str | None = None
    error: str | None = None
    nested: Timeline | None = None  # an include step's inner run
    progress: tuple[float, float | None, str | None] | None = None  # the context's, once the step is over
    # A step with a retry policy or a timeout (_retry.py): its attempts so far, the errors of the
    # failed ones, and (when, attempt, error, delay) of each `step.retrying` (a late listener's).
    attempts = 1
    errors: list[str] | None = None
    retries: tuple[tuple[float, int, str, float], ...] | list[tuple[float, int, str, float]] = ()
    # Its end is final and was told to any listener: a listener who comes later learns it from the
    # record, and one who comes before hears it live, never both.
    told = False

    def __init__(self, started: float, ctx: StepContext | None = None) -> None:
        self.status = _RUNNING
        self.started = started  # perf_counter(); turned into wall-clock time for the report
        self.ctx = ctx  # its `_progress` goes into the report (while the step runs)

    def finish(self, status: StepStatus) -> None:
        """The step ended (not by returning, which the hot path records itself): `status`, now."""
        self.status = status
        self.finished = now = time.perf_counter()
        self.duration = now - self.started


class Timeline:
    """What a report is built from: step records, signals and times (no outputs, no tasks), so
    an outcome that builds its report lazily keeps nothing else of the run alive."""

    __slots__ = (
        "cache",
        "completed",
        "completed_times",
        "ended",
        "flow",
        "perf0",
        "records",
        "resumed",
        "run_id",
        "signals",
        "steps",
        "wall0",
    )

    def __init__(self, run_id: str, flow: str, steps: tuple[str, ...], signals: list[InterruptSignal]) -> None:
        self.resumed: frozenset[str] = NOTHING  # completed in an earlier attempt (outputs from the checkpoint)
        self.cache: dict[str, StepReport] = {}  # step reports that will not change (see step_report)
        self.run_id = run_id
        self.flow = flow
        self.steps = steps
        self.records: dict[str, StepRecord] = {}
        # Most completed steps leave only (name, started, finished) in `completed`, not a record:
        # the collector stops tracking a tuple of a str and floats, so a long chain does not grow
        # the heap every full collection traverses (a 100,000-step chain ran at half speed with
        # records), and appending to a list costs no cache miss. `completed_times` indexes it by
        # name when a report is built.
        self.completed: list[tuple[str, float, float]] = []
        self.completed_times: dict[str, tuple[float, float]] = {}
        self.signals = signals
        # One wall-clock reading per run; step times are perf_counter() offsets from it.
        self.wall0 = time.time()
        self.perf0 = time.perf_counter()
        self.ended: float | None = None

    def wall(self, t: float | None) -> datetime | None:
        """A perf_counter() reading of this run as wall-clock time."""
        return None if t is None else datetime.fromtimestamp(self.wall0 + (t - self.perf0), UTC)

    def report(self) -> RunReport:
        """Build the pydantic report (outcomes call this only when their `.report` is read; a
        `FlowRun` calls it while the run goes on, which gives PENDING and RUNNING steps, and a
        store after every completed step)."""
        completed, times = self.completed, self.completed_times
        if len(times) < len(completed):
            for name, started, ended in completed[len(times) :]:
                times[name] = (started, ended)
        return RunReport.model_construct(
            run_id=self.run_id,
            flow=self.flow,
            started_at=self.wall(self.perf0),
            finished_at=self.wall(self.ended),
            steps={name: self.step_report(name) for name in self.steps},
            interrupts=list(self.signals),
        )

    def step_report(self, name: str) -> StepReport:
        # A store builds the report after every step, and a pydantic model costs ~20 µs even
        # through model_construct: keep the reports that can no longer change.
        cached = self.cache.get(name)
        record = self.records.get(name)
        if record is None:
            times = self.completed_times.get(name)
            if times is not None:
                if cached is None or cached.started_at is None:  # (cached while it was PENDING)
                    started, finished = times
                    # The fields a record's report sets (below), so that every completed step's
                    # report has the same `model_fields_set`.
                    self.cache[name] = cached = StepReport.model_construct(
                        name=name,
                        status=StepStatus.COMPLETED,
                        started_at=self.wall(started),
                        finished_at=self.wall(finished),
                        duration_s=finished - started,
                        stopped_at=None,
                        error=None,
                        progress=None,
                        nested=None,
                    )
                return cached
            if name in self.resumed:
                status = StepStatus.COMPLETED
            else:
                status = StepStatus.PENDING if self.ended is None else StepStatus.NOT_STARTED
            if cached is None or cached.status is not status:
                self.cache[name] = cached = StepReport.model_construct(
                    name=name, status=status, resumed=name in self.resumed, attempts=int(name in self.resumed)
                )
            return cached
        if cached is not None and cached.started_at is not None:
            return cached
        progress = record.ctx._progress if record.ctx is not None else record.progress
        # model_construct: these values are ours and already valid (progress was checked when given).
        report = StepReport.model_construct(
            name=name,
            status=record.status,
            started_at=self.wall(record.started),
            finished_at=self.wall(record.finished),
            duration_s=record.duration,
            stopped_at=record.stopped_at,
            error=record.error,
            progress=None
            if progress is None
            else Progress.model_construct(done=progress[0], total=progress[1], message=progress[2]),
            nested=None if record.nested is None else record.nested.report(),
        )
        if record.errors is not None:  # a step with a retry policy or a timeout (_retry.py)
            report = report.model_copy(update={"attempts": record.attempts, "errors": list(record.errors)})
        elif record.status is StepStatus.FAILED and record.error is not None:
            report = report.model_copy(update={"errors": [record.error]})  # its one attempt
        if record.status is StepStatus.COMPLETED:  # final: nothing changes a completed step's record
            self.cache[name] = report
        return report

    def stopped_at(self) -> str | None:
        """Where the first step that stopped at a stopping point stopped, looking into includes."""
        for record in self.records.values():
            if record.status is StepStatus.INTERRUPTED and record.stopped_at is not None:
                return record.stopped_at
        return None
