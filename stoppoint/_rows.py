"""Rows: what both stores keep of a run, as text, and how it is checked on the way in and out.

`MemoryStore` and `SQLiteStore` keep the same text (`checkpoint.to_json()`, the report's JSON, times
as fixed-width ISO 8601 UTC), so a value that cannot be serialised fails the same way in both, and
what either gives back is validated the same way.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from ._checkpoint import Checkpoint, CheckpointFile
from ._errors import CheckpointError, StoreError
from ._events import Event
from ._lease import Queue
from ._outcome import RunReport, StepStatus
from ._signal import InterruptSignal
from ._store import RunRecord, RunState, RunStatus, StepRow, StoredEvents, StoredRun, run_status

__all__ = [
    "RECORD_COLUMNS",
    "ROW_COLUMNS",
    "Row",
    "check_claim_next",
    "check_events",
    "check_names",
    "check_state",
    "checked_labels",
    "claim_args",
    "head_row",
    "interrupt_signal",
    "interrupted_report",
    "lease_record",
    "merge_rows",
    "now",
    "stored_events",
    "to_record",
    "to_row",
    "to_stored",
    "utc_text",
    "utf8",
]


def _now() -> datetime:
    """The time of a save (`updated_at`); tests replace it to control time."""
    return datetime.now(UTC)


def _utc_text(moment: datetime) -> str:
    """`moment` as fixed-width ISO 8601 UTC text (a naive time is taken as UTC), so text order is time order."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.isoformat(timespec="microseconds")


class Row(NamedTuple):
    """One stored run, column by column (see the schema in the module docstring)."""

    flow: str
    run_id: str
    flow_version: str
    status: str
    started_at: str
    updated_at: str
    finished_at: str | None
    checkpoint: str
    report: str


RECORD_COLUMNS = "flow, run_id, flow_version, status, started_at, updated_at, finished_at"
ROW_COLUMNS = f"{RECORD_COLUMNS}, checkpoint, report"


def check_names(method: str, flow: str | None, run_id: str = "") -> None:
    """Flow names and run ids are str: anything else is a programming error, not "no such run"."""
    if not (flow is None and method == "list_runs") and not isinstance(flow, str):
        raise TypeError(f"{method}(): flow must be a str, got {type(flow).__name__}")
    if not isinstance(run_id, str):
        raise TypeError(f"{method}(): run_id must be a str, got {type(run_id).__name__}")


def utf8(*texts: str) -> bool:
    """Whether SQLite can take every one of `texts` (a str with a lone surrogate cannot be UTF-8)."""
    try:
        for text in texts:
            if isinstance(text, str) and not text.isascii():
                text.encode()
    except UnicodeEncodeError:
        return False
    return True


