"""A `SQLiteStore`'s statements for owned runs: claims, fenced writes, queues and interrupt requests (the
`Store` methods beyond `BasicStore`'s). Each function runs in the store's worker thread, under its lock, on its
`StoreFile`, in one transaction: a claim's check and its write, a fenced write's check of `(owner, epoch)` and
the write, are one IMMEDIATE transaction, so of racing processes exactly one gets in first and the others see
what it wrote.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from ._errors import LeaseLost, RunOwned, StoreError
from ._lease import Claim, Lease, Queue
from ._rows import Row, interrupted_report, now, utc_text
from ._signal import InterruptSignal
from ._sqlite_file import StoreFile
from ._sqlite_runs import (
    CLAIMED,
    EPOCH,
    EXPIRES,
    FULL_COLUMNS,
    OWNER,
    find_run,
    insert_run,
    merge_labels,
    other_flow,
    stored_run,
)
from ._store import EVENTS_KEPT, RunStatus, StepRow

__all__ = [
    "append_events",
    "claim",
    "claim_next",
    "commit_step",
    "interrupt",
    "interrupts",
    "progress",
    "release",
    "renew",
    "submit",
    "write",
]

_FENCE = "flow = ? AND run_id = ? AND owner = ? AND epoch = ?"
"""The condition of every fenced write: the run is still held under the lease."""
_UNFINISHED = ("queued", "running", "interrupted", "failed")
_UPSERT_STEP = (
    "INSERT INTO steps (flow, run_id, step, epoch, checkpoint, report) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (flow, run_id, step) DO UPDATE SET epoch = excluded.epoch, "
)
"""A step row's upsert, completed by what it replaces: an upsert keeps the row's rowid, so `load()` merges the
rows in the order their steps first wrote, as `MemoryStore` keeps them."""
_RELEASED = "owner = NULL, lease_expires_at = NULL, claimed_at = NULL"


def _fence(lease: Lease) -> tuple[str, str, str, int]:
    return (lease.flow, lease.run_id, lease.owner, lease.epoch)


def _lost(file: StoreFile, lease: Lease, method: str) -> LeaseLost:
    """Why a fenced write found no row of its lease (in its transaction, which then rolls back)."""
    found = file.connection.execute(
        "SELECT owner, epoch FROM runs WHERE flow = ? AND run_id = ?", (lease.flow, lease.run_id)
    ).fetchone()
    if found is None:
        return LeaseLost(lease.flow, lease.run_id, lease.epoch, f"{method}(): the run is no longer stored")
    holder = "nobody" if found[0] is None else found[0]
    return LeaseLost(
        lease.flow, lease.run_id, lease.epoch, f"{method}(): the run is at epoch {found[1]}, held by {holder}"
    )


def _live(columns: tuple[Any, ...], at: str) -> bool:
    expires = columns[EXPIRES]
    return columns[OWNER] is not None and isinstance(expires, str) and expires > at


def _owned(columns: tuple[Any, ...]) -> RunOwned:
    since: datetime | None
    try:
        since = datetime.fromisoformat(columns[CLAIMED])
    except (TypeError, ValueError):
        since = None
    return RunOwned(columns[0], columns[1], str(columns[OWNER]), since)


def _take(file: StoreFile, columns: tuple[Any, ...], owner: str, lease: float) -> Lease:
    """Claim the run of a row nobody holds live: epoch + 1, running.

    Raises:
        RunOwned: Its lease is live.
    """
    at = now()
    if _live(columns, utc_text(at)):
        raise _owned(columns)
    expires, epoch = at + timedelta(seconds=lease), int(columns[EPOCH]) + 1
    file.connection.execute(
        "UPDATE runs SET owner = ?, epoch = ?, claimed_at = ?, lease_expires_at = ?, status = 'running',"
        " finished_at = NULL, updated_at = ? WHERE flow = ? AND run_id = ?",
        (owner, epoch, utc_text(at), utc_text(expires), utc_text(at), *columns[:2]),
    )
    return Lease(columns[0], columns[1], owner, epoch, expires)


def claim(
    file: StoreFile,
    flow: str,
    run_id: str,
    owner: str,
    new: Row | None,
    labels: dict[str, str],
    lease: float,
    reopen: bool = False,
) -> Claim | None:
    """`Store.claim`."""

    def statements() -> Claim | None:
        found = find_run(file, flow, run_id)
        if found is None:
            other_flow(file, flow, run_id)
            if new is None:
                return None
            at = now()
            expires = at + timedelta(seconds=lease)
            row = new._replace(status=RunStatus.RUNNING.value, finished_at=None, updated_at=utc_text(at))
            insert_run(
                file.connection, row, owner=owner, epoch=1, expires_at=utc_text(expires), claimed_at=utc_text(at)
            )
            merge_labels(file.connection, flow, run_id, labels)
            return Claim(Lease(flow, run_id, owner, 1, expires), None)
        stored = stored_run(file, found, utc_text(now()))
        if stored.record.status is RunStatus.COMPLETED and not reopen:
            return Claim(None, stored)
        return Claim(_take(file, found, owner, lease), stored)

    return file.write(statements)


def claim_next(
    file: StoreFile, owner: str, flows: Sequence[str], queues: Sequence[Queue], lease: float
) -> Claim | None:
    """`Store.claim_next`: the queues at their limit are counted first, in the transaction, then the oldest run
    of the others is claimed. An orphan is a run once claimed (epoch above 0): one saved running by `save()`
    alone may still have its writer (see `lease_record`)."""
    connection = file.connection

    def statements() -> Claim | None:
        at = utc_text(now())
        limits = {queue.name: queue.concurrency for queue in queues}
        full = [
            name
            for name, limit in limits.items()
            if limit is not None
            and connection.execute(
                "SELECT count(*) FROM runs WHERE status = 'running' AND queue = ? AND owner IS NOT NULL"
                " AND lease_expires_at > ?",
                (name, at),
            ).fetchone()[0]
            >= limit
        ]
        found = connection.execute(
            f"SELECT {FULL_COLUMNS} FROM runs WHERE flow IN ({_marks(flows)})"
            f" AND ((status = 'queued' AND queue IN ({_marks(limits)}))"
            "  OR (status = 'running' AND epoch > 0 AND (owner IS NULL OR lease_expires_at IS NULL"
            "   OR lease_expires_at <= ?)))"
            f" AND (queue IS NULL OR queue NOT IN ({_marks(full)}))"
            " ORDER BY started_at, rowid LIMIT 1",
            (*flows, *limits, at, *full),
        ).fetchone()
        if found is None:
            return None
        stored = stored_run(file, found, at)
        return Claim(_take(file, found, owner, lease), stored)

    return file.write(statements)


def _marks(values: Sequence[object] | dict[str, Any]) -> str:
    return ", ".join("?" * len(values))


def renew(file: StoreFile, lease: Lease, seconds: float) -> Lease:
    """`Store.renew`."""

    def statements() -> Lease:
        expires = now() + timedelta(seconds=seconds)
        renewed = file.connection.execute(
            f"UPDATE runs SET lease_expires_at = ? WHERE {_FENCE}", (utc_text(expires), *_fence(lease))
        )
        if renewed.rowcount == 0:
            raise _lost(file, lease, "renew")
        return Lease(lease.flow, lease.run_id, lease.owner, lease.epoch, expires)

    return file.write(statements)


def write(file: StoreFile, lease: Lease, head: Row, steps: Sequence[StepRow], finish: bool) -> None:
    """`Store.write`, or with `finish` `Store.finish`: the head (its `started_at` stays the first one) and the
    step rows; a finish also gives the run up and drops its interrupt requests."""
    method, released = ("finish", f", {_RELEASED}") if finish else ("write", "")

    def statements() -> None:
        written = file.connection.execute(
            "UPDATE runs SET flow_version = ?, status = ?, updated_at = ?, finished_at = ?, checkpoint = ?,"
            f" report = ?{released} WHERE {_FENCE}",
            (*head[2:4], *head[5:], *_fence(lease)),
        )
        if written.rowcount == 0:
            raise _lost(file, lease, method)
        _upsert_steps(file.connection, lease, steps)
        if finish:
            file.connection.execute("DELETE FROM interrupts WHERE flow = ? AND run_id = ?", (lease.flow, lease.run_id))

    file.write(statements)


def _upsert_steps(connection: sqlite3.Connection, lease: Lease, steps: Sequence[StepRow]) -> None:
    connection.executemany(
        _UPSERT_STEP + "checkpoint = excluded.checkpoint, report = excluded.report",
        [(lease.flow, lease.run_id, row.step, lease.epoch, row.checkpoint_json, row.report_json) for row in steps],
    )


def commit_step(file: StoreFile, lease: Lease, step: StepRow) -> None:
    """`Store.commit_step`: the step's row, if the run is still held under the lease (read in the same IMMEDIATE
    transaction, so no claim comes between). The run row is not written: a step's commit writes the pages of
    the steps table alone (updating the run row's `updated_at` too cost a page more per step, measured: about a
    third of the commit), so `updated_at` is when the run's head was last written."""

    def statements() -> None:
        if file.connection.execute(f"SELECT 1 FROM runs WHERE {_FENCE}", _fence(lease)).fetchone() is None:
            raise _lost(file, lease, "commit_step")
        _upsert_steps(file.connection, lease, (step,))

    file.write(statements)


