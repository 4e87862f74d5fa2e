"""A `PostgresStore`'s statements for owned runs: claims, fenced writes, queues and interrupt requests.

Each function runs in a worker thread on a pooled connection. Those marked *one statement* run without an
explicit transaction (the statement is its own, one round trip); the others run in the transaction the store
opened. Fencing: every write of an owned run names `(owner, epoch)` in the statement that writes, and the run's
row lock orders it against a claim: a write's `FOR SHARE` (or its `UPDATE`) waits for a claim in progress, then
sees the new epoch and writes nothing; a claim waits for a write in progress. Times of leases are the server's
(`now()`), so hosts with skewed clocks agree on when a lease expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import sql
from pydantic import ValidationError

from ._errors import LeaseLost, RunOwned, StoreError
from ._lease import Claim, Lease, Queue
from ._postgres_runs import (
    AT,
    CLAIMED,
    EXPIRES,
    FULL_COLUMNS,
    OWNER,
    Connection,
    find_run,
    insert_run,
    merge_labels,
    notify,
    other_flow,
    stored_run,
    texts,
)
from ._postgres_schema import lock_key
from ._rows import Row, interrupted_report
from ._signal import InterruptSignal
from ._store import EVENTS_KEPT, RunStatus, StepRow

__all__ = [
    "Requests",
    "append_events",
    "claim",
    "claim_next",
    "commit_step",
    "held",
    "interrupt",
    "interrupts",
    "progress",
    "release",
    "renew",
    "submit",
    "write",
]

_FENCE = "flow = %s AND run_id = %s AND owner = %s AND epoch = %s"
"""The condition of every fenced write: the run is still held under the lease."""
_UNFINISHED = ("queued", "running", "interrupted", "failed")
_RELEASED = "owner = NULL, lease_expires_at = NULL, claimed_at = NULL"
_TAKE = (
    "UPDATE runs SET owner = %s, epoch = epoch + 1, claimed_at = now(),"
    " lease_expires_at = now() + make_interval(secs => %s), status = 'running', finished_at = NULL,"
    " updated_at = now() WHERE flow = %s AND run_id = %s RETURNING epoch, lease_expires_at"
)
_UPSERT_STEP = (
    "INSERT INTO steps (flow, run_id, step, epoch, checkpoint, report)"
    " SELECT %s, %s, %s, %s, %s, %s FROM runs WHERE " + _FENCE + " FOR SHARE"
    " ON CONFLICT (flow, run_id, step) DO UPDATE SET epoch = excluded.epoch, "
)
"""A fenced step row's upsert (*one statement*), completed by what it replaces: it writes a row only while the
run is held under the lease, and the upsert keeps the row's `seq`, so `load()` merges rows in the order their
steps first wrote."""

Requests = tuple[str | None, int | None, list[tuple[int, InterruptSignal]]]
"""A run's holder, epoch and pending interrupt requests (`(None, None, [])`: no such run)."""


def _fence(lease: Lease) -> tuple[str, str, str, int]:
    return (lease.flow, lease.run_id, lease.owner, lease.epoch)


def _lost(connection: Connection, lease: Lease, method: str) -> LeaseLost:
    """Why a fenced write found no row of its lease."""
    found = connection.execute(
        "SELECT owner, epoch FROM runs WHERE flow = %s AND run_id = %s", (lease.flow, lease.run_id)
    ).fetchone()
    return _lost_to(lease, method, None if found is None else (found[0], found[1]))


def _lost_to(lease: Lease, method: str, holder: tuple[str | None, int] | None) -> LeaseLost:
    if holder is None:
        return LeaseLost(lease.flow, lease.run_id, lease.epoch, f"{method}(): the run is no longer stored")
    who = "nobody" if holder[0] is None else holder[0]
    return LeaseLost(
        lease.flow, lease.run_id, lease.epoch, f"{method}(): the run is at epoch {holder[1]}, held by {who}"
    )


def _live(columns: tuple[Any, ...]) -> bool:
    expires = columns[EXPIRES]
    return columns[OWNER] is not None and isinstance(expires, str) and expires > columns[AT]


def _owned(columns: tuple[Any, ...]) -> RunOwned:
    since: datetime | None
    try:
        since = datetime.fromisoformat(columns[CLAIMED])
    except (TypeError, ValueError):
        since = None
    return RunOwned(columns[0], columns[1], str(columns[OWNER]), since)


