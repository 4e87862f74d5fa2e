"""The dashboard's pages (`stoppoint ui`), rendered on the server as HTML: the runs list and one run's page.

Pure functions of what `_ui` read from the store: no I/O here. Every text from the store goes through
`escape` (run ids, step names, errors and reasons are the users' text). Each page has a `#live` part, which
`dashboard.js` fetches again every second (`?part=live`) and swaps in piece by piece (`data-part`), so that a
running run moves without a reload and a button is not replaced under the pointer unless its run changed.

No inline style nor script: the pages are served with a Content-Security-Policy that allows neither; the
timeline's bars are SVG rectangles, positioned by attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from urllib.parse import urlencode

from ._display import event_detail, lease_text
from ._events import RunEvent
from ._outcome import RunReport, StepReport, StepStatus
from ._signal import InterruptSignal
from ._store import RunRecord, RunStatus

__all__ = [
    "ACTIONS",
    "SAID",
    "RunView",
    "RunsView",
    "error_page",
    "run_live",
    "run_page",
    "runs_live",
    "runs_page",
]

SHOWN_RUNS = 500  # rows of the runs list; the filters find the others
SHOWN_EVENTS = 300  # rows of a run's events (newest first); a store keeps up to 1,000

ACTIONS = ("interrupt", "force", "resume")
"""The buttons of a run page, each a POST to `run/ACTION`."""

SAID: dict[str, tuple[str, str]] = {
    # what a button did, shown once on the page it leads back to (`?said=CODE`: codes, never free text,
    # so that a crafted link cannot make the page say anything else): (css class, text)
    "interrupt": ("ok", "Asked its owner to stop it at its next stopping point."),
    "force": ("ok", "Asked its owner to stop it now, cancelling its steps in flight."),
    "marked": ("ok", "Nobody was running it: marked interrupted."),
    "resume": ("ok", "Queued: a worker serving this flow will resume it from its completed steps."),
    "nothing": ("warn", "Nothing to stop: the run has ended and nobody holds it."),
    "completed": ("warn", "Nothing to resume: the run has completed."),
    "owned": ("warn", "Not queued: its owner's lease is live (interrupt it first, or wait for it to end)."),
    "gone": ("warn", "The run is no longer in the store."),
}

_STOPPABLE = {RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.ORPHANED}
_RESUMABLE = {RunStatus.INTERRUPTED, RunStatus.FAILED, RunStatus.ORPHANED}


@dataclass(frozen=True)
class RunsView:
    """What the runs list shows."""

    base: str  # the app's root path: links start with it
    runs: Sequence[RunRecord]  # filtered, newest first
    total: int  # how many matched the filters (runs holds the first SHOWN_RUNS)
    flows: Sequence[str]  # every flow of the store, for the filter
    flow: str | None
    status: RunStatus | None
    now: datetime
    store: str


@dataclass(frozen=True)
class RunView:
    """What a run's page shows."""

    base: str
    record: RunRecord
    report: RunReport
    events: Sequence[RunEvent] | None  # None: the store keeps no history
    dropped: int
    labels: Mapping[str, str]
    can_control: bool  # a Store (leases, interrupts, queues), not a BasicStore
    csrf: str
    said: str | None
    now: datetime
    store: str
    progress_events: bool = False  # list the step.progress events (?progress=1); else count them


# -- the frame -----------------------------------------------------------------------------------------------


def _page(base: str, title: str, crumbs: str, live: str, store: str, *, follow: bool = True) -> str:
    base = escape(base)  # the root path: a Mount("/{tenant}") takes it from the request
    badge = '<span id="connection" class="badge" title="live updates, every second">live</span>' if follow else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · stoppoint</title>"
        f'<link rel="stylesheet" href="{base}/static/dashboard.css">'
        f'<script src="{base}/static/dashboard.js" defer></script>'
        "</head><body>"
        f'<header><a class="brand" href="{base}/">stoppoint</a>{crumbs}'
        f'<span class="store" title="the store">{escape(store)}</span>{badge}</header>'
        f'<main id="live"{" data-follow" if follow else ""}>{live}</main></body></html>\n'
    )


def error_page(base: str, status: int, title: str, message: str) -> str:
    """A page that says what went wrong (a run that is not there, a store that cannot be read...)."""
    body = f'<section data-part="error"><h1>{escape(title)}</h1><p class="error">{escape(message)}</p></section>'
    return _page(base, title, f'<span class="crumb">{status}</span>', body, "", follow=False)


def _time(at: datetime | None) -> str:
    if at is None:
        return '<span class="dim">-</span>'
    utc = at.astimezone(UTC)
    return f'<time datetime="{utc.isoformat()}">{utc.strftime("%Y-%m-%d %H:%M:%S")}</time>'


