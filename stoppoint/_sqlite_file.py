"""The file of a `SQLiteStore`: its schema, opening it (checked, or made) as a store, and its transactions.

The on-disk schema of `SQLiteStore` (schema version 2), in SQLite's WAL journal mode::

    PRAGMA user_version = 1234567;  -- the store id: random, positive, 32 bits, in the file's header

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );  -- two rows: ('app', 'stoppoint') and ('schema_version', '2')

    CREATE TABLE runs (  -- one row per run: its head (see `Store`)
        flow         TEXT NOT NULL,  -- Checkpoint.flow (the flow's name)
        run_id       TEXT NOT NULL,  -- Checkpoint.run_id; one flow per run id (checked by claims and submits)
        flow_version TEXT NOT NULL,  -- Checkpoint.flow_version at the latest write
        status       TEXT NOT NULL,  -- a RunStatus value (never 'orphaned': that is read from the lease)
        started_at   TEXT NOT NULL,  -- the first write's report.started_at
        updated_at   TEXT NOT NULL,  -- when the run was last written
        finished_at  TEXT,           -- when its latest attempt ended; NULL while running
        checkpoint   TEXT NOT NULL,  -- JSON: Checkpoint.to_json(), without the outputs of the step rows
        report       TEXT NOT NULL,  -- JSON: RunReport.model_dump_json(); step rows replace their steps'
        owner            TEXT,                        -- the lease's holder (host:pid/token); NULL: nobody
        epoch            INTEGER NOT NULL DEFAULT 0,  -- claims so far (the fencing token); 0: never claimed
        lease_expires_at TEXT,                        -- until when the lease holds without a renewal
        claimed_at       TEXT,                        -- when the owner claimed it
        queue            TEXT,                        -- the queue it was submitted to; NULL: run directly
        PRIMARY KEY (flow, run_id)
    );
    CREATE INDEX runs_by_start ON runs (started_at);
    CREATE INDEX runs_by_id ON runs (run_id);  -- a claim's check that no other flow has the id
    CREATE INDEX runs_to_claim ON runs (status, queue, started_at);  -- claim_next, and its queue limits

    CREATE TABLE steps (  -- one row per step name of a run: commit_step and progress write one
        flow       TEXT NOT NULL,
        run_id     TEXT NOT NULL,
        step       TEXT NOT NULL,     -- the step's name
        epoch      INTEGER NOT NULL,  -- the lease's epoch that wrote it: load() uses the report of the
                                      -- current epoch's rows only, the checkpoint part of every row; 0
                                      -- once the head took its report over (an interrupt of a run
                                      -- nobody holds marks its steps there, as they ended)
        checkpoint TEXT,              -- JSON: a checkpoint of the run holding only this step's part; NULL
                                      -- for a row of progress alone
        report     TEXT NOT NULL,     -- JSON: StepReport.model_dump_json()
        PRIMARY KEY (flow, run_id, step)
    );

    CREATE TABLE interrupts (  -- pending interrupt requests of runs with a live owner (Store.interrupt)
        id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- the request's number: AUTOINCREMENT, so that a
                                                         -- number is never given twice, even once dropped
        flow         TEXT NOT NULL,
        run_id       TEXT NOT NULL,
        reason       TEXT NOT NULL,
        force        INTEGER NOT NULL,  -- 0 or 1
        source       TEXT,
        requested_at TEXT NOT NULL      -- the signal's sent_at
    );
    CREATE INDEX interrupts_by_run ON interrupts (flow, run_id, id);  -- the owner's poll

    CREATE TABLE labels (
        flow   TEXT NOT NULL,  -- the run's flow
        run_id TEXT NOT NULL,  -- and id; a run may have labels before its first save (no foreign key)
        key    TEXT NOT NULL,  -- a label's key, not empty
        value  TEXT NOT NULL,  -- and its value
        PRIMARY KEY (flow, run_id, key)
    );

    CREATE TABLE events (  -- each run's history (EventStore): its last EVENTS_KEPT events
        flow   TEXT NOT NULL,
        run_id TEXT NOT NULL,
        seq    INTEGER NOT NULL,  -- the event's number in the run's history, from 1; older ones deleted
        event  TEXT NOT NULL,     -- JSON: RunEvent.model_dump_json()
        PRIMARY KEY (flow, run_id, seq)
    );

A new file gets it all in one transaction. A step's completion is one small transaction: its row in
`steps` (an upsert, keeping the row's place) and the run row's `updated_at`, both conditional on the
run's `(owner, epoch)`; the head (`runs.checkpoint`, `runs.report`) is written at the start and at the end
of an attempt only, so the cost of a step does not grow with the steps stored before it.

**Schema 1** (stoppoint 0.1) had the `runs` table without its last five columns, no `steps` and no
`interrupts` table, the same indexes but `runs_by_id` and `runs_to_claim`, and `schema_version` '1'. A
schema-1 file is upgraded to schema 2 in place, in one transaction, by the first operation of a store
that writes to it (a save, a claim, a label, an interrupt, a delete...), in that operation's own
transaction: the five columns are added (`ALTER TABLE ... ADD COLUMN`, which rewrites no row: its runs read
as never claimed, epoch 0), the tables and indexes created, and `schema_version` set to '2'. Opening and
reading never modify the file: `load()`, `list_runs()` and `labels()` (and so `stoppoint runs` and `show`)
read a schema-1 file as it is, its runs with no lease. A file not yet in WAL mode is put in it by the first
write too. A stoppoint that reads schema 1 only refuses a file once it is schema 2 (its version is newer),
rather than miss the step rows.

Before schema 1's labels table came, the first files were written without it. The first write adds it
too (`CREATE TABLE IF NOT EXISTS`), and, in the same transaction, a file that still has the table in which
the `stoppoint` command used to keep each run's target beside the store's own (`cli_targets (run_id TEXT
PRIMARY KEY, flow TEXT NOT NULL, target TEXT NOT NULL)`) has its rows moved into `labels`, under the key
`stoppoint.target` (`CLI_TARGET_LABEL`), and that table dropped; until then `labels()` reads the targets
where they are. A `cli_targets` table of other columns is refused on opening, like any file that fails the
checks every opening makes (a SQLite file, with no write-ahead log of another database beside it,
stoppoint's, a schema version this stoppoint knows, not damaged: `PRAGMA integrity_check`, which also checks
every index against its table), so a file that is refused is never modified.

The store id came later too. A new file gets a random one in its header (`PRAGMA user_version`, bytes
60-63 of page 1); a file written before store ids gets one in its first write transaction (then
checkpointed into the file). The id tells the file's write-ahead log (`<path>-wal`) from another
database's, left beside it when the file was replaced, say: SQLite replays any log whose frames are
intact, whichever database wrote it, and its pages replace the file's (its runs vanish). Before a
connection that could write opens the file, an opening compares the id in the file's own header with
the id SQLite reads through the log (read-only: a connection that can write checkpoints the log into
the file when it closes last, a read-only one never does), and refuses a log whose id differs,
touching neither. The check sees what a log holds, and a log holds only the pages its transactions
changed: page 1 if, since the log began, the database grew, freed or reused a page or changed its
header, which a store's saves of any size soon do. A log of another store that does not hold page 1,
or any log beside a file that has no id yet, cannot be told from the file's own and is replayed
(`tests/test_hardening_store.py` shows it). The id is not in `meta`, whose page is written once, when
the file is made, so that no log would ever hold it.

The events table came after schema 2 and keeps its version: it is added with `CREATE TABLE IF NOT EXISTS`
by the first write, like the labels table before it, and a file without it reads as one with no events (a
stoppoint before it ignores the table: nothing it reads changed). An append is one transaction, fenced by
the run's epoch, that inserts the new events and deletes those beyond the last `EVENTS_KEPT`; the count of
dropped events is the last number less the count kept. A new run row (a first claim, save or submit) first
deletes any events left under its name (by a stoppoint before events, whose `delete()` left them).

Times are ISO 8601 text in UTC with microseconds, `2026-01-31T12:00:00.000000+00:00` (a naive time in
a report is taken as UTC), so text order is time order: a lease is live while `lease_expires_at` is
above the reader's clock as text. `list_runs()` orders by `started_at`, then by `rowid` (the order of
the runs' first saves). A later schema gets a higher `schema_version`; a stoppoint that finds a version it
does not know refuses the file rather than guess.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ._errors import StoreError
from ._sqlite_schema import (
    OLD_TARGETS_TABLE,
    SCHEMA_VERSION,
    check_old_targets,
    check_schema,
    initialise,
    needs_upgrade,
    read_version,
    tables,
    upgrade,
)

__all__ = ["StoreFile", "open_file", "store_error"]

T = TypeVar("T")

_SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
_HEADER_SIZE = 100  # the database header, at the start of page 1
_STORE_ID = slice(60, 64)  # where the header keeps `PRAGMA user_version`: the store id (see the module docstring)
_WAL_HEADER_SIZE = 32  # a write-ahead log no longer than its header holds no page

_BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another connection's lock (another process sharing the file) before
failing with a `StoreError` saying the store is busy (and, where the system tells, which process holds
the lock). Read when the file is opened; tests set it shorter."""

