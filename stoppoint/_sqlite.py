"""SQLiteStore: runs in one SQLite file, which several processes may share.

The on-disk schema of `SQLiteStore` (schema version 1), in SQLite's WAL journal mode::

    PRAGMA user_version = 1234567;  -- the store id: random, positive, 32 bits, in the file's header

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
file, with no write-ahead log of another database beside it, stoppoint's, a schema version this
stoppoint knows, not damaged: `PRAGMA integrity_check`, which also checks every index against its
table), so a file that is refused is never modified.

The store id came later too. A new file gets a random one in its header (`PRAGMA user_version`, bytes
60-63 of page 1); a file written before store ids gets one the first time it is opened, in the same
write transaction (then checkpointed into the file), and stays schema version 1: a stoppoint that does
not know the id never reads it. The id tells the file's write-ahead log (`<path>-wal`) from another
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

Times are ISO 8601 text in UTC with microseconds, `2026-01-31T12:00:00.000000+00:00` (a naive time in
a report is taken as UTC), so text order is time order. `list_runs()` orders by `started_at`, then
by `rowid` (the order of the runs' first saves). A later schema gets a higher `schema_version`; a
stoppoint that finds a version it does not know refuses the file rather than guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.to_thread

from ._checkpoint import Checkpoint
from ._errors import StoreError
from ._outcome import RunReport
from ._rows import RECORD_COLUMNS, ROW_COLUMNS, Row, check_names, checked_labels, to_record, to_row, to_stored, utf8
from ._store import CLI_TARGET_LABEL, RunRecord, StoredRun

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_APP = "stoppoint"
_SCHEMA_VERSION = 1
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


def _new_store_id() -> int:
    """A random store id: a positive 32-bit signed integer, as `PRAGMA user_version` keeps it (0 is "none")."""
    return secrets.randbelow(2**31 - 1) + 1


def _primary_code(exc: sqlite3.Error) -> int | None:
    """The primary result code of SQLite's error (of an extended one too), or None for an error Python's `sqlite3`
    raises itself, such as a column it could not decode."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _not_utf8(exc: sqlite3.Error | UnicodeDecodeError) -> str | None:
    """What an error says about text in the file that is not UTF-8, or None if it is about something else.

    Python's `sqlite3` decodes every text it hands over as UTF-8: a column value or name that is not UTF-8 becomes
    an `OperationalError` of its own ("Could not decode to UTF-8 column ..."), and a message of SQLite's that is
    not (one naming a table or an index whose name is not UTF-8) a bare `UnicodeDecodeError`, whose `object` is
    the message (shown with the bytes that are not UTF-8 escaped).
    """
    if isinstance(exc, UnicodeDecodeError):
        return bytes(exc.object).decode("utf-8", "backslashreplace")
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


