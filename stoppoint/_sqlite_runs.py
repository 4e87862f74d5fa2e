"""A `SQLiteStore`'s statements for runs as wholes and their labels (the `BasicStore` and `LabelStore`
methods, and `stoppoint run`'s claim of a new id), and the reads every operation shares. Each function runs in
the store's worker thread, under its lock, on its `StoreFile`.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ._errors import StoreError
from ._rows import RECORD_COLUMNS, ROW_COLUMNS, Row, lease_record, now, stored_events, to_stored, utc_text
from ._sqlite_file import StoreFile
from ._sqlite_schema import OLD_TARGETS_TABLE, SCHEMA_VERSION, tables
from ._store import CLI_TARGET_LABEL, RunRecord, StepRow, StoredEvents, StoredRun

__all__ = [
    "FULL_COLUMNS",
    "delete",
    "events",
    "find_run",
    "insert_run",
    "labels",
    "list_runs",
    "load",
    "merge_labels",
    "other_flow",
    "save",
    "set_labels",
    "stored_run",
]

LEASE_COLUMNS = "owner, epoch, lease_expires_at, claimed_at, queue"
"""The lease columns of a run row, after its `ROW_COLUMNS` in `FULL_COLUMNS` (indexes `OWNER`...`QUEUE`)."""
FULL_COLUMNS = f"{ROW_COLUMNS}, {LEASE_COLUMNS}"
OWNER, EPOCH, EXPIRES, CLAIMED, QUEUE = range(9, 14)
_NO_LEASE = "NULL, 0, NULL, NULL, NULL"
"""A schema-1 file's lease columns: none, no run of it was ever claimed (read as a schema-2 file's after its
upgrade)."""


def _lease_columns(file: StoreFile) -> str:
    return LEASE_COLUMNS if file.schema >= SCHEMA_VERSION else _NO_LEASE


def find_run(file: StoreFile, flow: str, run_id: str) -> tuple[Any, ...] | None:
    """The run's row (`FULL_COLUMNS`), or None; in the caller's transaction."""
    found: tuple[Any, ...] | None = file.connection.execute(
        f"SELECT {ROW_COLUMNS}, {_lease_columns(file)} FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id)
    ).fetchone()
    return found


def other_flow(file: StoreFile, flow: str, run_id: str) -> None:
    """Refuse a run id that another flow has (one flow per run id; `runs_by_id` makes it a lookup).

    Raises:
        StoreError: It has.
    """
    found = file.connection.execute(
        "SELECT flow FROM runs WHERE run_id = ? AND flow != ? LIMIT 1", (run_id, flow)
    ).fetchone()
    if found is not None:
        raise StoreError(f"{file.where}: run {run_id!r} is a run of flow {found[0]!r}, not of flow {flow!r}")


def run_record(file: StoreFile, columns: tuple[Any, ...], at: str) -> RunRecord:
    """The record of a run row (`FULL_COLUMNS`), its status as of `at` (see `lease_record`)."""
    return lease_record(
        columns,
        file.where,
        owner=columns[OWNER],
        epoch=columns[EPOCH],
        expires_at=columns[EXPIRES],
        queue=columns[QUEUE],
        at=at,
    )


def stored_run(file: StoreFile, columns: tuple[Any, ...], at: str) -> StoredRun:
    """The run of a run row (`FULL_COLUMNS`), merged with its step rows; in the caller's transaction.

    Raises:
        StoreError: The row or a step row is not valid (naming the run).
    """
    rows: list[tuple[int, StepRow]] = []
    if file.schema >= SCHEMA_VERSION:
        for step, epoch, checkpoint, report in file.connection.execute(
            "SELECT step, epoch, checkpoint, report FROM steps WHERE flow = ? AND run_id = ? ORDER BY rowid",
            columns[:2],
        ):
            if not isinstance(step, str):
                raise StoreError(
                    f"{file.where}: run {columns[1]!r} of flow {columns[0]!r}: a stored step row's name holds "
                    f"{type(step).__name__}, not text"
                )
            rows.append((epoch, StepRow(step, report, checkpoint)))
    stored = to_stored(columns, file.where, rows, columns[EPOCH])
    return stored.model_copy(update={"record": run_record(file, columns, at)})


def insert_run(
    connection: sqlite3.Connection,
    row: Row,
    *,
    owner: str | None = None,
    epoch: int = 0,
    expires_at: str | None = None,
    claimed_at: str | None = None,
    queue: str | None = None,
) -> None:
    """Insert a new run row (of a file written already: schema 2, with an events table); the events a
    stoppoint before events left under its name (its `delete()` did not know them) go."""
    connection.execute("DELETE FROM events WHERE flow = ? AND run_id = ?", (row.flow, row.run_id))
    connection.execute(
        f"INSERT INTO runs ({FULL_COLUMNS}) VALUES ({', '.join('?' * 14)})",
        (*row, owner, epoch, expires_at, claimed_at, queue),
    )


def merge_labels(connection: sqlite3.Connection, flow: str, run_id: str, labels: dict[str, str]) -> None:
    connection.executemany(
        "INSERT OR REPLACE INTO labels (flow, run_id, key, value) VALUES (?, ?, ?, ?)",
        [(flow, run_id, key, value) for key, value in labels.items()],
    )


# -- the operations ------------------------------------------------------------------------------------


def save(file: StoreFile, row: Row) -> None:
    """`BasicStore.save`: the whole run, unfenced; its step rows go (the head holds all), its lease stays."""
    connection = file.connection

    def statements() -> None:
        updated = connection.execute(
            "UPDATE runs SET flow_version = ?, status = ?, updated_at = ?, finished_at = ?, checkpoint = ?,"
            " report = ? WHERE flow = ? AND run_id = ?",  # started_at stays the first save's
            (*row[2:4], *row[5:], row.flow, row.run_id),
        )
        if updated.rowcount == 0:
            insert_run(connection, row)
        else:
            connection.execute("DELETE FROM steps WHERE flow = ? AND run_id = ?", (row.flow, row.run_id))

    file.write(statements)


def load(file: StoreFile, flow: str, run_id: str) -> StoredRun | None:
    def statements() -> StoredRun | None:
        found = find_run(file, flow, run_id)
        return None if found is None else stored_run(file, found, utc_text(now()))

    return file.read(statements)


def list_runs(file: StoreFile, flow: str | None) -> list[RunRecord]:
    def statements() -> list[RunRecord]:
        select = f"SELECT {RECORD_COLUMNS}, {_lease_columns(file)} FROM runs"
        if flow is None:
            rows = file.connection.execute(f"{select} ORDER BY started_at, rowid")
        else:
            rows = file.connection.execute(f"{select} WHERE flow = ? ORDER BY started_at, rowid", (flow,))
        at = utc_text(now())
        return [
            lease_record(row, file.where, owner=row[7], epoch=row[8], expires_at=row[9], queue=row[11], at=at)
            for row in rows
        ]

    return file.read(statements)


def delete(file: StoreFile, flow: str, run_id: str) -> None:
    def statements() -> None:
        for table in ("runs", "steps", "interrupts", "labels", "events"):
            file.connection.execute(f"DELETE FROM {table} WHERE flow = ? AND run_id = ?", (flow, run_id))

    file.write(statements)


def set_labels(file: StoreFile, flow: str, run_id: str, labels: dict[str, str]) -> None:
    if labels:
        file.write(lambda: merge_labels(file.connection, flow, run_id, labels))


def labels(file: StoreFile, flow: str, run_id: str) -> dict[str, str]:
    """The run's labels; in a file not written since before labels, where it keeps them (see `_sqlite_file`)."""

    def statements() -> dict[str, str]:
        names = tables(file.connection) if file.old_labels else {"labels"}
        rows: list[tuple[Any, Any]] = []
        if "labels" in names:
            rows = file.connection.execute(
                "SELECT key, value FROM labels WHERE flow = ? AND run_id = ? ORDER BY key", (flow, run_id)
            ).fetchall()
        if OLD_TARGETS_TABLE in names:  # not moved yet: its row wins, as the move's OR REPLACE makes it
            rows += file.connection.execute(
                f"SELECT ?, target FROM {OLD_TARGETS_TABLE} WHERE flow = ? AND run_id = ? AND target IS NOT NULL",
                (CLI_TARGET_LABEL, flow, run_id),
            ).fetchall()
        found: dict[str, str] = {}
        for key, value in rows:
            for what, text in (("key", key), ("value", value)):
                if not isinstance(text, str):
                    raise StoreError(
                        f"{file.where}: run {run_id!r} of flow {flow!r}: the {what} of a stored label "
                        f"({key!r}) holds {type(text).__name__}, not text"
                    )
            found[key] = value
        return dict(sorted(found.items()))  # code point order: SQLite's order of UTF-8 text

    return file.read(statements)


def events(file: StoreFile, flow: str, run_id: str) -> StoredEvents:
    """`EventStore.events`: none in a file not written since before the events table."""

    def statements() -> tuple[list[Any], int]:
        if "events" not in tables(file.connection):
            return [], 0
        connection = file.connection
        texts = [
            text
            for (text,) in connection.execute(
                "SELECT event FROM events WHERE flow = ? AND run_id = ? ORDER BY seq", (flow, run_id)
            )
        ]
        (last,) = connection.execute(
            "SELECT coalesce(max(seq), 0) FROM events WHERE flow = ? AND run_id = ?", (flow, run_id)
        ).fetchone()
        return texts, int(last) - len(texts)

    texts, dropped = file.read(statements)
    return stored_events(file.where, flow, run_id, texts, dropped)