def _badge(status: str) -> str:
    return f'<span class="badge s-{escape(status)}">{escape(status.replace("_", " "))}</span>'


def _run_href(base: str, flow: str, run_id: str, **extra: str) -> str:
    return f"{escape(base)}/run?{escape(urlencode({'flow': flow, 'id': run_id, **extra}))}"


# -- the runs list -------------------------------------------------------------------------------------------


def runs_page(view: RunsView) -> str:
    """The runs list: filters, then the live table."""
    return _page(view.base, "runs", "", runs_live(view), view.store)


def runs_live(view: RunsView) -> str:
    """The runs list's live part: the filters (kept as chosen) and the table."""
    flows = "".join(
        f'<option value="{escape(name)}"{" selected" if name == view.flow else ""}>{escape(name)}</option>'
        for name in view.flows
    )
    statuses = "".join(
        f'<option value="{status.value}"{" selected" if status is view.status else ""}>{status.value}</option>'
        for status in RunStatus
    )
    filters = (
        f'<form class="filters" method="get" action="{escape(view.base)}/" data-part="filters">'
        f'<label>flow <select name="flow" data-autosubmit><option value="">all</option>{flows}</select></label>'
        f'<label>status <select name="status" data-autosubmit><option value="">all</option>{statuses}</select>'
        '</label><noscript><button type="submit">filter</button></noscript></form>'
    )
    rows = "".join(_run_row(view, record) for record in view.runs)
    shown = f"{len(view.runs)} of {view.total}" if view.total > len(view.runs) else str(view.total)
    head = (
        "<tr><th>status</th><th>flow</th><th>run</th><th>owner</th><th>lease</th><th>epoch</th><th>queue</th>"
        "<th>started (UTC)</th><th>updated (UTC)</th><th>finished (UTC)</th></tr>"
    )
    empty = '<tr><td colspan="10" class="dim">no runs</td></tr>' if not view.runs else ""
    table = (
        f'<section data-part="runs"><h1>Runs <span class="count" id="run-count">{shown}</span></h1>'
        f'<table class="runs"><thead>{head}</thead><tbody>{rows}{empty}</tbody></table></section>'
    )
    return filters + table


def _run_row(view: RunsView, record: RunRecord) -> str:
    href = _run_href(view.base, record.flow, record.run_id)
    return (
        f'<tr data-run="{escape(record.run_id)}" data-status="{record.status.value}">'
        f"<td>{_badge(record.status.value)}</td><td>{escape(record.flow)}</td>"
        f'<td><a class="run-link" href="{href}">{escape(record.run_id)}</a></td>'
        f"<td>{escape(record.owner or '-')}</td><td>{escape(lease_text(record, view.now))}</td>"
        f"<td>{record.epoch}</td><td>{escape(record.queue or '-')}</td>"
        f"<td>{_time(record.started_at)}</td><td>{_time(record.updated_at)}</td><td>{_time(record.finished_at)}</td>"
        "</tr>"
    )


# -- one run -------------------------------------------------------------------------------------------------


def run_page(view: RunView) -> str:
    """A run's page: its head, buttons, steps as a timeline, interrupts and events."""
    crumbs = (
        f'<span class="crumb">{escape(view.record.flow)}</span><span class="crumb">{escape(view.record.run_id)}</span>'
    )
    return _page(view.base, f"{view.record.flow} {view.record.run_id}", crumbs, run_live(view), view.store)


def run_live(view: RunView) -> str:
    """A run's live part."""
    record = view.record
    said = ""
    if view.said in SAID:
        kind, text = SAID[view.said]
        said = f'<p class="said {kind}" id="said" data-part="said">{escape(text)}</p>'
    return (
        said
        + _run_head(view)
        + _actions(view)
        + _timeline(view.report, view.now)
        + _interrupts(view.report.interrupts)
        + _attempts(view)
        + _events(view)
        + f'<p class="dim" data-part="flow-version">flow version {escape(record.flow_version)}</p>'
    )


def _run_head(view: RunView) -> str:
    record = view.record
    cells = [
        ("status", f'<span id="run-status" data-status="{record.status.value}">{_badge(record.status.value)}</span>'),
        ("owner", escape(record.owner or "-")),
        ("lease", escape(lease_text(record, view.now))),
        ("epoch", str(record.epoch)),
        ("queue", escape(record.queue or "-")),
        ("started", _time(record.started_at)),
        ("updated", _time(record.updated_at)),
        ("finished", _time(record.finished_at)),
    ]
    cells += [(f"label {key}", escape(value)) for key, value in view.labels.items()]
    rows = "".join(f"<tr><th>{escape(name)}</th><td>{value}</td></tr>" for name, value in cells)
    return (
        f'<section data-part="head"><h1>Run {escape(record.run_id)} <span class="dim">of flow</span> '
        f'{escape(record.flow)}</h1><table class="head">{rows}</table></section>'
    )