def progress(file: StoreFile, lease: Lease, step: str, report_json: str) -> None:
    """`Store.progress`: the step row's report, its checkpoint part kept (NULL for a new row)."""

    def statements() -> None:
        if file.connection.execute(f"SELECT 1 FROM runs WHERE {_FENCE}", _fence(lease)).fetchone() is None:
            raise _lost(file, lease, "progress")
        file.connection.execute(
            _UPSERT_STEP + "report = excluded.report", (lease.flow, lease.run_id, step, lease.epoch, None, report_json)
        )

    file.write(statements)


def release(file: StoreFile, lease: Lease) -> None:
    """`Store.release`: nothing happens if the lease was lost already."""
    file.write(lambda: file.connection.execute(f"UPDATE runs SET {_RELEASED} WHERE {_FENCE}", _fence(lease)))


def interrupt(file: StoreFile, flow: str, run_id: str, signal: InterruptSignal) -> bool:
    """`Store.interrupt`."""
    connection = file.connection

    def statements() -> bool:
        found = find_run(file, flow, run_id)
        if found is None or found[3] not in _UNFINISHED:
            return False
        at = now()
        if _live(found, utc_text(at)):
            connection.execute(
                "INSERT INTO interrupts (flow, run_id, reason, force, source, requested_at) VALUES (?, ?, ?, ?, ?, ?)",
                (flow, run_id, signal.reason, int(signal.force), signal.source, utc_text(signal.sent_at)),
            )
            return True
        if found[3] in (RunStatus.INTERRUPTED.value, RunStatus.FAILED.value):
            return False  # ended, nobody holds it: there is nothing to stop
        report = interrupted_report(stored_run(file, found, utc_text(at)).report_json, signal, at)
        connection.execute(
            f"UPDATE runs SET status = 'interrupted', finished_at = ?, updated_at = ?, report = ?, {_RELEASED}"
            " WHERE flow = ? AND run_id = ?",
            (utc_text(at), utc_text(at), report, flow, run_id),
        )
        # The head has the rows' reports now, marked as they ended: the rows must not replace them again.
        connection.execute("UPDATE steps SET epoch = 0 WHERE flow = ? AND run_id = ?", (flow, run_id))
        return True

    return file.write(statements)