def checked_labels(flow: str, run_id: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The labels `set_labels(flow, run_id, labels)` stores, as plain str, all checked before anything is written.

    Raises:
        TypeError: A name, the mapping, a key or a value is not of its type (see `LabelStore.set_labels`).
        ValueError: A key is empty.
        StoreError: A name, a key or a value holds text UTF-8 cannot encode.
    """
    check_names("set_labels", flow, run_id)
    what = f"set_labels(): flow {flow!r}, run {run_id!r}"
    if not isinstance(labels, Mapping):
        raise TypeError(f"{what}: labels must be a mapping of str keys to str values, got {type(labels).__name__}")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: a label key must be a str, got {type(key).__name__} {key!r}")
        if not key:
            raise ValueError(f"{what}: a label key cannot be empty")
        if not isinstance(value, str):
            raise TypeError(f"{what}: the value of label {key!r} must be a str, got {type(value).__name__}")
        checked[str.__str__(key)] = str.__str__(value)  # a str subclass (an enum member) is kept as its text
    texts = [("the flow name", flow), ("the run id", run_id)]
    for key, value in checked.items():
        texts += [(f"label key {key!r}", key), (f"the value of label {key!r}", value)]
    for part, text in texts:
        if not utf8(text):  # no store could keep it: SQLite and files take UTF-8
            raise StoreError(
                f"{what}: {part} holds a lone surrogate, which UTF-8 cannot encode (a str decoded with "
                "surrogateescape, as os.fsdecode does?), so no store can keep it; escape it first, e.g. "
                "text.encode('utf-8', 'backslashreplace').decode()"
            )
    return checked


def to_row(checkpoint: Checkpoint, report: RunReport) -> Row:
    """The row `save(checkpoint, report)` stores (`started_at` is the report's; a store keeps the first one).

    Raises:
        CheckpointError: An output cannot be serialised (from `checkpoint.to_json()`, unchanged).
    """
    if not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"save() takes a Checkpoint, got {type(checkpoint).__name__}")
    if not isinstance(report, RunReport):
        raise TypeError(f"save() takes a RunReport, got {type(report).__name__}")
    if (report.flow, report.run_id) != (checkpoint.flow, checkpoint.run_id):
        raise ValueError(
            f"save(): the report of run {report.run_id!r} of flow {report.flow!r} does not go with the checkpoint "
            f"of run {checkpoint.run_id!r} of flow {checkpoint.flow!r}"
        )
    checkpoint_json = checkpoint.to_json()  # first: a CheckpointError leaves the store as it was
    if not checkpoint_json.isascii():
        try:
            checkpoint_json.encode()
        except UnicodeEncodeError as exc:  # no store could keep it: SQLite and files take UTF-8
            raise CheckpointError(
                f"checkpoint of flow {checkpoint.flow!r}, run {checkpoint.run_id!r}: its JSON holds a lone surrogate, "
                f"which UTF-8 cannot encode, here: ...{checkpoint_json[max(0, exc.start - 60) : exc.start + 1]!r} (a "
                "str decoded with surrogateescape, as os.fsdecode does?); escape it first, e.g. "
                "text.encode('utf-8', 'backslashreplace').decode()"
            ) from exc
    return Row(
        flow=checkpoint.flow,
        run_id=checkpoint.run_id,
        flow_version=checkpoint.flow_version,
        status=run_status(report).value,
        started_at=_utc_text(report.started_at),
        updated_at=_utc_text(_now()),
        finished_at=None if report.finished_at is None else _utc_text(report.finished_at),
        checkpoint=checkpoint_json,
        report=_report_json(report),
    )


def _report_json(report: RunReport) -> str:
    """`report.model_dump_json()`, or, when a str in it cannot be encoded as UTF-8 (a lone surrogate, as in
    an OSError's message about a file name from os.fsdecode), the report with those characters
    backslash-escaped: a report is for people, and a failed step's message must not stop the run's save."""
    try:
        return report.model_dump_json()
    except PydanticSerializationError:
        return RunReport.model_validate(_escape_surrogates(report.model_dump(mode="json"))).model_dump_json()


def _escape_surrogates(value: Any) -> Any:
    """`value` (JSON-like data) with every character UTF-8 cannot encode in its strings backslash-escaped."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escape_surrogates(key): _escape_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_surrogates(item) for item in value]
    return value


def to_record(columns: tuple[Any, ...] | Row, where: str, lease: Mapping[str, Any] | None = None) -> RunRecord:
    """The validated record of a row's first seven columns (see `RECORD_COLUMNS`), with the fields of its
    `lease` (see `lease_record`).

    Raises:
        StoreError: The columns are not a valid record (naming the run).
    """
    flow, run_id, flow_version, status, started_at, updated_at, finished_at = columns[:7]
    try:
        return RunRecord.model_validate(
            {
                "flow": flow,
                "run_id": run_id,
                "flow_version": flow_version,
                "status": status,
                "started_at": started_at,
                "updated_at": updated_at,
                "finished_at": finished_at,
                **(lease or {}),
            }
        )
    except ValidationError as exc:
        raise StoreError(f"{where}: the stored record of run {run_id!r} of flow {flow!r} is invalid: {exc}") from exc


def to_stored(
    columns: tuple[Any, ...] | Row, where: str, rows: Collection[tuple[int, StepRow]] = (), epoch: int = 0
) -> StoredRun:
    """The validated `StoredRun` of a row (its columns in `ROW_COLUMNS` order), merged with the run's step
    `rows` (each with its epoch; `epoch` is the run's: see `merge_rows`).

    The checkpoint must be a stoppoint checkpoint and the report a `RunReport`, both of this run.

    Raises:
        StoreError: The row, or one of the step rows, is not a valid stored run (naming the run).
    """
    record = to_record(columns, where)
    checkpoint_json, report_json = columns[7], columns[8]
    what = f"{where}: run {record.run_id!r} of flow {record.flow!r}"
    for column, text in (("checkpoint", checkpoint_json), ("report", report_json)):
        if not isinstance(text, str):
            raise StoreError(f"{what}: the {column} column holds {type(text).__name__}, not JSON text")
    if rows:
        try:
            checkpoint_json, report_json = merge_rows(checkpoint_json, report_json, rows, epoch)
        except ValueError as exc:
            raise StoreError(f"{what}: {exc}") from exc
    try:
        checkpoint = CheckpointFile.parse(checkpoint_json)
    except CheckpointError as exc:
        raise StoreError(f"{what}: the stored checkpoint is invalid: {exc}") from exc
    try:
        report = RunReport.model_validate_json(report_json)
    except ValidationError as exc:
        raise StoreError(f"{what}: the stored report is invalid: {exc}") from exc
    for column, flow, run_id in (
        ("checkpoint", checkpoint.flow, checkpoint.run_id),
        ("report", report.flow, report.run_id),
    ):
        if (flow, run_id) != (record.flow, record.run_id):
            raise StoreError(f"{what}: the stored {column} is that of run {run_id!r} of flow {flow!r}")
    return StoredRun(record=record, checkpoint_json=checkpoint_json, report_json=report_json)


# -- v0.2 stores: run heads and step rows ----------------------------------------------------------------


def utc_text(moment: datetime) -> str:
    """`moment` as a store keeps it: fixed-width ISO 8601 UTC text, so text order is time order."""
    return _utc_text(moment)


def now() -> datetime:
    """The clock of leases (UTC): when a claim expires, whether a lease is live. Not `_now`, which tests
    replace to control the times saves record."""
    return datetime.now(UTC)


def head_row(flow: str, run_id: str, state: RunState) -> Row:
    """The run row of `state` (its head), with `updated_at` now."""
    return Row(
        flow=flow,
        run_id=run_id,
        flow_version=state.flow_version,
        status=state.status.value,
        started_at=_utc_text(state.started_at),
        updated_at=_utc_text(_now()),
        finished_at=None if state.finished_at is None else _utc_text(state.finished_at),
        checkpoint=state.checkpoint_json,
        report=state.report_json,
    )


def claim_args(
    flow: str, run_id: str, new: object, labels: Mapping[str, str] | None
) -> tuple[Row | None, dict[str, str]]:
    """What `Store.claim()` was given, checked as every store checks it: the new run's head row (None without
    `new`) and the labels.

    Raises:
        TypeError: A name, `new` or a label is not of its type (naming the run).
        ValueError: A label key is empty.
    """
    check_names("claim", flow, run_id)
    head = None
    if new is not None:
        check_state("claim", flow, run_id, new)
        assert isinstance(new, RunState)
        head = head_row(flow, run_id, new)
    return head, ({} if labels is None else checked_labels(flow, run_id, labels))


def check_claim_next(flows: object, queues: object) -> None:
    """`Store.claim_next()`'s arguments, checked as every store checks them.

    Raises:
        TypeError: `flows` is not a collection of str, or `queues` not a sequence of `Queue`.
    """
    if isinstance(flows, str) or not isinstance(flows, Iterable) or not all(isinstance(f, str) for f in flows):
        raise TypeError(f"claim_next(): flows must be a collection of str, got {flows!r}")
    if isinstance(queues, str) or not isinstance(queues, Iterable) or not all(isinstance(q, Queue) for q in queues):
        raise TypeError(f"claim_next(): queues must be a sequence of Queue, got {queues!r}")


def check_state(method: str, flow: str, run_id: str, state: object, steps: object = ()) -> None:
    """A programming error in what the runtime (or a caller) hands a store is a TypeError naming the run."""
    check_names(method, flow, run_id)
    if not isinstance(state, RunState):
        raise TypeError(
            f"{method}(): flow {flow!r}, run {run_id!r}: state must be a RunState, got {type(state).__name__}"
        )
    if not isinstance(steps, list | tuple) or not all(isinstance(step, StepRow) for step in steps):
        raise TypeError(f"{method}(): flow {flow!r}, run {run_id!r}: steps must be a sequence of StepRow")


def merge_rows(
    checkpoint_json: str, report_json: str, rows: Iterable[tuple[int, StepRow]], epoch: int
) -> tuple[str, str]:
    """A run's checkpoint and report as `Store.load()` gives them: its head's, with every step row's part
    of the checkpoint added (outputs, nested checkpoints, and the state unfinished steps saved) and the
    reports of the rows of `epoch` (the current attempt's) in place of their steps'. A head that is not
    JSON objects is returned as it is, for `to_stored` to refuse saying why.

    Raises:
        ValueError: A step row's text is not what `commit_step` or `progress` stores (naming the step).
    """
    try:
        checkpoint = json.loads(checkpoint_json)
        report = json.loads(report_json)
    except (ValueError, TypeError):
        return checkpoint_json, report_json
    if not isinstance(checkpoint, dict) or not isinstance(report, dict):
        return checkpoint_json, report_json
    outputs = checkpoint.setdefault("outputs", {})
    nested = checkpoint.setdefault("nested", {})
    progress = checkpoint.get("progress", {})
    steps = report.setdefault("steps", {})
    if not all(isinstance(part, dict) for part in (outputs, nested, progress, steps)):
        return checkpoint_json, report_json
    for row_epoch, row in rows:
        if row.checkpoint_json is not None:
            part = _json_object(row.step, "checkpoint", row.checkpoint_json)
            part_outputs, part_nested = part.get("outputs", {}), part.get("nested", {})
            part_progress = part.get("progress", {})
            if not all(isinstance(p, dict) for p in (part_outputs, part_nested, part_progress)):
                raise ValueError(f"the stored row of step {row.step!r}: its checkpoint part is not a checkpoint")
            if row.step in part_outputs:
                outputs[row.step] = part_outputs[row.step]
                nested.pop(row.step, None)
                progress.pop(row.step, None)
            elif row.step in part_nested:
                nested[row.step] = part_nested[row.step]
            elif row.step in part_progress:  # the state a step that has not completed saved (ctx.save())
                progress[row.step] = part_progress[row.step]
                checkpoint["progress"] = progress
        if row_epoch == epoch:
            steps[row.step] = _json_object(row.step, "report", row.report_json)
    return json.dumps(checkpoint, ensure_ascii=False), json.dumps(report, ensure_ascii=False)


def _json_object(step: str, column: str, text: object) -> dict[str, Any]:
    """The JSON object a step row's column holds.

    Raises:
        ValueError: It holds something else (a tampered or damaged row), naming the step.
    """
    if not isinstance(text, str | bytes):
        raise ValueError(f"the stored row of step {step!r}: its {column} holds {type(text).__name__}, not JSON text")
    try:
        value = json.loads(text)
    except ValueError as exc:  # (a UnicodeDecodeError of bytes too)
        raise ValueError(f"the stored row of step {step!r}: its {column} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"the stored row of step {step!r}: its {column} is not a JSON object")
    return value


def lease_record(
    columns: tuple[Any, ...] | Row,
    where: str,
    *,
    owner: str | None,
    epoch: int,
    expires_at: str | None,
    queue: str | None,
    at: str,
) -> RunRecord:
    """The validated record of a run row with its lease: `ORPHANED` for a running run once claimed (epoch
    above 0) whose lease expired before `at` (the store's now, as text) or that nobody holds. A run saved
    running by `save()` alone (never claimed: epoch 0) stays running, as it was before leases: nothing
    tells whether its writer lives.

    Raises:
        StoreError: The columns or the lease are not a valid record (naming the run).
    """
    status = columns[3]
    expired = expires_at is None or (isinstance(expires_at, str) and expires_at <= at)
    if status == RunStatus.RUNNING.value and isinstance(epoch, int) and epoch > 0 and expired:
        status = RunStatus.ORPHANED.value
    lease = {"owner": owner, "epoch": epoch, "lease_expires_at": expires_at, "queue": queue}
    return to_record((*columns[:3], status, *columns[4:7]), where, lease)


def interrupt_signal(flow: str, run_id: str, reason: object, force: object, source: object) -> InterruptSignal:
    """The signal `Store.interrupt(flow, run_id, reason, force=, source=)` records.

    Raises:
        TypeError: A name or the reason is not a str, `force` not a bool, `source` not a str or None (a
            programming error, not a signal pydantic would refuse with a ValidationError).
    """
    check_names("interrupt", flow, run_id)
    what = f"interrupt(): flow {flow!r}, run {run_id!r}"
    if not isinstance(reason, str):
        raise TypeError(f"{what}: reason must be a str, got {type(reason).__name__}")
    if not isinstance(force, bool):
        raise TypeError(f"{what}: force must be a bool, got {type(force).__name__}")
    if source is not None and not isinstance(source, str):
        raise TypeError(f"{what}: source must be a str or None, got {type(source).__name__}")
    return InterruptSignal(reason=reason, force=force, source=source)


def interrupted_report(report_json: str, signal: InterruptSignal, at: datetime) -> str:
    """The report of a run nobody holds, marked interrupted by `signal` at `at` (`Store.interrupt`): it
    ends then, with the signal among its interrupts; steps it shows running or pending never finished."""
    report = RunReport.model_validate_json(report_json)
    steps = {
        name: step.model_copy(update={"status": StepStatus.NOT_STARTED})
        if step.status in (StepStatus.PENDING,)
        else step.model_copy(update={"status": StepStatus.INTERRUPTED})
        if step.status is StepStatus.RUNNING
        else step
        for name, step in report.steps.items()
    }
    return report.model_copy(
        update={"finished_at": at, "interrupts": [*report.interrupts, signal], "steps": steps}
    ).model_dump_json()


_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def check_events(where: str, events: object) -> list[str]:
    """The events given to `append_events`, checked: a sequence of str (each an event's JSON), encodable as
    UTF-8 (as every store keeps text).

    Raises:
        TypeError: `events` is a str, or not a sequence of str.
        StoreError: An event holds text that UTF-8 cannot encode.
    """
    if isinstance(events, str) or not isinstance(events, Collection):
        raise TypeError(f"{where}: append_events() takes a sequence of JSON texts, got {events!r}")
    texts = list(events)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"{where}: append_events() takes JSON texts (str), got {text!r}")
    if not utf8(*texts):
        raise StoreError(f"{where}: append_events(): an event holds text that UTF-8 cannot encode")
    return texts


def stored_events(where: str, flow: str, run_id: str, texts: Iterable[object], dropped: int) -> StoredEvents:
    """A run's stored events, read back from their JSON text.

    Raises:
        StoreError: A stored event is not one this stoppoint reads.
    """
    events = []
    for text in texts:
        try:
            if not isinstance(text, str):
                raise TypeError(f"it holds {type(text).__name__}, not text")
            events.append(_EVENT.validate_json(text))
        except (TypeError, ValidationError) as exc:
            raise StoreError(f"{where}: run {run_id!r} of flow {flow!r}: a stored event is not valid: {exc}") from exc
    return StoredEvents(events, dropped)