def _actions(view: RunView) -> str:
    record = view.record
    if not view.can_control:
        return (
            '<section data-part="actions"><p class="dim">This store keeps no leases (a store of stoppoint 0.1): '
            "it cannot interrupt nor queue runs.</p></section>"
        )
    enabled = {
        "interrupt": record.status in _STOPPABLE,
        "force": record.status in _STOPPABLE,
        "resume": record.status in _RESUMABLE,
    }
    titles = {
        "interrupt": "stop it at its next stopping point",
        "force": "stop it now: cancel its steps in flight",
        "resume": "queue it for a worker, which resumes it from its completed steps",
    }
    hidden = (
        f'<input type="hidden" name="flow" value="{escape(record.flow)}">'
        f'<input type="hidden" name="id" value="{escape(record.run_id)}">'
        f'<input type="hidden" name="csrf" value="{escape(view.csrf)}">'
    )
    forms = "".join(
        f'<form method="post" action="{escape(view.base)}/run/{action}">{hidden}'
        f'<button type="submit" id="{action}" class="action {action}" title="{titles[action]}"'
        f"{'' if enabled[action] else ' disabled'}>{action}</button></form>"
        for action in ACTIONS
    )
    # The status is part of the piece: the buttons are replaced when (and only when) the run's status changes.
    return f'<section class="actions" data-part="actions" data-status="{record.status.value}">{forms}</section>'


