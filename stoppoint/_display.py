"""What the `stoppoint` command shows: a live table of steps on a terminal, plain lines otherwise,
and the summary at the end."""

from __future__ import annotations

import os
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

import anyio
from rich.text import Text

from ._events import (
    FlowCompletedEvent,
    FlowFailedEvent,
    FlowInterruptedEvent,
    FlowStartedEvent,
    InterruptReceivedEvent,
    RunEvent,
    StepCompletedEvent,
    StepFailedEvent,
    StepProgressEvent,
    StepRetryingEvent,
    StepStoppedEvent,
)
from ._outcome import RunReport, StepReport, StepStatus
from ._store import RunRecord, RunStatus

if TYPE_CHECKING:
    from rich.live import Live
    from rich.table import Table

    from ._handle import FlowRun

__all__ = [
    "Display",
    "event_detail",
    "event_line",
    "lease_text",
    "print_styled",
    "printable",
    "status_style",
    "step_lines",
    "summary",
]

REFRESH_SECONDS = 0.2  # how often the live table reads the run's report (for ctx.progress)

_STYLES = {
    StepStatus.PENDING: "dim",
    StepStatus.RUNNING: "bold yellow",
    StepStatus.COMPLETED: "green",
    StepStatus.INTERRUPTED: "bold red",
    StepStatus.CANCELLED: "red",
    StepStatus.FAILED: "bold red",
    StepStatus.NOT_STARTED: "dim",
}


_RUN_STYLES = {
    RunStatus.QUEUED: "bold cyan",  # waiting for a worker
    RunStatus.RUNNING: "bold yellow",
    RunStatus.ORPHANED: "bold magenta",  # its owner died: a worker (or run()) takes it over
    RunStatus.INTERRUPTED: "red",
    RunStatus.FAILED: "bold red",
    RunStatus.COMPLETED: "green",
}


def status_style(status: RunStatus) -> str:
    """The style of a run's status in `stoppoint runs` and `show` (on a terminal)."""
    return _RUN_STYLES.get(status, "")


def lease_text(record: RunRecord, at: datetime) -> str:
    """When the run's lease expires, from `at`: `"in 12 s"`, `"expired 3 s ago"`; `"-"` without one."""
    expires = record.lease_expires_at
    if expires is None:
        return "-"
    seconds = (expires - at).total_seconds()
    return f"in {_span(seconds)}" if seconds >= 0 else f"expired {_span(-seconds)} ago"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def print_styled(out: TextIO, parts: list[tuple[str, str]]) -> None:
    """One line of (text, style) parts: styled on a terminal, plain text otherwise."""
    if not out.isatty():
        print("".join(text for text, _ in parts), file=out)
        return
    from rich.console import Console

    # Text, not markup: names are the user's, "[...]" included; soft wrap: never split a line.
    Console(file=out, soft_wrap=True, highlight=False).print(Text.assemble(*parts))


def step_lines(report: RunReport) -> list[str]:
    """One line per step of `report`: its name, status (where it stopped) and progress."""
    width = max((len(printable(name)) for name in report.steps), default=0)
    lines = []
    for name, step in report.steps.items():
        status = step.status.value + _attempts(step) + (f" at {step.stopped_at}" if step.stopped_at else "")
        progress = _progress(step)
        lines.append(f"  {printable(name):<{width}}  {status}" + (f"  {progress}" if progress else ""))
    return lines


def printable(text: str) -> str:
    """`text` as is, or quoted with its newlines and other control characters escaped (`repr`), so
    that a run id cannot break a line or a column of the output."""
    return text if text.isprintable() else repr(text)


def _attempts(step: StepReport) -> str:
    """`" (attempt N)"` of a retried step still running, `" (N attempts)"` of one that ended; "" for one attempt."""
    if step.attempts <= 1:
        return ""
    if step.status is StepStatus.RUNNING:
        return f" (attempt {step.attempts})"
    return f" ({step.attempts} attempts)"


def _progress(step: StepReport) -> str:
    if step.progress is None:
        return ""
    done, total, message = step.progress.done, step.progress.total, step.progress.message
    text = f"{done:g}/{total:g}" if total is not None else f"{done:g}"
    return f"{text} {message}" if message else text


def event_line(event: RunEvent, flow: str, time_format: str = "%H:%M:%S", *, history: bool = False) -> str:
    """One line for `event` of a run of `flow` (local time, its name, the step, what it says): as the live
    display prints the steps' events, and, with `history`, `stoppoint show --events` every event (the run's
    start, end and interrupts with what they say: the live display says it in its notes and summary)."""
    step = getattr(event, "step", None)
    detail = event_detail(event, history=history)
    where = f" {event.flow}.{step}" if step is not None and event.flow != flow else f" {step or ''}"
    return f"{event.at.astimezone().strftime(time_format)} {event.event}{where.rstrip()}{detail}"


