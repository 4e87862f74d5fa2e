"""PostgresStore: runs in a PostgreSQL database, shared by every process and machine that reaches it.

The store's operations, each in an anyio worker thread on a pooled connection (psycopg 3's synchronous API,
so the store works under asyncio and trio alike); their statements are `_postgres_runs`'s (whole runs, labels)
and `_postgres_leases`'s (claims, fenced writes, queues, interrupts), the tables `_postgres_schema`'s, and how
owners hear of interrupt requests `_postgres_listen`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
import anyio.to_thread

try:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("PostgresStore needs psycopg 3 and psycopg-pool: pip install 'stoppoint[postgres]'") from exc

from . import _postgres_leases as leases
from . import _postgres_runs as runs
from ._checkpoint import Checkpoint
from ._errors import StoreError
from ._lease import Claim, Lease, Queue, check_lease
from ._outcome import RunReport
from ._postgres_listen import Listener, Notices
from ._postgres_schema import ensure_schema
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
from ._store import RunRecord, RunState, StepRow, StoredEvents, StoredRun
from ._threads import Job

__all__ = ["PostgresStore"]

T = TypeVar("T")

_OPTIONS: dict[str, Any] = {
    "connect_timeout": 10,
    # TCP keepalives: a peer gone without a word (a partition, a host that died) fails the connection within
    # about 20 s instead of leaving it waiting for ever.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}


def _storable(*texts: str) -> bool:
    """Whether PostgreSQL text can hold these: UTF-8 (no lone surrogate) without NUL characters."""
    return utf8(*texts) and not any("\x00" in text for text in texts)


class PostgresStore:
    """A store in a PostgreSQL database (15 or later), shared by every process and machine that reaches
    it, with one owner per run (the `Store` protocol: leases, fenced writes, queues and interrupt requests).

    Use it as `async with PostgresStore(dsn) as store:` (or call `await store.aclose()` when done).
    Constructing it connects to nothing: the pool opens, and the schema is created or checked, on entering
    `async with` or on first use. Its tables live in their own schema (`schema=`), created on first use; a
    schema of a newer version, or one holding other tables, is refused with `StoreError`. The tables are in
    `_postgres_schema`'s docstring.

    Claims lock the run's row (`FOR UPDATE`; a worker's `claim_next` skips rows others are claiming, `FOR
    UPDATE SKIP LOCKED`), queue limits are counted under an advisory lock per queue, and every write of an
    owned run checks `(owner, epoch)` in the statement that writes. A completed step is one statement, one
    round trip. Lease times are the server's clock. Interrupt requests are committed with a `NOTIFY`; one
    thread per store `LISTEN`s, so an owner's `interrupts()` reads the server only when its run was named
    (or after a reconnect, or when a renewal found a request): see `_postgres_listen`.

    Every operation runs in an anyio worker thread (psycopg's synchronous API, so trio works too), at most
    `max_connections` at a time per event loop. An operation that only rewrites what it names (a step row,
    a head, a renewal, a read) is tried once more on a new connection when its connection was broken (a
    server restart); others fail with `StoreError`. An operation waits for a connection at most the lease
    (at least 1 s, at most 15 s), then fails with `StoreError`: an owner cut off from the server has lost its
    lease by then anyway, and its `run()` must not wait any longer to raise `LeaseLost`.

    Args:
        dsn: A libpq connection string or URI (`postgresql://user@host:5432/db`).
        lease: Seconds a claim holds without renewal (owners renew every third of it).
        schema: The schema of the store's tables: stores in different schemas of one database are separate.
        max_connections: The size of the connection pool.

    Raises:
        TypeError: `dsn` or `schema` is not a str, `lease` not a number of seconds > 0, `max_connections`
            not an int >= 1.
        ValueError: `dsn` is not a connection string, or `schema` is empty, longer than 63 bytes or holds
            a NUL character.
    """

    interrupt_poll = 0.01
    """An owner looks for interrupt requests this often: a lookup in memory (a few microseconds, so the poll
    can be short), unless a notification (or a reconnect, or a renewal) said the run changed, when it reads
    the run's requests from the server."""

    def __init__(self, dsn: str, *, lease: float = 15.0, schema: str = "stoppoint", max_connections: int = 10) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"PostgresStore(dsn): dsn must be a str, got {type(dsn).__name__}")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise ValueError(f"PostgresStore(dsn): not a PostgreSQL connection string: {exc}") from exc
        if not isinstance(schema, str):
            raise TypeError(f"PostgresStore(schema=...): schema must be a str, got {type(schema).__name__}")
        if not schema or "\x00" in schema or not utf8(schema) or len(schema.encode()) > 63:
            raise ValueError(
                f"PostgresStore(schema={schema!r}): a schema name must be 1 to 63 bytes of UTF-8 without NUL"
            )
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise TypeError(f"PostgresStore(max_connections=...): must be an int >= 1, got {max_connections!r}")
        self._lease = check_lease("PostgresStore", lease)
        self._dsn = dsn
        self._schema = schema
        self._size = max_connections
        self._wait = min(15.0, max(1.0, self._lease))  # seconds an operation waits for a connection
        host = params.get("host") or params.get("hostaddr") or "localhost"
        self._where = f"PostgresStore({host}:{params.get('port') or 5432}/{params.get('dbname') or ''}, {schema!r})"
        self._lock = threading.Lock()  # guards _pool and _closed
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] | None = None
        self._closed = False
        self._limiters: dict[anyio.lowlevel.EventLoopToken, anyio.CapacityLimiter] = {}
        self._notices = Notices()
        self._listener = Listener(self._connect, schema, self._notices)

    @property
    def schema(self) -> str:
        """The schema of the store's tables."""
        return self._schema

    @property
    def lease(self) -> float:
        """Seconds a claim holds without renewal."""
        return self._lease

    def __repr__(self) -> str:
        return self._where

    # -- the BasicStore protocol -------------------------------------------------------------------

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store the run's checkpoint and report in one transaction, unfenced, dropping its step rows (see
        `BasicStore.save`)."""
        row = to_row(checkpoint, report)
        self._text("save", row.flow, row.run_id)
        await self._call(runs.save, self._where, row, retry=True)

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None (see `Store.load`): its head and step rows read in one snapshot."""
        check_names("load", flow, run_id)
        if not _storable(flow, run_id):
            return None  # no run of that name can be stored
        return await self._call(runs.load, self._where, flow, run_id, retry=True)

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first (see `Store.list_runs`)."""
        check_names("list_runs", flow)
        if flow is not None and not _storable(flow):
            return []
        return await self._call(runs.list_runs, self._where, flow, one=True, retry=True)

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run (its step rows, interrupt requests and labels too); nothing happens if there is none."""
        check_names("delete", flow, run_id)
        if _storable(flow, run_id):
            await self._call(runs.delete, self._where, self._schema, flow, run_id, retry=True)
            self._notices.changed((flow, run_id))

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
        """Claim one run, its row locked (see `Store.claim`)."""
        head, checked = claim_args(flow, run_id, new, labels)
        if head is None and _storable(owner) and not _storable(flow, run_id):
            return None  # as in load(): no run of that name is stored
        self._text("claim", flow, run_id, owner, *checked, *checked.values())
        self._listener.start()
        claimed = await self._call(
            leases.claim, self._where, self._schema, flow, run_id, owner, head, checked, self._lease, reopen
        )
        self._notices.changed((flow, run_id))
        return claimed

    async def claim_next(self, owner: str, flows: Collection[str], queues: Sequence[Queue]) -> Claim | None:
        """Claim the oldest queued run of `flows` in `queues`, or orphaned run of `flows` (see
        `Store.claim_next`), skipping runs that other workers are claiming."""
        check_claim_next(flows, queues)
        self._text("claim_next", owner)
        names = [flow for flow in flows if _storable(flow)]  # (a name no run can have is no stored run's)
        kept = [queue for queue in queues if _storable(queue.name)]
        self._listener.start()
        claimed = await self._call(leases.claim_next, self._where, self._schema, owner, names, kept, self._lease)
        if claimed is not None and claimed.lease is not None:
            self._notices.changed((claimed.lease.flow, claimed.lease.run_id))
        return claimed

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease (see `Store.renew`); a request the owner has not read yet marks its run to be read."""
        renewed, last = await self._call(leases.renew, lease, self._lease, one=True, retry=True)
        key = (lease.flow, lease.run_id)
        if last > self._notices.last_request(key):
            self._notices.changed(key)
        return renewed

    async def write(self, lease: Lease, state: RunState, steps: Sequence[StepRow] = ()) -> None:
        """Replace the run's head and store `steps`, fenced, in one transaction (see `Store.write`)."""
        check_state("write", lease.flow, lease.run_id, state, steps)
        await self._call(leases.write, lease, head_row(lease.flow, lease.run_id, state), steps, False, retry=True)

    async def commit_step(self, lease: Lease, step: StepRow) -> None:
        """Store one step row, fenced: one statement (see `Store.commit_step`)."""
        await self._call(leases.commit_step, lease, step, one=True, retry=True)

    async def progress(self, lease: Lease, step: str, report_json: str) -> None:
        """Store a running step's report, fenced: one statement (see `Store.progress`)."""
        await self._call(leases.progress, lease, step, report_json, one=True, retry=True)

    async def finish(self, lease: Lease, state: RunState, steps: Sequence[StepRow] = ()) -> None:
        """Write the run's end and give it up, fenced, in one transaction (see `Store.finish`)."""
        check_state("finish", lease.flow, lease.run_id, state, steps)
        await self._call(leases.write, lease, head_row(lease.flow, lease.run_id, state), steps, True)
        self._notices.changed((lease.flow, lease.run_id))

    async def release(self, lease: Lease) -> None:
        """Give the run up as it is stored (see `Store.release`)."""
        await self._call(leases.release, lease, one=True, retry=True)
        self._notices.changed((lease.flow, lease.run_id))

    # -- control from anywhere ---------------------------------------------------------------------

    async def interrupt(
        self, flow: str, run_id: str, reason: str = "interrupted", *, force: bool = False, source: str | None = "api"
    ) -> bool:
        """Ask a run to stop, durably (see `Store.interrupt`): the request and its `NOTIFY` commit together,
        so its live owner, in any process on any machine, hears of it at once."""
        signal = interrupt_signal(flow, run_id, reason, force, source)
        if not _storable(flow, run_id):
            return False
        self._text("interrupt", signal.reason, *([] if signal.source is None else [signal.source]))
        asked = await self._call(leases.interrupt, self._where, self._schema, flow, run_id, signal)
        self._notices.changed((flow, run_id))
        return asked

    async def interrupts(self, lease: Lease, after: int = 0) -> list[tuple[int, InterruptSignal]]:
        """The run's pending interrupt requests numbered above `after` (see `Store.interrupts`): from memory,
        unless the run was named by a notification (or the listener reconnected, or a renewal found a request)
        since the last read."""
        key = (lease.flow, lease.run_id)
        found = self._notices.cached(key)
        if found is None:
            generation = self._notices.reading(key)
            found = await self._call(leases.interrupts, self._where, lease.flow, lease.run_id, one=True, retry=True)
            self._notices.keep(key, generation, found)
        return [request for request in leases.held(lease, "interrupts", found) if request[0] > after]

    async def submit(
        self, flow: str, run_id: str, new: RunState, *, queue: str = "default", labels: Mapping[str, str] | None = None
    ) -> bool:
        """Queue a run for a worker (see `Store.submit`)."""
        check_state("submit", flow, run_id, new)
        if not isinstance(queue, str) or not queue:
            raise TypeError(f"submit(): flow {flow!r}, run {run_id!r}: queue must be a non-empty str, got {queue!r}")
        checked = {} if labels is None else checked_labels(flow, run_id, labels)
        self._text("submit", flow, run_id, queue, *checked, *checked.values())
        return await self._call(
            leases.submit, self._where, self._schema, flow, run_id, head_row(flow, run_id, new), queue, checked
        )

    # -- the LabelStore protocol -------------------------------------------------------------------

    async def set_labels(self, flow: str, run_id: str, labels: Mapping[str, str]) -> None:
        """Merge `labels` into the run's, in one transaction (see `LabelStore.set_labels`).

        Raises:
            TypeError: A name, the mapping, a key or a value is not of its type; nothing is written.
            ValueError: A key is empty; nothing is written.
            StoreError: A name, a key or a value holds text PostgreSQL cannot keep (a lone surrogate or a NUL
                character; nothing is written), or the database cannot be written.
        """
        checked = checked_labels(flow, run_id, labels)
        self._text("set_labels", flow, run_id, *checked, *checked.values())
        if checked:
            await self._call(runs.set_labels, self._where, flow, run_id, checked, retry=True)

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        """The run's labels, in key order; `{}` if it has none (see `LabelStore.labels`)."""
        check_names("labels", flow, run_id)
        if not _storable(flow, run_id):
            return {}
        return await self._call(runs.labels, self._where, flow, run_id, one=True, retry=True)

    # -- the EventStore protocol -------------------------------------------------------------------

    async def append_events(self, lease: Lease, events: Sequence[str]) -> None:
        """Append events to the run's history, fenced, in one transaction (see `EventStore.append_events`)."""
        texts = check_events(self._where, events)
        self._text("append_events", *texts)
        if texts:
            await self._call(leases.append_events, lease, texts)

    async def events(self, flow: str, run_id: str) -> StoredEvents:
        """The run's stored events, oldest first (see `EventStore.events`)."""
        check_names("events", flow, run_id)
        if not _storable(flow, run_id):
            return StoredEvents()
        return await self._call(runs.events, self._where, flow, run_id)

    # -- opening and closing -----------------------------------------------------------------------

    async def __aenter__(self) -> PostgresStore:
        """Open the pool and create (or check) the schema now, so that a database that cannot be used fails here."""
        try:
            await self._call(lambda _connection: None, one=True)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening and close the pool (in a worker thread, shielded from cancellation); the store
        cannot be used afterwards. Closing twice does nothing."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """`aclose()` for synchronous code."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        self._listener.stop()
        if pool is not None:
            pool.close()

    # -- in the worker threads ---------------------------------------------------------------------

    def _text(self, method: str, *texts: str) -> None:
        """Refuse, before anything is written, text PostgreSQL cannot keep.

        Raises:
            StoreError: A lone surrogate (which UTF-8 cannot encode) or a NUL character.
        """
        for text in texts:
            if not _storable(text):
                raise StoreError(
                    f"{self._where}: {method}(): {text!r} holds a NUL character or a lone surrogate, which "
                    "PostgreSQL text cannot hold"
                )

    def _connect(self, role: str = "listen") -> psycopg.Connection[Any]:
        """A new connection with the store's options, outside the pool (the listener's, the first check's).
        Its `application_name` says whose it is (`stoppoint <role> <schema>`), for `pg_stat_activity`."""
        name = f"stoppoint {role} {self._schema}"
        return psycopg.Connection.connect(self._dsn, autocommit=True, application_name=name, **_OPTIONS)

    def _configure(self, connection: psycopg.Connection[Any]) -> None:
        """Every pooled connection: the store's schema; and a transaction left open longer than the connection
        wait ends the session (the store's transactions run no user code and take milliseconds: one left open
        is a client paused or cut off mid-write, whose row locks would hold every claim of the run back)."""
        connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self._schema)))
        connection.execute(
            sql.SQL("SET idle_in_transaction_session_timeout = {}").format(sql.Literal(int(self._wait * 1000)))
        )

    def _open(self) -> ConnectionPool[psycopg.Connection[tuple[Any, ...]]]:
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._where} is closed")
            if self._pool is None:
                # One connection first, which makes (or checks) the schema: a server that cannot be reached
                # fails here at once, not after the pool's wait for its first connection.
                with self._connect("pool") as connection:
                    self._configure(connection)
                    ensure_schema(connection, self._schema, self._where)
                pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
                    self._dsn,
                    min_size=1,
                    max_size=self._size,
                    kwargs={"autocommit": True, "application_name": f"stoppoint pool {self._schema}", **_OPTIONS},
                    configure=self._configure,
                    timeout=self._wait,
                    open=False,
                    name=f"stoppoint-{self._schema}",
                )
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    def _limiter(self) -> anyio.CapacityLimiter:
        """This event loop's limit on the store's worker threads (a `CapacityLimiter` belongs to one loop)."""
        token = anyio.lowlevel.current_token()
        limiter = self._limiters.get(token)
        if limiter is None:
            limiter = self._limiters[token] = anyio.CapacityLimiter(self._size)
        return limiter

    async def _call(self, operation: Callable[..., T], *args: Any, one: bool = False, retry: bool = False) -> T:
        job = Job(self._run, operation, args, one, retry)
        try:
            return cast(T, await anyio.to_thread.run_sync(job.run, limiter=self._limiter()))
        except asyncio.CancelledError:
            # asyncio: a native Task.cancel() of the caller stops the wait, not the thread; the operation must
            # not go on behind the caller's back (see `SQLiteStore._call`).
            await job.settled()
            raise

    def _run(self, operation: Callable[..., T], args: tuple[Any, ...], one: bool, retry: bool) -> T:
        """`operation(connection, *args)` on a pooled connection: alone (`one`: a single statement) or in a
        transaction; once more on a new connection if `retry` and the connection was found broken."""
        for attempt in (1, 2):
            used: psycopg.Connection[Any] | None = None
            pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] | None = None
            try:
                pool = self._open()
                with pool.connection() as connection:
                    used = connection
                    if one:
                        return operation(connection, *args)
                    with connection.transaction():
                        return operation(connection, *args)
            except psycopg.OperationalError as exc:
                if pool is not None and used is not None and used.broken:
                    # A server restart (or a partition) broke every idle connection too: the pool drops them
                    # and makes new ones, so that the next operation does not meet the same fate.
                    with contextlib.suppress(psycopg.Error):
                        pool.check()
                    if retry and attempt == 1:
                        continue
                raise StoreError(f"{self._where}: {exc}") from exc
            except psycopg.Error as exc:
                raise StoreError(f"{self._where}: {exc}") from exc
            except UnicodeError as exc:
                raise StoreError(f"{self._where}: text PostgreSQL cannot hold: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover
