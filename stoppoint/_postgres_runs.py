"""A `PostgresStore`'s statements for runs as wholes and their labels (the `BasicStore` and `LabelStore`
methods), and the reads every operation shares. Each function runs in a worker thread, on a pooled connection,
inside the transaction the store opened for it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import psycopg

from ._errors import StoreError
from ._rows import Row, lease_record, stored_events, to_stored, utc_text
from ._store import RunRecord, StepRow, StoredEvents, StoredRun

__all__ = [
    "FULL_COLUMNS",
    "Connection",
    "delete",
    "events",
    "find_run",
    "insert_run",
    "labels",
    "list_runs",
    "load",
    "merge_labels",
    "notify",
    "other_flow",
    "save",
    "set_labels",
    "stored_run",
    "texts",
]

Connection = psycopg.Connection[tuple[Any, ...]]

FULL_COLUMNS = (
    "flow, run_id, flow_version, status, started_at, updated_at, finished_at, checkpoint, report,"
    " owner, epoch, lease_expires_at, claimed_at, queue, now()"
)
"""A run row as the shared helpers (`_rows`) take it, then its lease, then the server's now (`AT`)."""
OWNER, EPOCH, EXPIRES, CLAIMED, QUEUE, AT = range(9, 15)
CHANNEL = "stoppoint"
"""The channel of every PostgresStore's notifications: the payload names the schema, flow and run."""


def texts(columns: tuple[Any, ...]) -> tuple[Any, ...]:
    """`columns` with each time as a store's UTC text (`utc_text`), as the shared helpers compare them."""
    return tuple(utc_text(value) if isinstance(value, datetime) else value for value in columns)


def find_run(connection: Connection, flow: str, run_id: str, *, lock: bool = False) -> tuple[Any, ...] | None:
    """The run's row (`FULL_COLUMNS`, times as text), or None; with `lock`, locked until the transaction ends."""
    found = connection.execute(
        f"SELECT {FULL_COLUMNS} FROM runs WHERE flow = %s AND run_id = %s{' FOR UPDATE' if lock else ''}",
        (flow, run_id),
    ).fetchone()
    return None if found is None else texts(found)


def other_flow(connection: Connection, where: str, flow: str, run_id: str) -> None:
    """Refuse a run id that another flow has (one flow per run id).

    Raises:
        StoreError: It has.
    """
    found = connection.execute(
        "SELECT flow FROM runs WHERE run_id = %s AND flow <> %s LIMIT 1", (run_id, flow)
    ).fetchone()
    if found is not None:
        raise StoreError(f"{where}: run {run_id!r} is a run of flow {found[0]!r}, not of flow {flow!r}")


def run_record(where: str, columns: tuple[Any, ...]) -> RunRecord:
    """The record of a run row (`FULL_COLUMNS`, as text), its status as of the server's now."""
    return lease_record(
        columns,
        where,
        owner=columns[OWNER],
        epoch=columns[EPOCH],
        expires_at=columns[EXPIRES],
        queue=columns[QUEUE],
        at=columns[AT],
    )


def stored_run(connection: Connection, where: str, columns: tuple[Any, ...]) -> StoredRun:
    """The run of a run row, merged with its step rows (in the order of their first writes).

    Raises:
        StoreError: The row or a step row is not valid (naming the run).
    """
    rows = [
        (epoch, StepRow(step, report, checkpoint))
        for step, epoch, checkpoint, report in connection.execute(
            "SELECT step, epoch, checkpoint, report FROM steps WHERE flow = %s AND run_id = %s ORDER BY seq",
            columns[:2],
        )
    ]
    stored = to_stored(columns, where, rows, columns[EPOCH])
    return stored.model_copy(update={"record": run_record(where, columns)})


def insert_run(connection: Connection, row: Row, *, queue: str | None = None) -> None:
    """Insert a new run row, nobody's, epoch 0; the events an older stoppoint left under its name go."""
    connection.execute("DELETE FROM events WHERE flow = %s AND run_id = %s", (row.flow, row.run_id))
    connection.execute(
        "INSERT INTO runs (flow, run_id, flow_version, status, started_at, updated_at, finished_at, checkpoint,"
        " report, queue) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (*row, queue),
    )


