"""SQLiteStore: runs in one SQLite file, which several processes may share.

The store's operations, each in a worker thread under the store's one connection; their statements are
`_sqlite_runs`'s (whole runs, labels) and `_sqlite_leases`'s (claims, fenced writes, queues, interrupts), and
the file itself (its schema, opening and checking it, its transactions) is `_sqlite_file`'s.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread

from . import _sqlite_leases as leases
from . import _sqlite_runs as runs
from ._checkpoint import Checkpoint
from ._errors import StoreError
from ._lease import Claim, Lease, Queue, check_lease
from ._outcome import RunReport
from ._rows import (
    check_claim_next,
    check_events,
    check_names,
    check_state,
    checked_labels,
    claim_args,
    head_row,
    interrupt_signal,
    to_row,
    utf8,
)
from ._signal import InterruptSignal
from ._sqlite_file import StoreFile, open_file, store_error
from ._store import RunRecord, RunState, StepRow, StoredEvents, StoredRun
from ._threads import Job

__all__ = ["SQLiteStore"]

T = TypeVar("T")


class SQLiteStore:
    """A store in one SQLite file (stdlib `sqlite3`), which several processes may share, with one owner per
    run (the `Store` protocol: leases, fenced writes, queues and interrupt requests across processes).

    Use it as `async with SQLiteStore(path) as store:` (or call `await store.aclose()`, or `close()`
    from synchronous code, when done). Constructing it touches nothing: the file is opened, and
    checked, on entering `async with` or on first use. A path that does not exist (or an empty file)
    becomes a new store; an existing file is used only if it is an undamaged stoppoint store of a
    schema version this stoppoint knows, without another database's write-ahead log beside it, and is
    never modified otherwise. The schema is in `_sqlite_file`'s docstring. Reading (`load`,
    `list_runs`, `labels`) never modifies a file; a file of stoppoint 0.1 (schema 1) is upgraded in place,
    in one transaction, by the first operation that writes. It is a `LabelStore`: it keeps labels beside
    the runs.

    Each operation is one transaction, committed (and, with `synchronous=FULL`, flushed to disk) when it
    returns; a completed step (`commit_step`) is one small one, whatever the number of steps stored before
    it. A claim, and a fenced write's check of the lease with the write, are one IMMEDIATE transaction, so
    of processes racing for a run exactly one wins. All file I/O runs in a worker thread
    (`anyio.to_thread.run_sync`), so the event loop never waits on the disk; a checkpoint is serialised to
    JSON in the caller's thread first, since step outputs belong to the event loop's thread.

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
        lease: Seconds a claim holds without renewal (owners renew every third of it).

    Raises:
        TypeError: `path` is not a `str` or `os.PathLike[str]`, or `lease` not a number of seconds > 0.
        ValueError: `path` is empty, `":memory:"` (use `MemoryStore`) or holds a NUL character.
    """

    interrupt_poll = 0.05
    """An owner looks for interrupt requests this often: a thread hop and `PRAGMA data_version`, unless
    another connection committed (or this one wrote) since, when it reads the run's requests again."""

    def __init__(self, path: str | os.PathLike[str], *, lease: float = 15.0) -> None:
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
        self._lease = check_lease("SQLiteStore", lease)
        self._path = fspath
        self._lock = threading.Lock()  # guards _file and _closed, and serialises all use of the connection
        self._file: StoreFile | None = None
        self._closed = False

    @property
    def path(self) -> str:
        """The database file's path, as given."""
        return self._path

    @property
    def lease(self) -> float:
        """Seconds a claim holds without renewal."""
        return self._lease

    @property
    def _connection(self) -> sqlite3.Connection | None:
        """The open connection, if any (for tests)."""
        return None if self._file is None else self._file.connection

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r})"

    # -- the BasicStore protocol -------------------------------------------------------------------

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store the run's checkpoint and report in one transaction, unfenced, dropping its step rows (see
        `BasicStore.save`).

        Raises:
            StoreError: The file cannot be opened or written.
            CheckpointError: An output cannot be serialised; what was stored for the run is kept.
        """
        row = to_row(checkpoint, report)
        await self._call(runs.save, row)

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None (see `Store.load`); never modifies the file.

        Raises:
            StoreError: The file cannot be opened or read, or the run's row (or a step row) is invalid.
        """
        check_names("load", flow, run_id)
        if not utf8(flow, run_id):  # SQLite could not even take the query; no run of that name is stored
            return None
        return await self._call(runs.load, flow, run_id)

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first (see `Store.list_runs`); never
        modifies the file.

        Raises:
            StoreError: The file cannot be opened or read, or a row is invalid.
        """
        check_names("list_runs", flow)
        if flow is not None and not utf8(flow):
            return []
        return await self._call(runs.list_runs, flow)

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run (its step rows, interrupt requests and labels too); nothing happens if there is none.

        Raises:
            StoreError: The file cannot be opened or written.
        """
        check_names("delete", flow, run_id)
        if utf8(flow, run_id):
            await self._call(runs.delete, flow, run_id)

    # -- ownership (the Store protocol) ------------------------------------------------------------

    async def claim(
        self,
        flow: str,
        run_id: str,
        owner: str,
        *,
        new: RunState | None = None,
        labels: Mapping[str, str] | None = None,
        reopen: bool = False,
    ) -> Claim | None:
        """Claim one run, in one IMMEDIATE transaction (see `Store.claim`)."""
        head, checked = claim_args(flow, run_id, new, labels)
        if head is None and utf8(owner) and not utf8(flow, run_id):
            return None  # as in load(): no run of that name is stored
        if not utf8(flow, run_id, owner):
            raise StoreError(
                f"{self._where}: claim(): flow {flow!r}, run {run_id!r}, owner {owner!r}: a lone surrogate, which "
                "UTF-8 cannot encode, so no run of that name can be stored"
            )
        return await self._call(leases.claim, flow, run_id, owner, head, checked, self._lease, reopen)

    async def claim_next(self, owner: str, flows: Collection[str], queues: Sequence[Queue]) -> Claim | None:
        """Claim the oldest queued run of `flows` in `queues`, or orphaned run of `flows`, in one IMMEDIATE
        transaction that also counts the queues' live runs (see `Store.claim_next`)."""
        check_claim_next(flows, queues)
        names = [flow for flow in flows if utf8(flow)]  # (a name SQLite cannot take is no stored run's)
        return await self._call(
            leases.claim_next, owner, names, [queue for queue in queues if utf8(queue.name)], self._lease
        )

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease (see `Store.renew`)."""
        return await self._call(leases.renew, lease, self._lease)

    async def write(self, lease: Lease, state: RunState, steps: Sequence[StepRow] = ()) -> None:
        """Replace the run's head and store `steps`, fenced, in one transaction (see `Store.write`)."""
        check_state("write", lease.flow, lease.run_id, state, steps)
        await self._call(leases.write, lease, head_row(lease.flow, lease.run_id, state), steps, False)

    async def commit_step(self, lease: Lease, step: StepRow) -> None:
        """Store one step row, fenced: one small transaction (see `Store.commit_step`)."""
        await self._call(leases.commit_step, lease, step)

    async def progress(self, lease: Lease, step: str, report_json: str) -> None:
        """Store a running step's report, fenced (see `Store.progress`)."""
        await self._call(leases.progress, lease, step, report_json)

    async def finish(self, lease: Lease, state: RunState, steps: Sequence[StepRow] = ()) -> None:
        """Write the run's end and give it up, fenced, in one transaction (see `Store.finish`)."""
        check_state("finish", lease.flow, lease.run_id, state, steps)
        await self._call(leases.write, lease, head_row(lease.flow, lease.run_id, state), steps, True)

    async def release(self, lease: Lease) -> None:
        """Give the run up as it is stored (see `Store.release`)."""
        await self._call(leases.release, lease)

    # -- control from anywhere ---------------------------------------------------------------------

    async def interrupt(
        self, flow: str, run_id: str, reason: str = "interrupted", *, force: bool = False, source: str | None = "api"
    ) -> bool:
        """Ask a run to stop, durably (see `Store.interrupt`): its live owner, in any process sharing the
        file, gets the request at its next `interrupts()`."""
        signal = interrupt_signal(flow, run_id, reason, force, source)
        if not utf8(flow, run_id):
            return False
        return await self._call(leases.interrupt, flow, run_id, signal)

    async def interrupts(self, lease: Lease, after: int = 0) -> list[tuple[int, InterruptSignal]]:
        """The run's pending interrupt requests numbered above `after` (see `Store.interrupts`): cheap when
        nothing changed in the file, in a worker thread all the same (never the event loop on the lock)."""
        return await self._call(leases.interrupts, lease, after)

    async def submit(
        self, flow: str, run_id: str, new: RunState, *, queue: str = "default", labels: Mapping[str, str] | None = None
    ) -> bool:
        """Queue a run for a worker, in one IMMEDIATE transaction (see `Store.submit`)."""
        check_state("submit", flow, run_id, new)
        if not isinstance(queue, str) or not queue:
            raise TypeError(f"submit(): flow {flow!r}, run {run_id!r}: queue must be a non-empty str, got {queue!r}")
        checked = {} if labels is None else checked_labels(flow, run_id, labels)
        if not utf8(flow, run_id, queue):
            raise StoreError(
                f"{self._where}: submit(): flow {flow!r}, run {run_id!r}, queue {queue!r}: a lone surrogate, which "
                "UTF-8 cannot encode, so no run of that name can be stored"
            )
        return await self._call(leases.submit, flow, run_id, head_row(flow, run_id, new), queue, checked)

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
        await self._call(runs.set_labels, flow, run_id, checked)

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        """The run's labels, in key order; `{}` if it has none (see `LabelStore.labels`); never modifies the file.

        Raises:
            StoreError: The file cannot be opened or read, or a stored label is not text.
        """
        check_names("labels", flow, run_id)
        if not utf8(flow, run_id):  # as in load(): no run of that name is stored
            return {}
        return await self._call(runs.labels, flow, run_id)

    # -- the EventStore protocol -------------------------------------------------------------------

    async def append_events(self, lease: Lease, events: Sequence[str]) -> None:
        """Append events to the run's history, in one transaction (see `EventStore.append_events`)."""
        texts = check_events(self._where, events)
        await self._call(leases.append_events, lease, texts)

    async def events(self, flow: str, run_id: str) -> StoredEvents:
        """The run's stored events, oldest first (see `EventStore.events`); never modifies the file."""
        check_names("events", flow, run_id)
        if not utf8(flow, run_id):
            return StoredEvents()
        return await self._call(runs.events, flow, run_id)

    # -- opening and closing -----------------------------------------------------------------------

    async def __aenter__(self) -> SQLiteStore:
        """Open (and check) the file now, so that a file that cannot be used fails here."""
        await self._call(lambda _file: None)
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
            file, self._file = self._file, None
            if file is not None:
                try:
                    file.connection.close()
                except (sqlite3.Error, UnicodeDecodeError) as exc:
                    raise store_error(exc, self._path, f"{self._where}: cannot close") from exc

    # -- in the worker thread ----------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"SQLite store {self._path!r}"

    async def _call(self, operation: Callable[..., T], *args: Any) -> T:
        job = Job(self._locked, operation, *args)
        try:
            return cast(T, await anyio.to_thread.run_sync(job.run))  # (None only for a job dropped)
        except asyncio.CancelledError:
            # asyncio: a native Task.cancel() of the caller (anyio's own cancellation does not reach the
            # wait) stops the wait, not the thread. The operation must not go on behind the caller's
            # back, where a later one (the run's next write) could overtake it: it is dropped if it has
            # not started, else waited for.
            await job.settled()
            raise

    def _locked(self, operation: Callable[..., T], *args: Any) -> T:
        """Run `operation(file, *args)` under the lock, opening the file on first use."""
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._where} is closed")
            if self._file is None:
                self._file = open_file(self._path)
            try:
                return operation(self._file, *args)
            except (sqlite3.Error, UnicodeError) as exc:  # UnicodeEncodeError: a str SQLite cannot take
                raise store_error(exc, self._path, self._where) from exc