def _take(connection: Connection, schema: str, columns: tuple[Any, ...], owner: str, lease: float) -> Lease:
    """Claim the run of a locked row nobody holds live: epoch + 1, running.

    Raises:
        RunOwned: Its lease is live.
    """
    if _live(columns):
        raise _owned(columns)
    flow, run_id = columns[:2]
    taken = connection.execute(_TAKE, (owner, lease, flow, run_id)).fetchone()
    assert taken is not None  # (the row is locked by this transaction)
    if columns[OWNER] is not None:  # a holder whose lease expired: it may still be writing, tell it now
        notify(connection, schema, flow, run_id)
    return Lease(flow, run_id, owner, int(taken[0]), taken[1])


def claim(
    connection: Connection,
    where: str,
    schema: str,
    flow: str,
    run_id: str,
    owner: str,
    new: Row | None,
    labels: dict[str, str],
    lease: float,
    reopen: bool,
) -> Claim | None:
    """`Store.claim`: the run's row locked; a new id's creation under an advisory lock on the id, so racing
    creators (of this flow or another) take turns."""
    found = find_run(connection, flow, run_id, lock=True)
    if found is None:
        connection.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(lock_key(schema, f"run/{run_id}")))
        found = find_run(connection, flow, run_id, lock=True)
    if found is None:
        other_flow(connection, where, flow, run_id)
        if new is None:
            return None
        # (the events an older stoppoint's delete() left under the name: not this run's)
        connection.execute("DELETE FROM events WHERE flow = %s AND run_id = %s", (flow, run_id))
        created = connection.execute(
            "INSERT INTO runs (flow, run_id, flow_version, status, started_at, updated_at, finished_at, checkpoint,"
            " report, owner, epoch, claimed_at, lease_expires_at)"
            " VALUES (%s, %s, %s, 'running', %s, now(), NULL, %s, %s, %s, 1, now(), now() + make_interval(secs => %s))"
            " RETURNING lease_expires_at",
            (flow, run_id, new.flow_version, new.started_at, new.checkpoint, new.report, owner, lease),
        ).fetchone()
        assert created is not None
        merge_labels(connection, flow, run_id, labels)
        return Claim(Lease(flow, run_id, owner, 1, created[0]), None)
    stored = stored_run(connection, where, found)
    if stored.record.status is RunStatus.COMPLETED and not reopen:
        return Claim(None, stored)
    return Claim(_take(connection, schema, found, owner, lease), stored)


def claim_next(
    connection: Connection,
    where: str,
    schema: str,
    owner: str,
    flows: Sequence[str],
    queues: Sequence[Queue],
    lease: float,
) -> Claim | None:
    """`Store.claim_next`: each limited queue's live runs counted under an advisory lock on the queue (so
    workers claiming from it take turns, and each counts the claims committed before), then the oldest
    claimable run of the others locked with `FOR UPDATE SKIP LOCKED` (a run another worker is claiming is
    skipped, not waited for) and claimed."""
    limits = {queue.name: queue.concurrency for queue in queues}
    full = []
    for name in sorted(name for name, limit in limits.items() if limit is not None):
        connection.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(lock_key(schema, f"queue/{name}")))
        held = connection.execute(
            "SELECT count(*) FROM runs WHERE status = 'running' AND queue = %s AND owner IS NOT NULL"
            " AND lease_expires_at > now()",
            (name,),
        ).fetchone()
        if held is not None and held[0] >= (limits[name] or 0):
            full.append(name)
    found = connection.execute(
        f"SELECT {FULL_COLUMNS} FROM runs WHERE flow = ANY(%s)"
        " AND ((status = 'queued' AND queue = ANY(%s))"
        "  OR (status = 'running' AND epoch > 0 AND (owner IS NULL OR lease_expires_at IS NULL"
        "   OR lease_expires_at <= now())))"
        " AND (queue IS NULL OR NOT (queue = ANY(%s)))"
        " ORDER BY started_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED",
        (list(flows), list(limits), full),
    ).fetchone()
    if found is None:
        return None
    columns = texts(found)
    stored = stored_run(connection, where, columns)
    return Claim(_take(connection, schema, columns, owner, lease), stored)