def _timeline(report: RunReport, now: datetime) -> str:
    starts = [step.started_at for step in _all_steps(report) if step.started_at is not None]
    # the axis of this attempt: steps completed in an earlier one (resumed) show no bar
    start = min(starts) if starts else report.started_at
    end = report.finished_at or now
    ends = [step.finished_at for step in _all_steps(report) if step.finished_at is not None]
    end = max([end, *ends, *starts])
    span = max((end - start).total_seconds(), 1e-3)
    rows = "".join(_step_rows(report, start, span, now, depth=0))
    head = (
        "<tr><th>step</th><th>status</th><th>timeline</th><th>progress</th><th>started (UTC)</th>"
        "<th>finished (UTC)</th><th>duration</th><th>attempts</th><th>stopped at / error</th></tr>"
    )
    return (
        f'<section data-part="steps"><h2>Steps</h2><table class="steps"><thead>{head}</thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


def _all_steps(report: RunReport) -> list[StepReport]:
    steps = []
    for step in report.steps.values():
        steps.append(step)
        if step.nested is not None:
            steps += _all_steps(step.nested)
    return steps


def _step_rows(report: RunReport, start: datetime, span: float, now: datetime, depth: int) -> list[str]:
    rows = []
    for name, step in report.steps.items():
        rows.append(_step_row(name, step, start, span, now, depth))
        if step.nested is not None:
            rows += _step_rows(step.nested, start, span, now, depth + 1)
    return rows


def _step_row(name: str, step: StepReport, start: datetime, span: float, now: datetime, depth: int) -> str:
    status = step.status.value
    bar = ""
    if step.started_at is not None:
        ended = step.finished_at or (now if step.status is StepStatus.RUNNING else step.started_at)
        x = min(max(0.0, (step.started_at - start).total_seconds() / span * 1000), 996.0)
        width = max(4.0, (ended - step.started_at).total_seconds() / span * 1000)
        bar = f'<rect class="bar s-{status}" x="{x:.1f}" y="1" width="{min(width, 1000 - x):.1f}" height="8"/>'
    timeline = f'<svg class="timeline" viewBox="0 0 1000 10" preserveAspectRatio="none">{bar}</svg>'
    progress = _progress(step)
    note = ""
    if step.stopped_at:
        note = f'<span class="stopped-at">stopped at {escape(step.stopped_at)}</span>'
    if step.error:
        note += f'<span class="error">{escape(step.error)}</span>'
    errors = "".join(f"<li>{escape(error)}</li>" for error in step.errors)
    if errors:
        summary = f"{len(step.errors)} failed attempt{'s' if len(step.errors) > 1 else ''}"
        note += f'<details class="errors"><summary>{summary}</summary><ul>{errors}</ul></details>'
    duration = f"{step.duration_s:.2f} s" if step.duration_s is not None else ""
    resumed = ' <span class="dim" title="completed in an earlier attempt of the run">(resumed)</span>'
    return (
        f'<tr class="step depth-{min(depth, 4)}" data-step="{escape(name)}" data-status="{status}">'
        f'<td class="name">{escape(name)}{resumed if step.resumed else ""}</td><td>{_badge(status)}</td>'
        f"<td>{timeline}</td><td>{progress}</td><td>{_time(step.started_at)}</td><td>{_time(step.finished_at)}</td>"
        f"<td>{duration}</td><td>{step.attempts if step.started_at is not None else ''}</td><td>{note}</td></tr>"
    )


def _progress(step: StepReport) -> str:
    progress = step.progress
    if progress is None:
        return ""
    done = f"{progress.done:g}"
    if progress.total is not None:
        meter = f'<progress max="{progress.total:g}" value="{min(progress.done, progress.total):g}"></progress>'
        done = f"{done}/{progress.total:g}"
    else:
        meter = ""
    message = f' <span class="message">{escape(progress.message)}</span>' if progress.message else ""
    return f'{meter}<span class="done">{escape(done)}</span>{message}'


def _interrupts(interrupts: Sequence[InterruptSignal]) -> str:
    if not interrupts:
        return '<section data-part="interrupts"></section>'
    rows = "".join(
        f"<tr><td>{_time(signal.sent_at)}</td><td>{escape(signal.reason)}</td>"
        f"<td>{'forced' if signal.force else 'graceful'}</td><td>{escape(signal.source or '-')}</td></tr>"
        for signal in interrupts
    )
    return (
        '<section data-part="interrupts"><h2>Interrupts</h2><table class="interrupts"><thead><tr>'
        "<th>sent (UTC)</th><th>reason</th><th>how</th><th>from</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


_ENDS = {"flow.completed", "flow.interrupted", "flow.failed"}


def _attempts(view: RunView) -> str:
    """The run's attempts, from its history: the steps table shows the latest one only (its report)."""
    record = view.record
    attempts: list[tuple[RunEvent, RunEvent | None]] = []
    for event in view.events or ():
        if event.flow != record.flow:
            continue  # an included flow's
        if event.event == "flow.started":
            attempts.append((event, None))
        elif event.event in _ENDS and attempts and attempts[-1][1] is None:
            attempts[-1] = (attempts[-1][0], event)
    if len(attempts) < 2:
        return '<section data-part="attempts"></section>'
    rows = []
    for number, (started, ended) in enumerate(attempts, 1):
        if ended is not None:
            outcome = ended.event.removeprefix("flow.")
            detail = event_detail(ended).strip(" :").removeprefix("(").removesuffix(")")
        elif number == len(attempts) and record.status in (RunStatus.RUNNING, RunStatus.QUEUED):
            outcome, detail = "running", ""
        else:
            outcome, detail = "lost", "its process ended without a word (a crash): a later attempt took the run over"
        rows.append(
            f"<tr><td>{number}</td><td>{_time(started.at)}</td><td>{_time(ended.at if ended else None)}</td>"
            f"<td>{_badge(outcome)}</td><td>{escape(detail)}</td></tr>"
        )
    earlier = '<p class="dim">Earlier attempts\' events were dropped.</p>' if view.dropped else ""
    return (
        f'<section data-part="attempts"><h2>Attempts <span class="count">{len(attempts)}</span></h2>'
        '<table class="attempts"><thead><tr><th>#</th><th>started (UTC)</th><th>ended (UTC)</th><th>outcome</th>'
        f"<th>detail</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{earlier}</section>"
    )


def _events(view: RunView) -> str:
    if view.events is None:
        return '<section data-part="events"><h2>Events</h2><p class="dim">This store keeps no history.</p></section>'
    listed = view.events
    toggle = ""
    progress = sum(1 for event in listed if event.event == "step.progress")
    if progress and not view.progress_events:
        listed = [event for event in listed if event.event != "step.progress"]
        href = _run_href(view.base, view.record.flow, view.record.run_id, progress="1")
        toggle = f' <a class="toggle" id="progress-events" href="{href}">show {progress} progress events</a>'
    elif progress:
        href = _run_href(view.base, view.record.flow, view.record.run_id)
        toggle = f' <a class="toggle" id="progress-events" href="{href}">hide the progress events</a>'
    shown = list(reversed(listed))[:SHOWN_EVENTS]
    rows = "".join(
        f'<tr data-event="{escape(event.event)}"><td>{_time(event.at)}</td><td>{escape(event.event)}</td>'
        f"<td>{escape(_event_step(event, view.record.flow))}</td>"
        f"<td>{escape(event_detail(event).strip(' :'))}</td></tr>"
        for event in shown
    )
    more = len(listed) - len(shown) + view.dropped
    note = f'<p class="dim">{more} earlier events not shown.</p>' if more else ""
    return (
        f'<section data-part="events"><h2>Events <span class="count">{len(listed)}</span>{toggle}</h2>'
        '<table class="events"><thead><tr><th>at (UTC)</th><th>event</th><th>step</th><th>detail</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>{note}</section>"
    )


def _event_step(event: RunEvent, flow: str) -> str:
    step = getattr(event, "step", None)
    if step is None:
        return ""
    return f"{event.flow}.{step}" if event.flow != flow else str(step)