def merge_labels(connection: Connection, flow: str, run_id: str, labels: dict[str, str]) -> None:
    if labels:
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO labels (flow, run_id, key, value) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (flow, run_id, key) DO UPDATE SET value = excluded.value",
                [(flow, run_id, key, value) for key, value in labels.items()],
            )


def notify(connection: Connection, schema: str, flow: str, run_id: str) -> None:
    """Tell every listener that the run changed hands or was asked to stop (sent when the transaction commits)."""
    connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload(schema, flow, run_id)))


def payload(schema: str, flow: str, run_id: str) -> str:
    """A notification's payload: the schema, flow and run, or just the schema (every run: a payload over
    PostgreSQL's 8,000 bytes) when their names are that long."""
    text = json.dumps([schema, flow, run_id], ensure_ascii=False)
    return text if len(text.encode()) < 7_900 else json.dumps([schema], ensure_ascii=False)


# -- the operations ------------------------------------------------------------------------------------


def save(connection: Connection, where: str, row: Row) -> None:
    """`BasicStore.save`: the whole run, unfenced; its step rows go (the head holds all), its lease stays."""
    connection.execute(
        "INSERT INTO runs (flow, run_id, flow_version, status, started_at, updated_at, finished_at, checkpoint,"
        " report) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (flow, run_id) DO UPDATE SET"
        " flow_version = excluded.flow_version, status = excluded.status, updated_at = excluded.updated_at,"
        " finished_at = excluded.finished_at, checkpoint = excluded.checkpoint, report = excluded.report",
        row,
    )
    connection.execute("DELETE FROM steps WHERE flow = %s AND run_id = %s", (row.flow, row.run_id))


def load(connection: Connection, where: str, flow: str, run_id: str) -> StoredRun | None:
    # One snapshot for the head and its rows: a step committed between the two reads is in both or neither.
    connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    found = find_run(connection, flow, run_id)
    return None if found is None else stored_run(connection, where, found)


def list_runs(connection: Connection, where: str, flow: str | None) -> list[RunRecord]:
    select = f"SELECT {FULL_COLUMNS} FROM runs"
    if flow is None:
        rows = connection.execute(f"{select} ORDER BY started_at, seq").fetchall()
    else:
        rows = connection.execute(f"{select} WHERE flow = %s ORDER BY started_at, seq", (flow,)).fetchall()
    return [run_record(where, texts(row)) for row in rows]


def delete(connection: Connection, where: str, schema: str, flow: str, run_id: str) -> None:
    for table in ("runs", "steps", "interrupts", "labels", "events"):
        connection.execute(f"DELETE FROM {table} WHERE flow = %s AND run_id = %s", (flow, run_id))
    notify(connection, schema, flow, run_id)  # an owner learns at once that its run is gone


def set_labels(connection: Connection, where: str, flow: str, run_id: str, labels: dict[str, str]) -> None:
    merge_labels(connection, flow, run_id, labels)


def labels(connection: Connection, where: str, flow: str, run_id: str) -> dict[str, str]:
    rows = connection.execute("SELECT key, value FROM labels WHERE flow = %s AND run_id = %s", (flow, run_id))
    return dict(sorted(rows.fetchall()))  # code point order, whatever the database's collation


def events(connection: Connection, where: str, flow: str, run_id: str) -> StoredEvents:
    """`EventStore.events`: one snapshot for the events and the count of dropped ones."""
    connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    rows = connection.execute(
        "SELECT seq, event FROM events WHERE flow = %s AND run_id = %s ORDER BY seq", (flow, run_id)
    ).fetchall()
    dropped = int(rows[-1][0]) - len(rows) if rows else 0
    return stored_events(where, flow, run_id, (text for _, text in rows), dropped)
