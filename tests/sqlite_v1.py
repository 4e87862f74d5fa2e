"""A store file as stoppoint 0.1 wrote it (schema 1: the statements of `stoppoint/_sqlite_file.py` at commit
997303e, copied here so that the upgrade is tested against them, not against the current code)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

from stoppoint import Checkpoint, RunReport
from stoppoint._rows import to_row

SCHEMA_1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE runs ("
    " flow TEXT NOT NULL, run_id TEXT NOT NULL, flow_version TEXT NOT NULL, status TEXT NOT NULL,"
    " started_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT,"
    " checkpoint TEXT NOT NULL, report TEXT NOT NULL, PRIMARY KEY (flow, run_id))",
    "CREATE INDEX runs_by_start ON runs (started_at)",
)
LABELS_TABLE_1 = (
    "CREATE TABLE IF NOT EXISTS labels (flow TEXT NOT NULL, run_id TEXT NOT NULL, key TEXT NOT NULL,"
    " value TEXT NOT NULL, PRIMARY KEY (flow, run_id, key))"
)
COLUMNS_1 = "flow, run_id, flow_version, status, started_at, updated_at, finished_at, checkpoint, report"


def write_schema_1(
    path: Path,
    runs: Iterable[tuple[Checkpoint, RunReport]] = (),
    *,
    labels: Mapping[tuple[str, str], Mapping[str, str]] | None = None,
    labels_table: bool = True,
    store_id: int = 1234567,
) -> None:
    """Write a schema-1 store at `path` holding `runs` (saved once each, as 0.1's `save()` stored them) and
    `labels`, in WAL mode as 0.1 left every file; without the labels table (as the first files were) if
    `labels_table` is false, and without a store id if `store_id` is 0. Closed, so the file holds it all."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA_1 + ((LABELS_TABLE_1,) if labels_table else ()):
            db.execute(statement)
        db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [("app", "stoppoint"), ("schema_version", "1")])
        db.execute(f"PRAGMA user_version = {store_id}")
        for checkpoint, report in runs:
            db.execute(f"INSERT INTO runs ({COLUMNS_1}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", to_row(checkpoint, report))
        for (flow, run_id), pairs in (labels or {}).items():
            db.executemany(
                "INSERT INTO labels (flow, run_id, key, value) VALUES (?, ?, ?, ?)",
                [(flow, run_id, key, value) for key, value in pairs.items()],
            )
        db.execute("COMMIT")
    finally:
        db.close()