def interrupts(file: StoreFile, lease: Lease, after: int) -> list[tuple[int, InterruptSignal]]:
    """`Store.interrupts`, cheap when nothing changed: the run's holder and requests are read again only when
    another connection has committed since (`PRAGMA data_version` moved) or this one has written (an
    `interrupt()` of this store, a claim...); else they come from the memo of the last read."""
    (version,) = file.connection.execute("PRAGMA data_version").fetchone()
    if file.interrupts_seen != (version, file.writes):
        file.interrupts_seen, file.interrupts_memo = (version, file.writes), {}
    key = (lease.flow, lease.run_id)
    memo = file.interrupts_memo.get(key)
    if memo is None:
        memo = file.interrupts_memo[key] = file.read(lambda: _requests(file, lease))
    holder, epoch, requests = memo
    if (holder, epoch) != (lease.owner, lease.epoch):
        why = (
            "the run is no longer stored"
            if epoch is None
            else f"the run is at epoch {epoch}, held by {holder or 'nobody'}"
        )
        raise LeaseLost(lease.flow, lease.run_id, lease.epoch, f"interrupts(): {why}")
    return [request for request in requests if request[0] > after]


def _requests(file: StoreFile, lease: Lease) -> tuple[str | None, int | None, list[tuple[int, InterruptSignal]]]:
    found = find_run(file, lease.flow, lease.run_id)
    if found is None:
        return None, None, []
    rows = file.connection.execute(
        "SELECT id, reason, force, source, requested_at FROM interrupts WHERE flow = ? AND run_id = ? ORDER BY id",
        (lease.flow, lease.run_id),
    )
    try:
        requests = [
            (number, InterruptSignal(reason=reason, force=bool(force), source=source, sent_at=sent))
            for number, reason, force, source, sent in rows
        ]
    except ValidationError as exc:
        raise StoreError(
            f"{file.where}: run {lease.run_id!r} of flow {lease.flow!r}: a stored interrupt request is invalid: {exc}"
        ) from exc
    return found[OWNER], found[EPOCH], requests


