"""Stores: where runs are persisted so they survive the process (the `Store` and `LabelStore` protocols
and records).

A store keeps, per `(flow, run_id)`, the run's latest checkpoint and report as JSON text, and (a
`LabelStore`) the run's labels, str key/value pairs for the tools that run it. It never
unpickles or evaluates anything: what comes back is validated by pydantic (the flow turns the
checkpoint's outputs back into each step's return type), so a tampered file yields an error, not
code execution.

Two stores come with stoppoint: `MemoryStore` (a dict, for tests and runs that need not outlive the
process) and `SQLiteStore` (one SQLite file, shared safely by several processes). Both keep the same
rows, as text, so a value that cannot be serialised fails the same way in both; both are `LabelStore`s.

The on-disk schema of `SQLiteStore` (schema version 1), in SQLite's WAL journal mode::

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );  -- two rows: ('app', 'stoppoint') and ('schema_version', '1')

    CREATE TABLE runs (
        flow         TEXT NOT NULL,  -- Checkpoint.flow (the flow's name)
        run_id       TEXT NOT NULL,  -- Checkpoint.run_id
        flow_version TEXT NOT NULL,  -- Checkpoint.flow_version at the latest save
        status       TEXT NOT NULL,  -- a RunStatus value: run_status(report) at the latest save
        started_at   TEXT NOT NULL,  -- the first save's report.started_at
        updated_at   TEXT NOT NULL,  -- when the run was last saved
        finished_at  TEXT,           -- report.finished_at at the latest save; NULL while running
        checkpoint   TEXT NOT NULL,  -- JSON: Checkpoint.to_json()
        report       TEXT NOT NULL,  -- JSON: RunReport.model_dump_json()
        PRIMARY KEY (flow, run_id)
    );
    CREATE INDEX runs_by_start ON runs (started_at);

    CREATE TABLE labels (
        flow   TEXT NOT NULL,  -- the run's flow
        run_id TEXT NOT NULL,  -- and id; a run may have labels before its first save (no foreign key)
        key    TEXT NOT NULL,  -- a label's key, not empty
        value  TEXT NOT NULL,  -- and its value
        PRIMARY KEY (flow, run_id, key)
    );

A new file gets all three tables in one transaction. The labels table came after the first files
were written: a stoppoint that opens a schema-1 file without it creates it (`CREATE TABLE IF NOT
EXISTS`, in a write transaction), and the file stays schema version 1, since a stoppoint that does
not know the table reads the file as before and never looks at it. In the same transaction, a file
that still has the table in which the `stoppoint` command used to keep each run's target beside the
store's own (`cli_targets (run_id TEXT PRIMARY KEY, flow TEXT NOT NULL, target TEXT NOT NULL)`) has
its rows moved into `labels`, under the key `stoppoint.target` (`CLI_TARGET_LABEL`), and that table
dropped. Both happen only after the file has passed the checks that every opening makes (a SQLite
file, stoppoint's, a schema version this stoppoint knows, not damaged), so a file that is refused is
never modified.

Times are ISO 8601 text in UTC with microseconds, `2026-01-31T12:00:00.000000+00:00` (a naive time in
a report is taken as UTC), so text order is time order. `list_runs()` orders by `started_at`, then
by `rowid` (the order of the runs' first saves). A later schema gets a higher `schema_version`; a
stoppoint that finds a version it does not know refuses the file rather than guess.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.lowlevel
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticSerializationError

from ._checkpoint import Checkpoint, CheckpointFile
from ._errors import CheckpointError, StoreError
from ._outcome import RunReport

__all__ = [
    "LabelStore",
    "MemoryStore",
    "RunRecord",
    "RunStatus",
    "SQLiteStore",
    "Store",
    "StoredRun",
    "run_status",
]

T = TypeVar("T")


class RunStatus(StrEnum):
    """Where a stored run stands."""

    RUNNING = "running"
    """Started and not finished (or its process died): `run()` with its id resumes it."""
    INTERRUPTED = "interrupted"
    """Stopped by an interrupt: `run()` with its id resumes it."""
    FAILED = "failed"
    """A step failed: `run()` with its id retries from the completed steps."""
    COMPLETED = "completed"
    """Every step completed: `run()` with its id returns the stored result, running nothing."""


def run_status(report: RunReport) -> RunStatus:
    """The status of a run as its report shows it."""
    if report.finished_at is None:
        return RunStatus.RUNNING
    if report.failed:
        return RunStatus.FAILED
    if all(step.status == "completed" for step in report.steps.values()):
        return RunStatus.COMPLETED
    return RunStatus.INTERRUPTED


class RunRecord(BaseModel):
    """One stored run, as `Store.list_runs()` lists it.

    Attributes:
        flow: The flow's name.
        run_id: The run's id.
        flow_version: The flow's version when the run was saved.
        status: Where the run stands.
        started_at: When the run (its first attempt) started.
        updated_at: When it was last saved.
        finished_at: When its latest attempt ended; None while running (or after a crash).
    """

    model_config = ConfigDict(frozen=True)

    flow: str
    run_id: str
    flow_version: str
    status: RunStatus
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


class StoredRun(BaseModel):
    """What `Store.load()` returns: the record and the run's latest checkpoint and report, as JSON.

    `Flow.load_checkpoint(stored.checkpoint_json)` turns the checkpoint back into typed outputs.

    Attributes:
        record: The run's record.
        checkpoint_json: Its latest checkpoint (`Checkpoint.to_json()`).
        report_json: Its latest report (`RunReport.model_dump_json()`).
    """

    model_config = ConfigDict(frozen=True)

    record: RunRecord
    checkpoint_json: str
    report_json: str


@runtime_checkable
class Store(Protocol):
    """Where `Flow.run(store=...)` persists runs. All methods are async, so network stores fit.

    `run()` calls `save()` once before the first step (so the run is listed as running), after
    every completed step (before any step that depends on it starts), and once more when the run
    ends; a store must have committed the checkpoint when `save()` returns. Calls for one run never
    overlap.

    A store that also keeps labels beside its runs (as both stores of stoppoint do, for the `stoppoint`
    command among others) is a `LabelStore`; a store need not be one.
    """

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store `checkpoint` (as `checkpoint.to_json()`) and `report` for `(checkpoint.flow, checkpoint.run_id)`,
        replacing what was stored for that run.

        Args:
            checkpoint: The run's checkpoint now.
            report: The run's report now (its status is derived from it: `run_status()`).

        Raises:
            StoreError: The store cannot be written.
            CheckpointError: An output cannot be serialised (from `checkpoint.to_json()`).
        """
        ...

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None if there is none.

        Args:
            flow: The flow's name.
            run_id: The run's id.

        Returns:
            The record and the run's latest checkpoint and report as JSON, or None.

        Raises:
            StoreError: The store cannot be read.
        """
        ...

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first.

        Args:
            flow: Only the runs of this flow (None: all).

        Returns:
            The records, oldest first.

        Raises:
            StoreError: The store cannot be read.
        """
        ...

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run; nothing happens if there is none.

        Args:
            flow: The flow's name.
            run_id: The run's id.

        Raises:
            StoreError: The store cannot be written.
        """
        ...


CLI_TARGET_LABEL = "stoppoint.target"
"""The label under which the `stoppoint` command keeps the `FILE.py:FLOW` a run was started from (the
file's absolute path), so that `stoppoint resume RUN_ID` needs nothing else."""


@runtime_checkable
class LabelStore(Store, Protocol):
    """A `Store` that also keeps **labels** beside each run: str key/value pairs for the tools that run it.

    The `stoppoint` command keeps the `FILE.py:FLOW` a run was started from under `"stoppoint.target"`
    (`CLI_TARGET_LABEL`); keys that start with `stoppoint.` are stoppoint's own. Labels are not part
    of the run's checkpoint or report: `save()` leaves them as they are, and a run may be labelled
    before its first save. `delete(flow, run_id)` forgets them with the run.

    `MemoryStore` and `SQLiteStore` are label stores. A store with only the `Store` methods is still a
    `Store` (`flow.run(store=...)` needs nothing more); `isinstance(store, LabelStore)` tells the two apart.
    """

    async def set_labels(self, flow: str, run_id: str, labels: Mapping[str, str]) -> None:
        """Merge `labels` into the run's: a key given again gets the new value, the others stay.

        All or nothing: the labels are checked before anything is written, and a bad one leaves the
        run's labels as they were.

        Args:
            flow: The flow's name.
            run_id: The run's id (the run need not be stored yet).
            labels: Keys (non-empty str) and their values (str), both encodable as UTF-8.

        Raises:
            TypeError: `flow` or `run_id` is not a str, `labels` is not a mapping, or a key or a value
                is not a str (the message names the flow, the run and the key).
            ValueError: A key is empty.
            StoreError: The flow name, the run id, a key or a value holds text that UTF-8 cannot encode
                (a lone surrogate, as `os.fsdecode()` makes of bytes that are not UTF-8): no store can
                keep it, as `save()` refuses a checkpoint that holds such text. Or the store cannot be
                written.
        """
        ...

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        """The run's labels, in key order (by code point); `{}` if it has none (or there is no such run).

        Args:
            flow: The flow's name.
            run_id: The run's id.

        Returns:
            A new dict of the run's labels.

        Raises:
            TypeError: `flow` or `run_id` is not a str.
            StoreError: The store cannot be read, or a stored label is not text.
        """
        ...


# -- rows: what both stores keep, as text ----------------------------------------------------------


def _now() -> datetime:
    """The time of a save (`updated_at`); tests replace it to control time."""
    return datetime.now(UTC)


def _utc_text(moment: datetime) -> str:
    """`moment` as fixed-width ISO 8601 UTC text (a naive time is taken as UTC), so text order is time order."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.isoformat(timespec="microseconds")


class _Row(NamedTuple):
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


_RECORD_COLUMNS = "flow, run_id, flow_version, status, started_at, updated_at, finished_at"
_ROW_COLUMNS = f"{_RECORD_COLUMNS}, checkpoint, report"


def _check_names(method: str, flow: str | None, run_id: str = "") -> None:
    """Flow names and run ids are str: anything else is a programming error, not "no such run"."""
    if not (flow is None and method == "list_runs") and not isinstance(flow, str):
        raise TypeError(f"{method}(): flow must be a str, got {type(flow).__name__}")
    if not isinstance(run_id, str):
        raise TypeError(f"{method}(): run_id must be a str, got {type(run_id).__name__}")


def _utf8(*texts: str) -> bool:
    """Whether SQLite can take every one of `texts` (a str with a lone surrogate cannot be UTF-8)."""
    try:
        for text in texts:
            if isinstance(text, str) and not text.isascii():
                text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _checked_labels(flow: str, run_id: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The labels `set_labels(flow, run_id, labels)` stores, as plain str, all checked before anything is written.

    Raises:
        TypeError: A name, the mapping, a key or a value is not of its type (see `LabelStore.set_labels`).
        ValueError: A key is empty.
        StoreError: A name, a key or a value holds text UTF-8 cannot encode.
    """
    _check_names("set_labels", flow, run_id)
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
        if not _utf8(text):  # no store could keep it: SQLite and files take UTF-8
            raise StoreError(
                f"{what}: {part} holds a lone surrogate, which UTF-8 cannot encode (a str decoded with "
                "surrogateescape, as os.fsdecode does?), so no store can keep it; escape it first, e.g. "
                "text.encode('utf-8', 'backslashreplace').decode()"
            )
    return checked


def _row(checkpoint: Checkpoint, report: RunReport) -> _Row:
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
    return _Row(
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


def _record(columns: tuple[Any, ...] | _Row, where: str) -> RunRecord:
    """The validated record of a row's first seven columns (see `_RECORD_COLUMNS`).

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
            }
        )
    except ValidationError as exc:
        raise StoreError(f"{where}: the stored record of run {run_id!r} of flow {flow!r} is invalid: {exc}") from exc


def _stored(columns: tuple[Any, ...] | _Row, where: str) -> StoredRun:
    """The validated `StoredRun` of a row (its columns in `_ROW_COLUMNS` order).

    The checkpoint must be a stoppoint checkpoint and the report a `RunReport`, both of this run.

    Raises:
        StoreError: The row is not a valid stored run (naming the run).
    """
    record = _record(columns, where)
    checkpoint_json, report_json = columns[7], columns[8]
    what = f"{where}: run {record.run_id!r} of flow {record.flow!r}"
    for column, text in (("checkpoint", checkpoint_json), ("report", report_json)):
        if not isinstance(text, str):
            raise StoreError(f"{what}: the {column} column holds {type(text).__name__}, not JSON text")
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


# -- MemoryStore -------------------------------------------------------------------------------------


class MemoryStore:
    """A store in a dict: for tests, and for runs that need not outlive the process.

    It keeps the same JSON text as `SQLiteStore` (`checkpoint.to_json()`, `report.model_dump_json()`),
    so it behaves like a persistent store: an output that cannot be serialised fails here too, and
    what `load()` returns is validated the same way. One store may be shared by runs in several
    threads and event loops. It is a `LabelStore`: it keeps labels beside the runs.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], _Row] = {}  # in the order of the runs' first saves
        self._run_labels: dict[tuple[str, str], dict[str, str]] = {}  # never holds an empty dict
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._runs)} runs>)"

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store the run's checkpoint and report (see `Store.save`).

        Raises:
            CheckpointError: An output cannot be serialised; what was stored for the run is kept.
        """
        await anyio.lowlevel.checkpoint()
        row = _row(checkpoint, report)
        key = (row.flow, row.run_id)
        with self._lock:
            previous = self._runs.get(key)
            if previous is not None:
                row = row._replace(started_at=previous.started_at)
            self._runs[key] = row  # replacing a key keeps its place: the order stays that of first saves

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None (see `Store.load`)."""
        _check_names("load", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            row = self._runs.get((flow, run_id))
        return None if row is None else _stored(row, "MemoryStore")

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first (see `Store.list_runs`)."""
        _check_names("list_runs", flow)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            rows = [row for row in self._runs.values() if flow is None or row.flow == flow]
        rows.sort(key=lambda row: row.started_at)  # stable: ties stay in the order of first saves
        return [_record(row, "MemoryStore") for row in rows]

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run; nothing happens if there is none (see `Store.delete`)."""
        _check_names("delete", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            self._runs.pop((flow, run_id), None)
            self._run_labels.pop((flow, run_id), None)

    # -- the LabelStore protocol -------------------------------------------------------------------

    async def set_labels(self, flow: str, run_id: str, labels: Mapping[str, str]) -> None:
        """Merge `labels` into the run's (see `LabelStore.set_labels`).

        Raises:
            TypeError: A name, the mapping, a key or a value is not of its type; nothing is written.
            ValueError: A key is empty; nothing is written.
            StoreError: A name, a key or a value holds text UTF-8 cannot encode; nothing is written.
        """
        checked = _checked_labels(flow, run_id, labels)
        await anyio.lowlevel.checkpoint()
        if checked:
            with self._lock:
                self._run_labels.setdefault((flow, run_id), {}).update(checked)

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        """The run's labels, in key order; `{}` if it has none (see `LabelStore.labels`)."""
        _check_names("labels", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            labels = self._run_labels.get((flow, run_id), {})
            return dict(sorted(labels.items()))  # code point order: SQLite's order of UTF-8 text


# -- SQLiteStore -------------------------------------------------------------------------------------

_APP = "stoppoint"
_SCHEMA_VERSION = 1
_SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file

_BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another connection's lock (another process sharing the file)
before failing with "database is locked"."""

_SYNCHRONOUS = "FULL"
"""`PRAGMA synchronous`. In WAL mode, NORMAL already makes a commit survive the process being killed
(`kill -9`): the commit is in the WAL file, in the OS's hands, when `save()` returns. FULL also fsyncs
the WAL at every commit, so a commit survives a power loss or an OS crash too; that is what the
durability rule promises ("committed before any dependent step starts"). It costs one fsync per
save: measured on ext4 on a virtual disk (500 saves of a 5-step checkpoint, median of 5 runs), 0.70 ms
per save against 0.32 ms with NORMAL (MemoryStore: 0.06 ms); small next to a step worth persisting. On
slow disks fsync costs more; NORMAL would then be the trade to make, for kill -9 safety only."""

_LABELS_TABLE = (  # IF NOT EXISTS: also how a file written before labels gets the table
    "CREATE TABLE IF NOT EXISTS labels (flow TEXT NOT NULL, run_id TEXT NOT NULL, key TEXT NOT NULL,"
    " value TEXT NOT NULL, PRIMARY KEY (flow, run_id, key))"
)

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE runs ("
    " flow TEXT NOT NULL, run_id TEXT NOT NULL, flow_version TEXT NOT NULL, status TEXT NOT NULL,"
    " started_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT,"
    " checkpoint TEXT NOT NULL, report TEXT NOT NULL, PRIMARY KEY (flow, run_id))",
    "CREATE INDEX runs_by_start ON runs (started_at)",
    _LABELS_TABLE,
)

_OLD_TARGETS_TABLE = "cli_targets"
"""The table in which the `stoppoint` command kept each run's target before labels (see the module docstring)."""
_OLD_TARGETS_COLUMNS = ("run_id", "flow", "target")


def _version_number(value: object) -> int | None:
    """The schema version in the meta table as a number (text of decimal digits, or an integer), else None."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


class SQLiteStore:
    """A store in one SQLite file (stdlib `sqlite3`), which several processes may share.

    Use it as `async with SQLiteStore(path) as store:` (or call `await store.aclose()`, or `close()`
    from synchronous code, when done). Constructing it touches nothing: the file is opened, and
    checked, on entering `async with` or on first use. A path that does not exist (or an empty file)
    becomes a new store; an existing file is used only if it is a stoppoint store of a schema version
    this stoppoint knows, and is never modified otherwise. The schema is in this module's docstring;
    a file written before the labels table gets it (and the `stoppoint` command's old targets moved
    into it) the first time it is opened. It is a `LabelStore`: it keeps labels beside the runs.

    Each `save()` is one transaction, committed (and, with `synchronous=FULL`, flushed to disk) when it
    returns. All file I/O runs in a worker thread (`anyio.to_thread.run_sync`), so the event loop never
    waits on the disk; the checkpoint is serialised to JSON in the caller's thread first, since step
    outputs belong to the event loop's thread.

    One connection serves the whole store, used by one thread at a time under a lock: SQLite
    connections must not be used concurrently, a per-thread connection would have to be opened (and
    checked) again for each of anyio's short-lived worker threads and could not be closed by
    `close()`, and one process gains nothing from several connections to one file (SQLite lets one
    writer in at a time anyway). Other processes wait for this one's transactions through SQLite's
    busy timeout (30 s).

    Args:
        path: The database file (`str` or `os.PathLike`). SQLite keeps its write-ahead log next to
            it (`<path>-wal`, `<path>-shm`), so its directory must be writable.

    Raises:
        TypeError: `path` is not a `str` or `os.PathLike[str]`.
        ValueError: `path` is empty, `":memory:"` (use `MemoryStore`) or holds a NUL character.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"SQLiteStore(path): path must be a str or os.PathLike, got {type(path).__name__}")
        fspath = os.fspath(path)
        if not isinstance(fspath, str):
            raise TypeError(f"SQLiteStore(path): path must be a str or os.PathLike[str], got {type(fspath).__name__}")
        if fspath in ("", ":memory:"):
            raise ValueError(
                f"SQLiteStore(path): {fspath!r} is not a file path; for a store in memory use MemoryStore()"
            )
        if "\x00" in fspath:
            raise ValueError("SQLiteStore(path): the path holds a NUL character")
        self._path = fspath
        self._lock = threading.Lock()  # guards _connection and _closed, and serialises all use of the connection
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    @property
    def path(self) -> str:
        """The database file's path, as given."""
        return self._path

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r})"

    # -- the Store protocol ------------------------------------------------------------------------

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store the run's checkpoint and report in one transaction (see `Store.save`).

        Raises:
            StoreError: The file cannot be opened or written.
            CheckpointError: An output cannot be serialised; what was stored for the run is kept.
        """
        row = _row(checkpoint, report)
        await self._call(self._save, row)

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None (see `Store.load`).

        Raises:
            StoreError: The file cannot be opened or read, or the run's row is invalid.
        """
        _check_names("load", flow, run_id)
        if not _utf8(flow, run_id):  # SQLite could not even take the query; no run of that name is stored
            return None
        return await self._call(self._load, flow, run_id)

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first (see `Store.list_runs`).

        Raises:
            StoreError: The file cannot be opened or read, or a row is invalid.
        """
        _check_names("list_runs", flow)
        if flow is not None and not _utf8(flow):
            return []
        return await self._call(self._list_runs, flow)

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run; nothing happens if there is none (see `Store.delete`).

        Raises:
            StoreError: The file cannot be opened or written.
        """
        _check_names("delete", flow, run_id)
        if _utf8(flow, run_id):
            await self._call(self._delete, flow, run_id)

    # -- the LabelStore protocol -------------------------------------------------------------------

    async def set_labels(self, flow: str, run_id: str, labels: Mapping[str, str]) -> None:
        """Merge `labels` into the run's, in one transaction (see `LabelStore.set_labels`).

        Raises:
            TypeError: A name, the mapping, a key or a value is not of its type; nothing is written.
            ValueError: A key is empty; nothing is written.
            StoreError: A name, a key or a value holds text UTF-8 cannot encode (nothing is written), or
                the file cannot be opened or written.
        """
        checked = _checked_labels(flow, run_id, labels)
        await self._call(self._set_labels, flow, run_id, checked)

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        """The run's labels, in key order; `{}` if it has none (see `LabelStore.labels`).

        Raises:
            StoreError: The file cannot be opened or read, or a stored label is not text.
        """
        _check_names("labels", flow, run_id)
        if not _utf8(flow, run_id):  # as in load(): no run of that name is stored
            return {}
        return await self._call(self._labels, flow, run_id)

    # -- opening and closing -----------------------------------------------------------------------

    async def __aenter__(self) -> SQLiteStore:
        """Open (and check) the file now, so that a file that cannot be used fails here."""
        await self._call(lambda _connection: None)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (in a worker thread, shielded from cancellation); the store cannot be used
        afterwards. Closing twice does nothing."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """`aclose()` for synchronous code: blocks until an operation in progress ends."""
        with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
            if connection is not None:
                try:
                    connection.close()
                except sqlite3.Error as exc:
                    raise StoreError(f"{self._where}: cannot close: {exc}") from exc

    # -- in the worker thread ----------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"SQLite store {self._path!r}"

    async def _call(self, operation: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(self._locked, operation, *args)

    def _locked(self, operation: Callable[..., T], *args: Any) -> T:
        """Run `operation(connection, *args)` under the lock, opening the file on first use."""
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._where} is closed")
            if self._connection is None:
                self._connection = self._open()
            try:
                return operation(self._connection, *args)
            except sqlite3.Error as exc:
                raise StoreError(f"{self._where}: {exc}") from exc

    @staticmethod
    def _write(connection: sqlite3.Connection, statements: Callable[[], object]) -> None:
        """Run `statements` in one write transaction. IMMEDIATE takes the write lock at BEGIN, where the
        busy timeout applies (a read upgraded to a write later could fail at once in WAL mode)."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            statements()
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            raise

    def _save(self, connection: sqlite3.Connection, row: _Row) -> None:
        def statements() -> None:
            updated = connection.execute(
                "UPDATE runs SET flow_version = ?, status = ?, updated_at = ?, finished_at = ?, checkpoint = ?,"
                " report = ? WHERE flow = ? AND run_id = ?",  # started_at stays the first save's
                (*row[2:4], *row[5:], row.flow, row.run_id),
            )
            if updated.rowcount == 0:
                connection.execute(f"INSERT INTO runs ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

        self._write(connection, statements)

    def _load(self, connection: sqlite3.Connection, flow: str, run_id: str) -> StoredRun | None:
        found = connection.execute(
            f"SELECT {_ROW_COLUMNS} FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id)
        ).fetchone()
        return None if found is None else _stored(found, self._where)

    def _list_runs(self, connection: sqlite3.Connection, flow: str | None) -> list[RunRecord]:
        if flow is None:
            rows = connection.execute(f"SELECT {_RECORD_COLUMNS} FROM runs ORDER BY started_at, rowid")
        else:
            rows = connection.execute(
                f"SELECT {_RECORD_COLUMNS} FROM runs WHERE flow = ? ORDER BY started_at, rowid", (flow,)
            )
        return [_record(row, self._where) for row in rows]

    def _delete(self, connection: sqlite3.Connection, flow: str, run_id: str) -> None:
        def statements() -> None:
            connection.execute("DELETE FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id))
            connection.execute("DELETE FROM labels WHERE flow = ? AND run_id = ?", (flow, run_id))

        self._write(connection, statements)

    def _set_labels(self, connection: sqlite3.Connection, flow: str, run_id: str, labels: dict[str, str]) -> None:
        if labels:
            rows = [(flow, run_id, key, value) for key, value in labels.items()]
            self._write(
                connection,
                lambda: connection.executemany(
                    "INSERT OR REPLACE INTO labels (flow, run_id, key, value) VALUES (?, ?, ?, ?)", rows
                ),
            )

    def _labels(self, connection: sqlite3.Connection, flow: str, run_id: str) -> dict[str, str]:
        rows = connection.execute(
            "SELECT key, value FROM labels WHERE flow = ? AND run_id = ? ORDER BY key", (flow, run_id)
        ).fetchall()
        labels: dict[str, str] = {}
        for key, value in rows:
            for what, text in (("key", key), ("value", value)):
                if not isinstance(text, str):
                    raise StoreError(
                        f"{self._where}: run {run_id!r} of flow {flow!r}: the {what} of a stored label "
                        f"({key!r}) holds {type(text).__name__}, not text"
                    )
            labels[key] = value
        return labels

    def _open(self) -> sqlite3.Connection:
        """Open the file and check it is a stoppoint store (or make it one, if it is new).

        Nothing is written to a file that is not a new or empty file or a stoppoint store of a known
        schema version: the checks only read, and WAL mode is turned on after them.
        """
        path = self._path
        if os.path.isdir(path):
            raise StoreError(f"{path!r} is a directory; SQLiteStore needs the path of a database file")
        try:
            size: int | None = os.stat(path).st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:
            raise StoreError(f"cannot open {path!r}: {exc}") from exc
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StoreError(f"cannot create {path!r}: the directory {directory!r} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StoreError(
                f"cannot use {path!r}: its directory is not writable (SQLite keeps its write-ahead log next to the "
                "file)"
            )
        if size is not None:
            if not os.access(path, os.R_OK | os.W_OK):
                raise StoreError(f"cannot use {path!r}: the file is not readable and writable")
            if size > 0:
                try:
                    with open(path, "rb") as file:
                        header = file.read(len(_SQLITE_HEADER))
                except OSError as exc:
                    raise StoreError(f"cannot open {path!r}: {exc}") from exc
                if header != _SQLITE_HEADER:
                    raise StoreError(f"{path!r} is not a SQLite database (it does not start with SQLite's header)")
        # A URI, to say whether the file may be created (rwc) or must exist (rw); as_uri() escapes ?, # and %.
        uri = Path(path).absolute().as_uri() + ("?mode=rw" if size is not None else "?mode=rwc")
        try:
            connection = sqlite3.connect(
                uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path!r}: {exc}") from exc
        try:
            self._prepare(connection)
        except sqlite3.Error as exc:
            connection.close()
            code = exc.sqlite_errorcode & 0xFF  # the primary code of an extended one
            if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise StoreError(f"{path!r} is a damaged SQLite file (truncated or corrupt): {exc}") from exc
            raise StoreError(f"cannot open {path!r}: {exc}") from exc
        except BaseException:
            connection.close()
            raise
        return connection

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """Check (or initialise) the schema, add what a file written before labels lacks (`_upgrade`), then
        turn on WAL mode. SQLite errors go to `_open`."""
        path = self._path
        tables = self._tables(connection)
        if tables:
            self._check_schema(connection, tables)
            # Reads every page (about 30 ms for a 64 MB store): a truncated file fails here, not mid-run.
            problems = [line for (line,) in connection.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreError(f"{path!r} is a damaged SQLite file (truncated or corrupt): {'; '.join(problems[:5])}")
        else:
            self._write(connection, lambda: self._initialise(connection))
            tables = self._tables(connection)  # another process's, if it got there first
        if "labels" not in tables or _OLD_TARGETS_TABLE in tables:
            self._write(connection, lambda: self._upgrade(connection))
        (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot use {path!r}: SQLite cannot put it in WAL mode (journal mode {mode!r})")
        connection.execute(f"PRAGMA synchronous = {_SYNCHRONOUS}")

    @staticmethod
    def _tables(connection: sqlite3.Connection) -> set[str]:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _initialise(self, connection: sqlite3.Connection) -> None:
        """Create the schema in a new (or empty) file; in the write transaction, so that when another
        process got there first, its schema is checked instead."""
        tables = self._tables(connection)
        if tables:
            self._check_schema(connection, tables)
            return
        for statement in _SCHEMA:
            connection.execute(statement)
        connection.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)", [("app", _APP), ("schema_version", str(_SCHEMA_VERSION))]
        )

    def _upgrade(self, connection: sqlite3.Connection) -> None:
        """Bring a schema-1 file written before labels up to date (see the module docstring); in the
        write transaction, so that what another process did meanwhile is seen, and a refusal writes nothing.

        Raises:
            StoreError: The file's `cli_targets` table is not the one the `stoppoint` command made.
        """
        tables = self._tables(connection)
        if _OLD_TARGETS_TABLE in tables:
            columns = [row[1] for row in connection.execute(f"PRAGMA table_info({_OLD_TARGETS_TABLE})")]
            if not set(_OLD_TARGETS_COLUMNS) <= set(columns):
                raise StoreError(
                    f"{self._path!r} is a stoppoint store with a {_OLD_TARGETS_TABLE} table that is not the one the "
                    f"stoppoint command made (its columns: {', '.join(map(str, columns))}; expected "
                    f"{', '.join(_OLD_TARGETS_COLUMNS)}), so its rows cannot be moved into the labels table"
                )
        connection.execute(_LABELS_TABLE)
        if _OLD_TARGETS_TABLE in tables:
            # A row without a run id, flow or target was never found by the command: there is nothing to keep.
            # OR REPLACE: an older stoppoint command wrote the row after an earlier move, so it is the newer one.
            connection.execute(
                "INSERT OR REPLACE INTO labels (flow, run_id, key, value)"
                f" SELECT flow, run_id, ?, target FROM {_OLD_TARGETS_TABLE}"
                " WHERE flow IS NOT NULL AND run_id IS NOT NULL AND target IS NOT NULL",
                (CLI_TARGET_LABEL,),
            )
            connection.execute(f"DROP TABLE {_OLD_TARGETS_TABLE}")

    def _check_schema(self, connection: sqlite3.Connection, tables: set[str]) -> None:
        path = self._path
        foreign = f"{path!r} is a SQLite database that is not a stoppoint store"
        if "meta" not in tables:
            raise StoreError(f"{foreign} (it has no meta table; its tables: {', '.join(sorted(tables))})")
        try:
            meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_ERROR:  # not "no such column": locked, corrupt...
                raise
            raise StoreError(f"{foreign} (its meta table is not stoppoint's: {exc})") from exc
        if meta.get("app") != _APP:
            raise StoreError(f"{foreign} (its meta table has no app = 'stoppoint' row)")
        version = meta.get("schema_version")
        number = _version_number(version)
        if number is not None and number > _SCHEMA_VERSION:
            raise StoreError(
                f"{path!r} is a stoppoint store of a newer schema version ({number}) than this stoppoint reads "
                f"({_SCHEMA_VERSION}); upgrade stoppoint to use it"
            )
        if number != _SCHEMA_VERSION:
            raise StoreError(f"{path!r} is a stoppoint store of an unknown schema version {version!r}")
        if "runs" not in tables:
            raise StoreError(f"{path!r} is a damaged stoppoint store: its runs table is missing")