def renew(connection: Connection, lease: Lease, seconds: float) -> tuple[Lease, int]:
    """`Store.renew` (*one statement*), with the number of the run's last interrupt request (0: none): the
    owner's fallback when notifications are not arriving."""
    renewed = connection.execute(
        "UPDATE runs SET lease_expires_at = now() + make_interval(secs => %s) WHERE " + _FENCE + " RETURNING"
        " lease_expires_at, (SELECT coalesce(max(id), 0) FROM interrupts WHERE flow = %s AND run_id = %s)",
        (seconds, *_fence(lease), lease.flow, lease.run_id),
    ).fetchone()
    if renewed is None:
        raise _lost(connection, lease, "renew")
    return Lease(lease.flow, lease.run_id, lease.owner, lease.epoch, renewed[0]), int(renewed[1])


def write(connection: Connection, lease: Lease, head: Row, steps: Sequence[StepRow], finish: bool) -> None:
    """`Store.write`, or with `finish` `Store.finish`: the head (its `started_at` stays the first one) and the
    step rows; a finish also gives the run up and drops its interrupt requests."""
    method, released = ("finish", f", {_RELEASED}") if finish else ("write", "")
    if steps:  # first: their upserts are fenced too, and a finish's head gives the run up
        with connection.cursor() as cursor:
            cursor.executemany(
                _UPSERT_STEP + "checkpoint = excluded.checkpoint, report = excluded.report",
                [_step_params(lease, row.step, row.checkpoint_json, row.report_json) for row in steps],
            )
    written = connection.execute(
        "UPDATE runs SET flow_version = %s, status = %s, updated_at = %s, finished_at = %s, checkpoint = %s,"
        f" report = %s{released} WHERE {_FENCE}",
        (*head[2:4], *head[5:], *_fence(lease)),
    )
    if written.rowcount == 0:  # (the transaction rolls back: the step rows are not written either)
        raise _lost(connection, lease, method)
    if finish:
        connection.execute("DELETE FROM interrupts WHERE flow = %s AND run_id = %s", (lease.flow, lease.run_id))


def _step_params(lease: Lease, step: str, checkpoint: str | None, report: str) -> tuple[Any, ...]:
    return (lease.flow, lease.run_id, step, lease.epoch, checkpoint, report, *_fence(lease))


def commit_step(connection: Connection, lease: Lease, step: StepRow) -> None:
    """`Store.commit_step` (*one statement*): the step's row, written only while the run is held under the
    lease. The run row is not written, so `updated_at` is when the run's head was last written."""
    written = connection.execute(
        _UPSERT_STEP + "checkpoint = excluded.checkpoint, report = excluded.report",
        _step_params(lease, step.step, step.checkpoint_json, step.report_json),
    )
    if written.rowcount == 0:
        raise _lost(connection, lease, "commit_step")


def progress(connection: Connection, lease: Lease, step: str, report_json: str) -> None:
    """`Store.progress` (*one statement*): the step row's report, its checkpoint part kept (NULL for a new row)."""
    written = connection.execute(
        _UPSERT_STEP + "report = excluded.report", _step_params(lease, step, None, report_json)
    )
    if written.rowcount == 0:
        raise _lost(connection, lease, "progress")


def release(connection: Connection, lease: Lease) -> None:
    """`Store.release` (*one statement*): nothing happens if the lease was lost already."""
    connection.execute(f"UPDATE runs SET {_RELEASED} WHERE {_FENCE}", _fence(lease))


def interrupt(connection: Connection, where: str, schema: str, flow: str, run_id: str, signal: InterruptSignal) -> bool:
    """`Store.interrupt`: a live owner's request and its notification commit together (a listener that
    reconnects meanwhile finds the request by its catch-up read)."""
    found = find_run(connection, flow, run_id, lock=True)
    if found is None or found[3] not in _UNFINISHED:
        return False
    if _live(found):
        connection.execute(
            "INSERT INTO interrupts (flow, run_id, reason, force, source, requested_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (flow, run_id, signal.reason, signal.force, signal.source, signal.sent_at),
        )
        notify(connection, schema, flow, run_id)
        return True
    if found[3] in (RunStatus.INTERRUPTED.value, RunStatus.FAILED.value):
        return False  # ended, nobody holds it: there is nothing to stop
    at = datetime.fromisoformat(found[AT])
    report = interrupted_report(stored_run(connection, where, found).report_json, signal, at)
    connection.execute(
        f"UPDATE runs SET status = 'interrupted', finished_at = %s, updated_at = %s, report = %s, {_RELEASED}"
        " WHERE flow = %s AND run_id = %s",
        (at, at, report, flow, run_id),
    )
    # The head has the rows' reports now, marked as they ended: the rows must not replace them again.
    connection.execute("UPDATE steps SET epoch = 0 WHERE flow = %s AND run_id = %s", (flow, run_id))
    return True


