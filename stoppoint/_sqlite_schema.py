"""The statements of a `SQLiteStore` file's schema (documented in `_sqlite_file`'s docstring): making a new
file, checking a file's version, and upgrading a file of an earlier schema, in its first write transaction."""

from __future__ import annotations

import secrets
import sqlite3

from ._errors import StoreError
from ._store import CLI_TARGET_LABEL

__all__ = [
    "EVENTS_TABLE",
    "OLD_TARGETS_TABLE",
    "SCHEMA_VERSION",
    "check_old_targets",
    "check_schema",
    "initialise",
    "needs_upgrade",
    "read_version",
    "tables",
    "upgrade",
]

_APP = "stoppoint"
SCHEMA_VERSION = 2

_LABELS_TABLE = (  # IF NOT EXISTS: also how a file written before labels gets the table
    "CREATE TABLE IF NOT EXISTS labels (flow TEXT NOT NULL, run_id TEXT NOT NULL, key TEXT NOT NULL,"
    " value TEXT NOT NULL, PRIMARY KEY (flow, run_id, key))"
)

EVENTS_TABLE = (  # IF NOT EXISTS: how a file written before it gets the table, in its first write
    "CREATE TABLE IF NOT EXISTS events (flow TEXT NOT NULL, run_id TEXT NOT NULL, seq INTEGER NOT NULL,"
    " event TEXT NOT NULL, PRIMARY KEY (flow, run_id, seq))"
)

_LEASE_COLUMNS = (  # schema 2's columns of runs; ADD COLUMN puts them last, so a new file has them last too
    "owner TEXT",
    "epoch INTEGER NOT NULL DEFAULT 0",
    "lease_expires_at TEXT",
    "claimed_at TEXT",
    "queue TEXT",
)

_SCHEMA_2 = (  # what schema 2 adds to schema 1, but the lease columns of runs
    "CREATE INDEX runs_by_id ON runs (run_id)",
    "CREATE INDEX runs_to_claim ON runs (status, queue, started_at)",
    "CREATE TABLE steps (flow TEXT NOT NULL, run_id TEXT NOT NULL, step TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " checkpoint TEXT, report TEXT NOT NULL, PRIMARY KEY (flow, run_id, step))",
    "CREATE TABLE interrupts (id INTEGER PRIMARY KEY AUTOINCREMENT, flow TEXT NOT NULL, run_id TEXT NOT NULL,"
    " reason TEXT NOT NULL, force INTEGER NOT NULL, source TEXT, requested_at TEXT NOT NULL)",
    "CREATE INDEX interrupts_by_run ON interrupts (flow, run_id, id)",
)

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE runs ("
    " flow TEXT NOT NULL, run_id TEXT NOT NULL, flow_version TEXT NOT NULL, status TEXT NOT NULL,"
    " started_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT,"
    f" checkpoint TEXT NOT NULL, report TEXT NOT NULL, {', '.join(_LEASE_COLUMNS)}, PRIMARY KEY (flow, run_id))",
    "CREATE INDEX runs_by_start ON runs (started_at)",
    *_SCHEMA_2,
    _LABELS_TABLE,
    EVENTS_TABLE,
)

_TABLES = {1: {"meta", "runs"}, 2: {"meta", "runs", "steps", "interrupts"}}
"""The tables a file of each schema version must have. Not labels: schema 1's first files had none, and a file
without it is read as such (its first write adds it); not events either, for the same reason (files written
before event histories have none)."""

OLD_TARGETS_TABLE = "cli_targets"
"""The table in which the `stoppoint` command kept each run's target before labels (see `_sqlite_file`)."""
_OLD_TARGETS_COLUMNS = ("run_id", "flow", "target")


def _version_number(value: object) -> int | None:
    """The schema version in the meta table as a number (text of decimal digits, or an integer), else None."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _new_store_id() -> int:
    """A random store id: a positive 32-bit signed integer, as `PRAGMA user_version` keeps it (0 is "none")."""
    return secrets.randbelow(2**31 - 1) + 1


def tables(connection: sqlite3.Connection) -> set[str]:
    """The names of the file's tables."""
    return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def read_version(connection: sqlite3.Connection) -> int:
    """The schema version of a file that was checked already (`check_schema`): 1 or 2."""
    found = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 1 if found is None or _version_number(found[0]) != SCHEMA_VERSION else SCHEMA_VERSION


def needs_upgrade(connection: sqlite3.Connection, version: int, names: set[str]) -> bool:
    """Whether the first write must upgrade the file (`upgrade`): an earlier schema, no labels or events table
    yet, the old command's targets still in their table, or no store id."""
    if version < SCHEMA_VERSION or "labels" not in names or "events" not in names or OLD_TARGETS_TABLE in names:
        return True
    (store_id,) = connection.execute("PRAGMA user_version").fetchone()
    return bool(store_id == 0)