class _Job(Generic[T]):
    """One call into a worker thread: `run()` there, and, if its caller's wait is cut off, `settled()`
    in the event loop, which makes sure the call never starts or has ended."""

    __slots__ = ("args", "ended", "fn", "lock", "started", "waiter")

    def __init__(self, fn: Callable[..., T], *args: Any) -> None:
        self.fn = fn
        self.args = args
        self.lock = threading.Lock()
        self.started = False  # False for ever once settled() found it not started
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None

    def run(self) -> T | None:
        with self.lock:
            if self.started:  # (settled() dropped it: it must not start now)
                return None
            self.started = True
        try:
            return self.fn(*self.args)
        finally:
            with self.lock:
                self.ended = True
                waiter = self.waiter
            if waiter is not None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                    waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    async def settled(self) -> None:
        """Wait (through further native cancellations) until the call has ended, or drop it if it has
        not started."""
        with self.lock:
            if not self.started:
                self.started = True  # run() returns at once if a worker thread still calls it
                return
            if self.ended:
                return
            self.waiter = waiter = asyncio.get_running_loop().create_future()
        while not waiter.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class SQLiteStore:
    """A store in one SQLite file (stdlib `sqlite3`), which several processes may share.

    Use it as `async with SQLiteStore(path) as store:` (or call `await store.aclose()`, or `close()`
    from synchronous code, when done). Constructing it touches nothing: the file is opened, and
    checked, on entering `async with` or on first use. A path that does not exist (or an empty file)
    becomes a new store; an existing file is used only if it is an undamaged stoppoint store of a
    schema version this stoppoint knows, without another database's write-ahead log beside it, and is
    never modified otherwise. The schema is in this module's docstring; a file written before the
    labels table gets it (and the `stoppoint` command's old targets moved into it), and one written
    before store ids gets one, the first time it is opened. It is a `LabelStore`: it keeps labels
    beside the runs.

    Each `save()` is one transaction, committed (and, with `synchronous=FULL`, flushed to disk) when it
    returns. All file I/O runs in a worker thread (`anyio.to_thread.run_sync`), so the event loop never
    waits on the disk; the checkpoint is serialised to JSON in the caller's thread first, since step
    outputs belong to the event loop's thread.

    One connection serves the whole store, used by one thread at a time under a lock: SQLite
    connections must not be used concurrently, a per-thread connection would have to be opened (and
    checked) again for each of anyio's short-lived worker threads and could not be closed by
    `close()`, and one process gains nothing from several connections to one file (SQLite lets one
    writer in at a time anyway). Other processes wait for this one's transactions through SQLite's
    busy timeout (30 s); a lock held longer than that (another process in a long transaction, say)
    fails the operation with a `StoreError` saying the store is busy, naming the process that holds
    the lock where the system tells (Linux).

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
        row = to_row(checkpoint, report)
        await self._call(self._save, row)

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None (see `Store.load`).

        Raises:
            StoreError: The file cannot be opened or read, or the run's row is invalid.
        """
        check_names("load", flow, run_id)
        if not utf8(flow, run_id):  # SQLite could not even take the query; no run of that name is stored
            return None
        return await self._call(self._load, flow, run_id)

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first (see `Store.list_runs`).

        Raises:
            StoreError: The file cannot be opened or read, or a row is invalid.
        """
        check_names("list_runs", flow)
        if flow is not None and not utf8(flow):
            return []
        return await self._call(self._list_runs, flow)

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run; nothing happens if there is none (see `Store.delete`).

        Raises:
            StoreError: The file cannot be opened or written.
        """
        check_names("delete", flow, run_id)
        if utf8(flow, run_id):
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
        checked = checked_labels(flow, run_id, labels)
        await self._call(self._set_labels, flow, run_id, checked)

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        """The run's labels, in key order; `{}` if it has none (see `LabelStore.labels`).

        Raises:
            StoreError: The file cannot be opened or read, or a stored label is not text.
        """
        check_names("labels", flow, run_id)
        if not utf8(flow, run_id):  # as in load(): no run of that name is stored
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
                except (sqlite3.Error, UnicodeDecodeError) as exc:
                    raise self._error(exc, f"{self._where}: cannot close") from exc

    # -- in the worker thread ----------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"SQLite store {self._path!r}"

    async def _call(self, operation: Callable[..., T], *args: Any) -> T:
        job = _Job(self._locked, operation, *args)
        try:
            return cast(T, await anyio.to_thread.run_sync(job.run))  # (None only for a job dropped)
        except asyncio.CancelledError:
            # asyncio: a native Task.cancel() of the caller (anyio's own cancellation does not reach the
            # wait) stops the wait, not the thread. The operation must not go on behind the caller's
            # back, where a later one (the run's next save) could overtake it: it is dropped if it has
            # not started, else waited for.
            await job.settled()
            raise

    def _locked(self, operation: Callable[..., T], *args: Any) -> T:
        """Run `operation(connection, *args)` under the lock, opening the file on first use."""
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._where} is closed")
            if self._connection is None:
                self._connection = self._open()
            try:
                return operation(self._connection, *args)
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._error(exc, self._where) from exc

    def _error(self, exc: sqlite3.Error | UnicodeDecodeError, where: str) -> StoreError:
        """The `StoreError` for what SQLite, or Python's `sqlite3`, raised (`where`: what was being done)."""
        if isinstance(exc, sqlite3.Error) and _primary_code(exc) == sqlite3.SQLITE_BUSY:
            holder = _lock_holder(self._path) or "another connection"
            return StoreError(
                f"SQLite store {self._path!r} is busy: {holder} has held a lock on it for longer than the busy "
                f"timeout ({_BUSY_TIMEOUT_S:g} s); try again when it is done (SQLite: {exc})"
            )
        text = _not_utf8(exc)
        if text is not None:
            return StoreError(
                f"{where}: the file holds text that is not UTF-8, which no stoppoint store writes (a damaged file, or "
                f"not a stoppoint store): {text}"
            )
        return StoreError(f"{where}: {exc}")

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
                with contextlib.suppress(sqlite3.Error, UnicodeDecodeError):
                    connection.execute("ROLLBACK")
            raise

    def _save(self, connection: sqlite3.Connection, row: Row) -> None:
        def statements() -> None:
            updated = connection.execute(
                "UPDATE runs SET flow_version = ?, status = ?, updated_at = ?, finished_at = ?, checkpoint = ?,"
                " report = ? WHERE flow = ? AND run_id = ?",  # started_at stays the first save's
                (*row[2:4], *row[5:], row.flow, row.run_id),
            )
            if updated.rowcount == 0:
                connection.execute(f"INSERT INTO runs ({ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

        self._write(connection, statements)

    def _load(self, connection: sqlite3.Connection, flow: str, run_id: str) -> StoredRun | None:
        found = connection.execute(
            f"SELECT {ROW_COLUMNS} FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id)
        ).fetchone()
        return None if found is None else to_stored(found, self._where)

    def _list_runs(self, connection: sqlite3.Connection, flow: str | None) -> list[RunRecord]:
        if flow is None:
            rows = connection.execute(f"SELECT {RECORD_COLUMNS} FROM runs ORDER BY started_at, rowid")
        else:
            rows = connection.execute(
                f"SELECT {RECORD_COLUMNS} FROM runs WHERE flow = ? ORDER BY started_at, rowid", (flow,)
            )
        return [to_record(row, self._where) for row in rows]

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
        header = b""
        if size is not None:
            if not os.access(path, os.R_OK | os.W_OK):
                raise StoreError(f"cannot use {path!r}: the file is not readable and writable")
            if size > 0:
                try:
                    with open(path, "rb") as file:
                        header = file.read(_HEADER_SIZE)
                except OSError as exc:
                    raise StoreError(f"cannot open {path!r}: {exc}") from exc
                if header[: len(_SQLITE_HEADER)] != _SQLITE_HEADER:
                    raise StoreError(f"{path!r} is not a SQLite database (it does not start with SQLite's header)")
        # A URI, to say whether the file may be created (rwc) or must exist (rw); as_uri() escapes ?, # and %.
        uri = Path(path).absolute().as_uri() + ("?mode=rw" if size is not None else "?mode=rwc")
        connection: sqlite3.Connection | None = None
        try:
            self._check_log(header)
            connection = sqlite3.connect(
                uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._prepare(connection)
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            if connection is not None:
                with contextlib.suppress(sqlite3.Error, UnicodeDecodeError):  # the error to report is the first
                    connection.close()
            if isinstance(exc, sqlite3.Error) and _primary_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise StoreError(f"{path!r} is a damaged SQLite file (truncated or corrupt): {exc}") from exc
            raise self._error(exc, f"cannot open {path!r}") from exc
        except BaseException:  # a refusal of _prepare's own (a StoreError), or a KeyboardInterrupt
            if connection is not None:
                with contextlib.suppress(sqlite3.Error, UnicodeDecodeError):
                    connection.close()
            raise
        return connection

    def _check_log(self, header: bytes) -> None:
        """Refuse a write-ahead log beside the file that is not its own (see the module docstring): the store id
        in the file's header against the one SQLite reads through the log, before any connection that could
        write opens the file. SQLite errors go to `_open`.

        The log is read by a read-only connection: a connection that can write checkpoints the log into the
        file when it closes last (the refusal would have merged the other database's pages into the file), a
        read-only one never does. Reading the log may leave its index, `<path>-shm`, beside it.
        """
        path = self._path
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

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """Check (or initialise) the schema, add what a file written before labels or store ids lacks
        (`_upgrade`), then turn on WAL mode. SQLite errors go to `_open`."""
        path = self._path
        tables = self._tables(connection)
        if tables:
            self._check_schema(connection, tables)
            # A truncated or damaged file fails here, not mid-run (see _INTEGRITY_CHECK).
            problems = [line for (line,) in connection.execute(_INTEGRITY_CHECK)]
            if problems != ["ok"]:
                raise StoreError(f"{path!r} is a damaged SQLite file (truncated or corrupt): {'; '.join(problems[:5])}")
        else:
            self._write(connection, lambda: self._initialise(connection))
            tables = self._tables(connection)  # another process's, if it got there first
        (store_id,) = connection.execute("PRAGMA user_version").fetchone()
        if "labels" not in tables or _OLD_TARGETS_TABLE in tables or store_id == 0:
            self._write(connection, lambda: self._upgrade(connection))
        (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot use {path!r}: SQLite cannot put it in WAL mode (journal mode {mode!r})")
        connection.execute(f"PRAGMA synchronous = {_SYNCHRONOUS}")
        if store_id == 0:  # the new id is in the log: copy it into the file now (if no reader is in the way)
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

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
        connection.execute(f"PRAGMA user_version = {_new_store_id()}")

    def _upgrade(self, connection: sqlite3.Connection) -> None:
        """Bring a schema-1 file written before labels or store ids up to date (see the module docstring); in
        the write transaction, so that what another process did meanwhile is seen, and a refusal writes nothing.

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
        (store_id,) = connection.execute("PRAGMA user_version").fetchone()
        if store_id == 0:
            connection.execute(f"PRAGMA user_version = {_new_store_id()}")

    def _check_schema(self, connection: sqlite3.Connection, tables: set[str]) -> None:
        path = self._path
        foreign = f"{path!r} is a SQLite database that is not a stoppoint store"
        if "meta" not in tables:
            raise StoreError(f"{foreign} (it has no meta table; its tables: {', '.join(sorted(tables))})")
        try:
            meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            if _primary_code(exc) != sqlite3.SQLITE_ERROR:  # not "no such column": locked, corrupt, not UTF-8...
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