_PENDING_BYTE = 0x40000000
_LOCK_BYTES = 512
"""SQLite's locks on the database file (`os_unix.c`): PENDING at `_PENDING_BYTE`, RESERVED next, then 510
bytes for SHARED. A writer (or an exclusive locking mode) holds some of them write-locked."""
_WAL_WRITE_LOCKS = (120, 122)
"""The bytes of the `-shm` file that WAL mode's writer, checkpointer and recovery lock for writing."""

_SYNCHRONOUS = "FULL"
"""`PRAGMA synchronous`. In WAL mode, NORMAL already makes a commit survive the process being killed
(`kill -9`): the commit is in the WAL file, in the OS's hands, when `save()` returns. FULL also fsyncs
the WAL at every commit, so a commit survives a power loss or an OS crash too; that is what the
durability rule promises ("committed before any dependent step starts"). It costs one fsync per
save: measured on ext4 on a virtual disk (500 saves of a 5-step checkpoint, median of 5 runs), 0.70 ms
per save against 0.32 ms with NORMAL (MemoryStore: 0.06 ms); small next to a step worth persisting. On
slow disks fsync costs more; NORMAL would then be the trade to make, for kill -9 safety only."""

_INTEGRITY_CHECK = "PRAGMA integrity_check"
"""The check every opening makes (every opening may write). `quick_check` reads every page and checks each
b-tree's structure, but not that an index holds what its table does: one flipped byte inside a key of the
primary key's index passes it, and then hides the run from `load()` (its steps would all run again) and from
the UNIQUE check (a second row would be inserted for the same `(flow, run_id)`). `integrity_check` also looks
every row up in every index. Measured on a 64 MB store (CPython 3.11, SQLite 3.40, ext4 on a virtual disk, median
of 15): 2,000 runs of 30 KB, 21 ms against 22 ms; 16,500 runs of 4 KB, 49 ms against 66 ms; from a cold page
cache both cost the reads, 395 against 410 ms and 724 against 770 ms."""