def initialise(connection: sqlite3.Connection, path: str) -> None:
    """Create the schema in a new (or empty) file; in the write transaction, so that when another
    process got there first, its schema is checked instead."""
    names = tables(connection)
    if names:
        check_schema(connection, path, names)
        return
    for statement in _SCHEMA:
        connection.execute(statement)
    connection.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)", [("app", _APP), ("schema_version", str(SCHEMA_VERSION))]
    )
    connection.execute(f"PRAGMA user_version = {_new_store_id()}")


def upgrade(connection: sqlite3.Connection, path: str) -> bool:
    """Bring a file of schema 1, or written before labels or store ids, up to date (see `_sqlite_file`); in
    the write transaction of the file's first write, so that what another process did meanwhile is seen
    (this does only what is left to do), and the upgrade is all or nothing.

    Returns:
        Whether it gave the file a store id (which the caller then checkpoints into the file).

    Raises:
        StoreError: The file's `cli_targets` table is not the one the `stoppoint` command made.
    """
    names = tables(connection)
    check_old_targets(connection, path, names)
    if read_version(connection) < SCHEMA_VERSION:
        for column in _LEASE_COLUMNS:
            connection.execute(f"ALTER TABLE runs ADD COLUMN {column}")
        for statement in _SCHEMA_2:
            connection.execute(statement)
        connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    connection.execute(_LABELS_TABLE)
    connection.execute(EVENTS_TABLE)
    if OLD_TARGETS_TABLE in names:
        # A row without a run id, flow or target was never found by the command: there is nothing to keep.
        # OR REPLACE: an older stoppoint command wrote the row after an earlier move, so it is the newer one.
        connection.execute(
            "INSERT OR REPLACE INTO labels (flow, run_id, key, value)"
            f" SELECT flow, run_id, ?, target FROM {OLD_TARGETS_TABLE}"
            " WHERE flow IS NOT NULL AND run_id IS NOT NULL AND target IS NOT NULL",
            (CLI_TARGET_LABEL,),
        )
        connection.execute(f"DROP TABLE {OLD_TARGETS_TABLE}")
    (store_id,) = connection.execute("PRAGMA user_version").fetchone()
    if store_id == 0:
        connection.execute(f"PRAGMA user_version = {_new_store_id()}")
    return bool(store_id == 0)


def check_old_targets(connection: sqlite3.Connection, path: str, names: set[str]) -> None:
    """Refuse a `cli_targets` table that is not the one the `stoppoint` command made (its rows could not be
    moved into labels); reads only.

    Raises:
        StoreError: Its columns are not the command's.
    """
    if OLD_TARGETS_TABLE not in names:
        return
    columns = [row[1] for row in connection.execute(f"PRAGMA table_info({OLD_TARGETS_TABLE})")]
    if not set(_OLD_TARGETS_COLUMNS) <= set(columns):
        raise StoreError(
            f"{path!r} is a stoppoint store with a {OLD_TARGETS_TABLE} table that is not the one the "
            f"stoppoint command made (its columns: {', '.join(map(str, columns))}; expected "
            f"{', '.join(_OLD_TARGETS_COLUMNS)}), so its rows cannot be moved into the labels table"
        )


def check_schema(connection: sqlite3.Connection, path: str, names: set[str]) -> int:
    """The schema version of a stoppoint store (1 or 2), checked; reads only.

    Raises:
        StoreError: The file is not a stoppoint store, or is one of a version this stoppoint does not know, or
            lacks a table of its version.
    """
    foreign = f"{path!r} is a SQLite database that is not a stoppoint store"
    if "meta" not in names:
        raise StoreError(f"{foreign} (it has no meta table; its tables: {', '.join(sorted(names))})")
    try:
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF != sqlite3.SQLITE_ERROR:  # locked, corrupt...
            raise
        raise StoreError(f"{foreign} (its meta table is not stoppoint's: {exc})") from exc
    if meta.get("app") != _APP:
        raise StoreError(f"{foreign} (its meta table has no app = 'stoppoint' row)")
    version = meta.get("schema_version")
    number = _version_number(version)
    if number is not None and number > SCHEMA_VERSION:
        raise StoreError(
            f"{path!r} is a stoppoint store of a newer schema version ({number}) than this stoppoint reads "
            f"({SCHEMA_VERSION}); upgrade stoppoint to use it"
        )
    if number not in _TABLES:
        raise StoreError(f"{path!r} is a stoppoint store of an unknown schema version {version!r}")
    missing = sorted(_TABLES[number] - names)
    if missing:
        raise StoreError(f"{path!r} is a damaged stoppoint store: its {missing[0]} table is missing")
    return number