def submit(file: StoreFile, flow: str, run_id: str, new: Row, queue: str, labels: dict[str, str]) -> bool:
    """`Store.submit`."""
    connection = file.connection

    def statements() -> bool:
        found = find_run(file, flow, run_id)
        if found is None:
            other_flow(file, flow, run_id)
            insert_run(connection, new._replace(status=RunStatus.QUEUED.value, finished_at=None), queue=queue)
        elif found[3] == RunStatus.COMPLETED.value:
            return False
        elif _live(found, utc_text(now())):
            raise _owned(found)
        else:
            connection.execute(
                f"UPDATE runs SET status = 'queued', finished_at = NULL, updated_at = ?, queue = ?, {_RELEASED}"
                " WHERE flow = ? AND run_id = ?",
                (utc_text(now()), queue, flow, run_id),
            )
        merge_labels(connection, flow, run_id, labels)
        return True

    return file.write(statements)


def append_events(file: StoreFile, lease: Lease, events: list[str]) -> None:
    """`EventStore.append_events`: fenced by the run's epoch (held, or finished since by the lease's owner)."""
    connection = file.connection
    key = (lease.flow, lease.run_id)

    def statements() -> None:
        found = connection.execute("SELECT epoch FROM runs WHERE flow = ? AND run_id = ?", key).fetchone()
        if found is None or found[0] != lease.epoch:
            raise _lost(file, lease, "append_events")
        (last,) = connection.execute(
            "SELECT coalesce(max(seq), 0) FROM events WHERE flow = ? AND run_id = ?", key
        ).fetchone()
        connection.executemany(
            "INSERT INTO events (flow, run_id, seq, event) VALUES (?, ?, ?, ?)",
            [(*key, last + number, text) for number, text in enumerate(events, 1)],
        )
        end = last + len(events)
        if end > EVENTS_KEPT:
            connection.execute(
                "DELETE FROM events WHERE flow = ? AND run_id = ? AND seq <= ?", (*key, end - EVENTS_KEPT)
            )

    if events:
        file.write(statements)