def _primary_code(exc: sqlite3.Error) -> int | None:
    """The primary result code of SQLite's error (of an extended one too), or None for an error Python's `sqlite3`
    raises itself, such as a column it could not decode."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _not_utf8(exc: sqlite3.Error | UnicodeError) -> str | None:
    """What an error says about text in the file that is not UTF-8, or None if it is about something else.

    Python's `sqlite3` decodes every text it hands over as UTF-8: a column value or name that is not UTF-8 becomes
    an `OperationalError` of its own ("Could not decode to UTF-8 column ..."), and a message of SQLite's that is
    not (one naming a table or an index whose name is not UTF-8) a bare `UnicodeDecodeError`, whose `object` is
    the message (shown with the bytes that are not UTF-8 escaped).
    """
    if isinstance(exc, UnicodeDecodeError):
        return bytes(exc.object).decode("utf-8", "backslashreplace")
    if isinstance(exc, UnicodeError):  # an encoding error: text of this process, not of the file
        return None
    if _primary_code(exc) is None and str(exc).startswith("Could not decode to UTF-8"):
        return str(exc)
    return None


def _lock_holder(path: str) -> str | None:
    """Who holds the lock on the store at `path` that a connection waits for, as "process PID (COMMAND)" (or
    "another connection of this process"), if the system tells: Linux lists the POSIX locks, which SQLite takes,
    in /proc/locks. None elsewhere, or when no such lock is held any more. It only reads: opening and closing the
    database file would drop this process's own SQLite locks on it (POSIX locks belong to the process)."""
    ranges: dict[str, tuple[int, int]] = {}
    for file, (first, last) in (
        (path, (_PENDING_BYTE, _PENDING_BYTE + _LOCK_BYTES - 1)),
        (path + "-shm", _WAL_WRITE_LOCKS),
    ):
        try:
            stat = os.stat(file)
        except OSError:
            continue
        ranges[f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"] = (first, last)
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: POSIX  ADVISORY  WRITE 1234 fe:00:2154920 120 120"; a waiter's line has "->" after the number.
        fields = line.split()
        if len(fields) != 8 or fields[1:4] != ["POSIX", "ADVISORY", "WRITE"] or fields[5] not in ranges:
            continue
        first, last = ranges[fields[5]]
        try:
            pid, start, end = int(fields[4]), int(fields[6]), (last if fields[7] == "EOF" else int(fields[7]))
        except ValueError:  # not the format this reads: say nothing rather than guess
            return None
        if start > last or end < first:
            continue
        if pid == os.getpid():
            return "another connection of this process"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = " ".join(cmdline.read().decode("utf-8", "replace").replace("\0", " ").split())
        except OSError:
            command = ""
        if len(command) > 120:
            command = command[:117] + "..."
        return f"process {pid} ({command})" if command else f"process {pid}"
    return None


def store_error(exc: sqlite3.Error | UnicodeError, path: str, where: str) -> StoreError:
    """The `StoreError` for what SQLite, or Python's `sqlite3`, raised on the store at `path` (`where`: what was
    being done)."""
    if isinstance(exc, sqlite3.Error) and _primary_code(exc) == sqlite3.SQLITE_BUSY:
        holder = _lock_holder(path) or "another connection"
        return StoreError(
            f"SQLite store {path!r} is busy: {holder} has held a lock on it for longer than the busy "
            f"timeout ({_BUSY_TIMEOUT_S:g} s); try again when it is done (SQLite: {exc})"
        )
    text = _not_utf8(exc)
    if text is not None:
        return StoreError(
            f"{where}: the file holds text that is not UTF-8, which no stoppoint store writes (a damaged file, or "
            f"not a stoppoint store): {text}"
        )
    return StoreError(f"{where}: {exc}")


class StoreFile:
    """An open store file: its connection, and what this connection knows of the file. Used by one thread
    at a time (the store's lock).

    Attributes:
        connection: The connection (autocommit: each operation makes its own transaction, `read` or `write`).
        path: The file's path.
        where: "SQLite store PATH", for messages.
        schema: The file's schema version as last seen: 1 until a write upgrades it (this process's or another's).
        old_labels: Whether the labels may still be where a file written before schema 1's labels table
            keeps them (no labels table, or the old command's targets table): `labels()` then looks there.
        writes: How many write transactions this connection committed (memos of what it read key on it).
        interrupts_seen: The `PRAGMA data_version` and `writes` when `interrupts_memo` was last cleared.
        interrupts_memo: Per run, the holder, epoch and pending requests last read (`_sqlite_leases.interrupts`).
    """

    def __init__(
        self, connection: sqlite3.Connection, path: str, *, schema: int, upgraded: bool, wal: bool, old_labels: bool
    ) -> None:
        self.connection = connection
        self.path = path
        self.where = f"SQLite store {path!r}"
        self.schema = schema
        self.old_labels = old_labels
        self.writes = 0
        self.interrupts_seen: tuple[int, int] | None = None
        self.interrupts_memo: dict[tuple[str, str], tuple[str | None, int | None, list[Any]]] = {}
        self._upgraded = upgraded
        self._wal = wal

    def read(self, statements: Callable[[], T]) -> T:
        """`statements()` in one read transaction: one snapshot of the file, in which nothing is written."""
        connection = self.connection
        connection.execute("BEGIN")
        try:
            if self.schema < SCHEMA_VERSION:  # another process may have upgraded it since
                self.schema = read_version(connection)
            result = statements()
            connection.execute("COMMIT")
        except BaseException:
            _roll_back(connection)
            raise
        return result

    def write(self, statements: Callable[[], T]) -> T:
        """`statements()` in one write transaction. The first one also upgrades the file (see the module
        docstring), so an upgrade comes with a write and never with a read. IMMEDIATE takes the write lock
        at BEGIN, where the busy timeout applies (a read upgraded to a write later could fail at once in WAL
        mode), so the statements see the file as no other writer can change it until COMMIT."""
        connection = self.connection
        if not self._wal:
            _wal_mode(connection, self.path)
            self._wal = True
        connection.execute("BEGIN IMMEDIATE")
        gave_id, schema = False, self.schema
        try:
            if not self._upgraded:
                gave_id = upgrade(connection, self.path)
                self.schema = SCHEMA_VERSION  # for the statements, which see the file upgraded
            result = statements()
            connection.execute("COMMIT")
        except BaseException:
            self.schema = schema  # the upgrade is rolled back with the rest
            _roll_back(connection)
            raise
        self.writes += 1
        self._upgraded, self.old_labels = True, False
        if gave_id:  # the new id is in the log: copy it into the file now (if no reader is in the way)
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return result


def _roll_back(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error, UnicodeDecodeError):
            connection.execute("ROLLBACK")


def _transaction(connection: sqlite3.Connection, statements: Callable[[], object]) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        statements()
        connection.execute("COMMIT")
    except BaseException:
        _roll_back(connection)
        raise


def _wal_mode(connection: sqlite3.Connection, path: str) -> None:
    (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot use {path!r}: SQLite cannot put it in WAL mode (journal mode {mode!r})")


def open_file(path: str) -> StoreFile:
    """Open the file and check it is a stoppoint store (or make it one, if it is new).

    Nothing is written to a file that is not a new or empty file: the checks only read, and what an
    older file lacks (see the module docstring) is added by its first write.
    """
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
            f"cannot use {path!r}: its directory is not writable (SQLite keeps its write-ahead log next to the file)"
        )
    header = b""
    if size is not None:
        if not os.access(path, os.R_OK | os.W_OK):
            raise StoreError(f"cannot use {path!r}: the file is not readable and writable")
        if size > 0:
            try:
                with open(path, "rb") as stream:
                    header = stream.read(_HEADER_SIZE)
            except OSError as exc:
                raise StoreError(f"cannot open {path!r}: {exc}") from exc
            if header[: len(_SQLITE_HEADER)] != _SQLITE_HEADER:
                raise StoreError(f"{path!r} is not a SQLite database (it does not start with SQLite's header)")
    # A URI, to say whether the file may be created (rwc) or must exist (rw); as_uri() escapes ?, # and %.
    uri = Path(path).absolute().as_uri() + ("?mode=rw" if size is not None else "?mode=rwc")
    connection: sqlite3.Connection | None = None
    try:
        _check_log(path, header)
        connection = sqlite3.connect(
            uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        file = _prepare(connection, path)
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        if connection is not None:
            with contextlib.suppress(sqlite3.Error, UnicodeDecodeError):  # the error to report is the first
                connection.close()
        if isinstance(exc, sqlite3.Error) and _primary_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            raise StoreError(f"{path!r} is a damaged SQLite file (truncated or corrupt): {exc}") from exc
        raise store_error(exc, path, f"cannot open {path!r}") from exc
    except BaseException:  # a refusal of _prepare's own (a StoreError), or a KeyboardInterrupt
        if connection is not None:
            with contextlib.suppress(sqlite3.Error, UnicodeDecodeError):
                connection.close()
        raise
    return file


def _check_log(path: str, header: bytes) -> None:
    """Refuse a write-ahead log beside the file that is not its own (see the module docstring): the store id
    in the file's header against the one SQLite reads through the log, before any connection that could
    write opens the file. SQLite errors go to `_open`.

    The log is read by a read-only connection: a connection that can write checkpoints the log into the
    file when it closes last (the refusal would have merged the other database's pages into the file), a
    read-only one never does. Reading the log may leave its index, `<path>-shm`, beside it.
    """
    file_id = int.from_bytes(header[_STORE_ID], "big", signed=True) if len(header) == _HEADER_SIZE else 0
    if file_id == 0:  # a new file, or one written before store ids (or its id not yet checkpointed into it)
        return
    log = path + "-wal"
    try:
        if os.stat(log).st_size <= _WAL_HEADER_SIZE:
            return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot open {path!r}: cannot read its write-ahead log {log!r}: {exc}") from exc
    reader = sqlite3.connect(
        Path(path).absolute().as_uri() + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None
    )
    try:
        (log_id,) = reader.execute("PRAGMA user_version").fetchone()
    finally:
        reader.close()
    if log_id != file_id:
        raise StoreError(
            f"{path!r} has beside it a write-ahead log that is not its own ({log!r}: store id {log_id or 'none'}, "
            f"the file's {file_id}; another database's log, left behind when the file was replaced?). Opening "
            f"would replay it into the file, so neither was touched; if the file is the store you want, move "
            f"{log!r} (and {path + '-shm'!r}) away"
        )


def _prepare(connection: sqlite3.Connection, path: str) -> StoreFile:
    """Check the schema of a stoppoint store, or initialise a new file (then in WAL mode); an existing file is
    only read. SQLite errors go to `open_file`."""
    names = tables(connection)
    if names:
        schema = check_schema(connection, path, names)
        check_old_targets(connection, path, names)
        # A truncated or damaged file fails here, not mid-run (see _INTEGRITY_CHECK).
        problems = [line for (line,) in connection.execute(_INTEGRITY_CHECK)]
        if problems != ["ok"]:
            raise StoreError(f"{path!r} is a damaged SQLite file (truncated or corrupt): {'; '.join(problems[:5])}")
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()  # reads it: a write turns WAL on
        wal = str(mode).lower() == "wal"
    else:
        _transaction(connection, lambda: initialise(connection, path))
        names = tables(connection)  # another process's, if it got there first
        schema = check_schema(connection, path, names)
        _wal_mode(connection, path)
        wal = True
    connection.execute(f"PRAGMA synchronous = {_SYNCHRONOUS}")
    return StoreFile(
        connection,
        path,
        schema=schema,
        upgraded=not needs_upgrade(connection, schema, names),
        wal=wal,
        old_labels="labels" not in names or OLD_TARGETS_TABLE in names,
    )