def event_detail(event: RunEvent, *, history: bool = True) -> str:
    """What `event` says beyond its name and step, as `event_line` prints it (`" at file.py:12"`, `": error"`,
    `" 3/10 message"`; `""` for nothing); the dashboard shows the same."""
    detail = ""
    if isinstance(event, StepCompletedEvent):
        detail = f" ({event.duration_s:.2f} s)"
    elif isinstance(event, StepStoppedEvent) and event.stopped_at:
        detail = f" at {event.stopped_at}"
    elif isinstance(event, StepFailedEvent):
        detail = f": {event.error}"
    elif isinstance(event, StepRetryingEvent):
        detail = f": attempt {event.attempt} failed ({event.error}), next in {event.delay_s:.2f} s"
    elif isinstance(event, StepProgressEvent):
        done = f"{event.done:g}/{event.total:g}" if event.total is not None else f"{event.done:g}"
        detail = f" {done}" + (f" {event.message}" if event.message else "")
    elif not history:
        pass
    elif isinstance(event, FlowStartedEvent) and event.resumed:
        detail = f" (resumed: {', '.join(event.resumed)} completed before)"
    elif isinstance(event, InterruptReceivedEvent):
        detail = f" ({'forced, ' if event.signal.force else ''}{event.signal.reason})"
    elif isinstance(event, FlowInterruptedEvent):
        detail = f" ({'forced, ' if event.forced else ''}{event.signal.reason}; {event.duration_s:.2f} s)"
    elif isinstance(event, FlowFailedEvent):
        detail = f": {event.error} ({event.duration_s:.2f} s)"
    elif isinstance(event, FlowCompletedEvent):
        detail = f" ({event.duration_s:.2f} s)"
    return detail


class Display:
    """Follows one run: `async with Display(handle, out) as display: tg.start_soon(display.follow)`."""

    def __init__(self, handle: FlowRun, out: TextIO, *, ignoring: bool = False) -> None:
        self._handle = handle
        self._ignoring = ignoring  # the strategy ignores interrupts: say so, promise no stop
        self._flow = handle.flow
        self._run_id = handle.run_id
        self._out = out
        self._live: Live | None = None
        self._signals = 0

    async def __aenter__(self) -> Display:
        if self._out.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self._out), refresh_per_second=10, transient=False)
            self._live.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.update(self._table(self._handle.report))
            self._live.stop()

    async def follow(self) -> None:
        """Show the run's events until it ends (and, on a terminal, its progress as it goes)."""
        async with anyio.create_task_group() as tg:
            if self._live is not None:
                tg.start_soon(self._refresh, self._handle)
            async for event in self._handle.events():
                self._show(event)
            tg.cancel_scope.cancel()

    async def _refresh(self, handle: FlowRun) -> None:
        assert self._live is not None
        while True:
            self._live.update(self._table(handle.report))
            await anyio.sleep(REFRESH_SECONDS)

    def _show(self, event: RunEvent) -> None:
        if isinstance(event, InterruptReceivedEvent):
            self._signals += 1
            from_os = event.signal.source in ("SIGINT", "SIGTERM")  # the command's own signals
            if self._ignoring:
                self._note(f"interrupt ignored ({event.signal.reason}): the strategy is ignore, the run goes on")
            elif event.signal.force:
                press = "; press Ctrl-C again to quit without waiting for them" if from_os else ""
                self._note(f"forced: cancelling the steps in flight{press}")
            elif self._signals == 1:
                press = "; press Ctrl-C again to force" if from_os else ""
                self._note(f"stopping at the next stopping point ({event.signal.reason}){press}")
            return
        if self._live is not None:
            self._live.update(self._table(self._handle.report))
            return
        if isinstance(event, FlowStartedEvent):
            if event.resumed:
                self._line(f"resumed: {', '.join(event.resumed)} completed before, not run again")
            return
        if isinstance(event, StepProgressEvent):
            return  # (a terminal shows it in the table; lines would be many)
        self._line(event_line(event, self._flow))

    def _note(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(Text(text, style="bold"))
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        try:
            print(text, file=self._out, flush=True)
        except BrokenPipeError:
            # The reader went away (`stoppoint run ... | head`): the run goes on, unseen.
            self._out = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process

    def _table(self, report: RunReport) -> Table:
        from rich.table import Table

        # Text, not markup: a run id may hold "[...]" too.
        title = Text(f"{printable(self._flow)} - run {printable(self._run_id)}")
        table = Table(title=title, title_justify="left")
        table.add_column("step")
        table.add_column("status")
        table.add_column("progress")
        table.add_column("time", justify="right")
        for name, step in report.steps.items():
            seconds = f"{step.duration_s:.2f} s" if step.duration_s is not None else ""
            status = step.status.value + _attempts(step) + (f" at {step.stopped_at}" if step.stopped_at else "")
            # Text, not markup: names and progress messages are the user's, "[...]" included.
            table.add_row(Text(name), Text(status, style=_STYLES[step.status]), Text(_progress(step)), seconds)
        return table


def summary(report: RunReport, *, resume: str | None) -> str:
    """The end-of-run summary: what completed, what stopped where, what never started, and how
    to go on."""
    groups: dict[str, list[str]] = {}
    for name, step in report.steps.items():
        status = step.status
        if status is StepStatus.INTERRUPTED:
            label = f"{name} (at {step.stopped_at})" if step.stopped_at else name
            groups.setdefault("stopped", []).append(label)
        elif status is StepStatus.FAILED:
            after = f"after {step.attempts} attempts: " if step.attempts > 1 else ""
            groups.setdefault("failed", []).append(f"{name} ({after}{step.error})")
        elif status in (StepStatus.NOT_STARTED, StepStatus.PENDING):
            groups.setdefault("not started", []).append(name)
        else:
            groups.setdefault(status.value, []).append(name + (" (resumed)" if step.resumed else "") + _attempts(step))
    width = max((len(key) for key in groups), default=0)
    lines = ["", "summary:"]
    for key in ("completed", "stopped", "failed", "cancelled", "not started", "running"):
        if key in groups:
            lines.append(f"  {key + ':':<{width + 1}} {', '.join(groups[key])}")
    if resume is not None:
        lines.append(f"to resume: {resume}")
    return "\n".join(lines)