def interrupts(connection: Connection, where: str, flow: str, run_id: str) -> Requests:
    """The run's holder, epoch and pending requests (*one statement*)."""
    rows = connection.execute(
        "SELECT r.owner, r.epoch, i.id, i.reason, i.force, i.source, i.requested_at FROM runs r"
        " LEFT JOIN interrupts i ON i.flow = r.flow AND i.run_id = r.run_id"
        " WHERE r.flow = %s AND r.run_id = %s ORDER BY i.id",
        (flow, run_id),
    ).fetchall()
    if not rows:
        return None, None, []
    try:
        requests = [
            (int(number), InterruptSignal(reason=reason, force=bool(force), source=source, sent_at=sent))
            for _, _, number, reason, force, source, sent in rows
            if number is not None
        ]
    except ValidationError as exc:
        raise StoreError(
            f"{where}: run {run_id!r} of flow {flow!r}: a stored interrupt request is invalid: {exc}"
        ) from exc
    return rows[0][0], int(rows[0][1]), requests


def held(lease: Lease, method: str, requests: Requests) -> list[tuple[int, InterruptSignal]]:
    """The requests of `interrupts()`, if the run is still held under `lease`.

    Raises:
        LeaseLost: It is not.
    """
    holder, epoch, found = requests
    if (holder, epoch) != (lease.owner, lease.epoch):
        raise _lost_to(lease, method, None if epoch is None else (holder, epoch))
    return found


def submit(
    connection: Connection,
    where: str,
    schema: str,
    flow: str,
    run_id: str,
    new: Row,
    queue: str,
    labels: dict[str, str],
) -> bool:
    """`Store.submit`."""
    found = find_run(connection, flow, run_id, lock=True)
    if found is None:
        connection.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(lock_key(schema, f"run/{run_id}")))
        found = find_run(connection, flow, run_id, lock=True)
    if found is None:
        other_flow(connection, where, flow, run_id)
        insert_run(connection, new._replace(status=RunStatus.QUEUED.value, finished_at=None), queue=queue)
    elif found[3] == RunStatus.COMPLETED.value:
        return False
    elif _live(found):
        raise _owned(found)
    else:
        connection.execute(
            f"UPDATE runs SET status = 'queued', finished_at = NULL, updated_at = now(), queue = %s, {_RELEASED}"
            " WHERE flow = %s AND run_id = %s",
            (queue, flow, run_id),
        )
    merge_labels(connection, flow, run_id, labels)
    return True


def append_events(connection: Connection, lease: Lease, events: list[str]) -> None:
    """`EventStore.append_events`, in one transaction: fenced by the run's epoch (held, or finished since by the
    lease's owner), under the run row's lock, which orders it against a claim and another append."""
    key = (lease.flow, lease.run_id)
    found = connection.execute("SELECT epoch FROM runs WHERE flow = %s AND run_id = %s FOR UPDATE", key).fetchone()
    if found is None or found[0] != lease.epoch:
        raise _lost(connection, lease, "append_events")
    row = connection.execute("SELECT coalesce(max(seq), 0) FROM events WHERE flow = %s AND run_id = %s", key).fetchone()
    last = int(row[0]) if row is not None else 0
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO events (flow, run_id, seq, event) VALUES (%s, %s, %s, %s)",
            [(*key, last + number, text) for number, text in enumerate(events, 1)],
        )
    end = last + len(events)
    if end > EVENTS_KEPT:
        connection.execute(
            "DELETE FROM events WHERE flow = %s AND run_id = %s AND seq <= %s", (*key, end - EVENTS_KEPT)
        )
