"""MemoryStore: runs in a dict, for tests and for runs that need not outlive the process."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio.lowlevel

from ._checkpoint import Checkpoint
from ._errors import LeaseLost, RunOwned, StoreError
from ._lease import Claim, Lease, Queue, check_lease
from ._outcome import RunReport
from ._rows import (
    Row,
    check_events,
    check_names,
    check_state,
    checked_labels,
    head_row,
    interrupt_signal,
    interrupted_report,
    lease_record,
    now,
    stored_events,
    to_row,
    to_stored,
    utc_text,
)
from ._signal import InterruptSignal
from ._store import EVENTS_KEPT, RunRecord, RunState, RunStatus, StepRow, StoredEvents, StoredRun

__all__ = ["MemoryStore"]

_UNFINISHED = frozenset({"queued", "running", "interrupted", "failed"})


@dataclass
class _Run:
    """One run: its head row, lease, queue, step rows and pending interrupt requests."""

    row: Row
    owner: str | None = None
    epoch: int = 0
    expires_at: datetime | None = None
    claimed_at: datetime | None = None
    queue: str | None = None
    steps: dict[str, tuple[int, StepRow]] = field(default_factory=dict)
    requests: list[tuple[int, InterruptSignal]] = field(default_factory=list)

    def live(self, at: datetime) -> bool:
        return self.owner is not None and self.expires_at is not None and self.expires_at > at


class MemoryStore:
    """A store in a dict: for tests, and for runs that need not outlive the process.

    It keeps the same JSON text as `SQLiteStore` (`checkpoint.to_json()`, `report.model_dump_json()`),
    so it behaves like a persistent store: an output that cannot be serialised fails here too, and
    what `load()` returns is validated the same way. One store may be shared by runs in several
    threads and event loops, with the same leases, fencing and interrupt requests as any `Store`
    (within the process). It is a `LabelStore`: it keeps labels beside the runs, and an `EventStore`: it
    keeps each run's last `EVENTS_KEPT` events.

    Args:
        lease: Seconds a claim holds without renewal (owners renew every third of it).

    Raises:
        TypeError: `lease` is not a number of seconds > 0.
    """

    interrupt_poll = 0.02
    """An owner looks for interrupt requests this often (a dict lookup under a lock)."""

    def __init__(self, *, lease: float = 15.0) -> None:
        self._lease = check_lease("MemoryStore", lease)
        self._runs: dict[tuple[str, str], _Run] = {}  # in the order of the runs' first saves
        self._run_labels: dict[tuple[str, str], dict[str, str]] = {}  # never holds an empty dict
        # Per run: its last EVENTS_KEPT events' JSON, and how many it was ever given.
        self._events: dict[tuple[str, str], tuple[deque[str], list[int]]] = {}
        self._lock = threading.Lock()
        self._requests = 0  # the last interrupt request's number

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._runs)} runs>)"

    @property
    def lease(self) -> float:
        """Seconds a claim holds without renewal."""
        return self._lease

    # -- the BasicStore protocol -------------------------------------------------------------------

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store the run's checkpoint and report, unfenced, dropping its step rows (see `BasicStore.save`).

        Raises:
            CheckpointError: An output cannot be serialised; what was stored for the run is kept.
        """
        await anyio.lowlevel.checkpoint()
        row = to_row(checkpoint, report)
        key = (row.flow, row.run_id)
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                self._runs[key] = _Run(row)
            else:
                run.row = row._replace(started_at=run.row.started_at)
                run.steps.clear()

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None (see `Store.load`)."""
        check_names("load", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._runs.get((flow, run_id))
            if run is None:
                return None
            return self._stored(run)

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first (see `Store.list_runs`)."""
        check_names("list_runs", flow)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            runs = [run for run in self._runs.values() if flow is None or run.row.flow == flow]
            runs.sort(key=lambda run: run.row.started_at)  # stable: ties stay in the order of first saves
            return [self._record(run) for run in runs]

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run; nothing happens if there is none (see `Store.delete`)."""
        check_names("delete", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            self._runs.pop((flow, run_id), None)
            self._run_labels.pop((flow, run_id), None)
            self._events.pop((flow, run_id), None)

    # -- ownership -----------------------------------------------------------------------------------

    async def claim(
        self,
        flow: str,
        run_id: str,
        owner: str,
        *,
        new: RunState | None = None,
        reopen: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> Claim | None:
        """Claim one run (see `Store.claim`)."""
        check_names("claim", flow, run_id)
        if new is not None:
            check_state("claim", flow, run_id, new)
        checked = None if labels is None else checked_labels(flow, run_id, labels)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._runs.get((flow, run_id))
            if run is None:
                self._other_flow(flow, run_id)
            if run is None:
                if new is None:
                    return None
                run = self._runs[(flow, run_id)] = _Run(head_row(flow, run_id, new))
                if checked:
                    self._run_labels.setdefault((flow, run_id), {}).update(checked)
                return Claim(self._take(run, owner), None)
            if run.row.status == RunStatus.COMPLETED.value and not reopen:
                return Claim(None, self._stored(run))
            stored = self._stored(run)
            return Claim(self._take(run, owner), stored)

    async def claim_next(self, owner: str, flows: Collection[str], queues: Sequence[Queue]) -> Claim | None:
        """Claim the oldest queued run of `flows` in `queues`, or orphaned run of `flows` (see `Store.claim_next`)."""
        await anyio.lowlevel.checkpoint()
        limits = {queue.name: queue.concurrency for queue in queues}
        with self._lock:
            at = now()
            candidates = [
                run
                for run in self._runs.values()
                if run.row.flow in flows
                and (
                    (run.row.status == RunStatus.QUEUED.value and run.queue in limits)
                    or (run.row.status == RunStatus.RUNNING.value and run.epoch > 0)
                )
                and not run.live(at)
            ]
            candidates.sort(key=lambda run: run.row.started_at)
            for run in candidates:
                limit = limits.get(run.queue) if run.queue is not None else None
                if limit is not None:
                    held = sum(1 for other in self._runs.values() if other.queue == run.queue and other.live(at))
                    if held >= limit:
                        continue
                stored = self._stored(run)
                return Claim(self._take(run, owner), stored)
            return None

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease (see `Store.renew`)."""
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._held(lease, "renew")
            run.expires_at = now() + timedelta(seconds=self._lease)
            return Lease(lease.flow, lease.run_id, lease.owner, lease.epoch, run.expires_at)

    async def write(self, lease: Lease, state: RunState, steps: Sequence[StepRow] = ()) -> None:
        """Replace the run's head and store `steps` (see `Store.write`)."""
        check_state("write", lease.flow, lease.run_id, state, steps)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            self._write(self._held(lease, "write"), lease, state, steps)

    async def commit_step(self, lease: Lease, step: StepRow) -> None:
        """Store one step row (see `Store.commit_step`)."""
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._held(lease, "commit_step")
            run.steps[step.step] = (lease.epoch, step)  # the head (and its updated_at) as it was, as SQLite

    async def progress(self, lease: Lease, step: str, report_json: str) -> None:
        """Store a running step's report (see `Store.progress`)."""
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._held(lease, "progress")
            _, old = run.steps.get(step, (0, None))
            run.steps[step] = (lease.epoch, StepRow(step, report_json, None if old is None else old.checkpoint_json))

    async def finish(self, lease: Lease, state: RunState, steps: Sequence[StepRow] = ()) -> None:
        """Write the run's end and give it up (see `Store.finish`)."""
        check_state("finish", lease.flow, lease.run_id, state, steps)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._held(lease, "finish")
            self._write(run, lease, state, steps)
            run.owner = run.expires_at = run.claimed_at = None
            run.requests.clear()

    async def release(self, lease: Lease) -> None:
        """Give the run up as it is stored (see `Store.release`)."""
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._runs.get((lease.flow, lease.run_id))
            if run is not None and (run.owner, run.epoch) == (lease.owner, lease.epoch):
                run.owner = run.expires_at = run.claimed_at = None

    # -- control from anywhere -----------------------------------------------------------------------

    async def interrupt(
        self, flow: str, run_id: str, reason: str = "interrupted", *, force: bool = False, source: str | None = "api"
    ) -> bool:
        """Ask a run to stop, durably (see `Store.interrupt`)."""
        signal = interrupt_signal(flow, run_id, reason, force, source)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._runs.get((flow, run_id))
            if run is None or run.row.status not in _UNFINISHED:
                return False
            at = now()
            if run.live(at):
                self._requests += 1
                run.requests.append((self._requests, signal))
                return True
            if run.row.status in (RunStatus.INTERRUPTED.value, RunStatus.FAILED.value):
                return False  # ended, nobody holds it: there is nothing to stop
            run.row = run.row._replace(
                status=RunStatus.INTERRUPTED.value,
                finished_at=utc_text(at),
                updated_at=utc_text(at),
                report=interrupted_report(self._stored(run).report_json, signal, at),
            )
            # The head has the rows' reports now, marked as they ended: the rows must not replace them again.
            run.steps = {name: (0, row) for name, (_, row) in run.steps.items()}
            run.owner = run.expires_at = run.claimed_at = None
            return True

    async def interrupts(self, lease: Lease, after: int = 0) -> list[tuple[int, InterruptSignal]]:
        """The run's pending interrupt requests numbered above `after` (see `Store.interrupts`)."""
        with self._lock:
            run = self._held(lease, "interrupts")
            return [request for request in run.requests if request[0] > after]

    async def submit(
        self, flow: str, run_id: str, new: RunState, *, queue: str = "default", labels: Mapping[str, str] | None = None
    ) -> bool:
        """Queue a run for a worker (see `Store.submit`)."""
        check_state("submit", flow, run_id, new)
        checked = None if labels is None else checked_labels(flow, run_id, labels)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._runs.get((flow, run_id))
            if run is None:
                self._other_flow(flow, run_id)
            if run is None:
                row = head_row(flow, run_id, new)._replace(status=RunStatus.QUEUED.value, finished_at=None)
                run = self._runs[(flow, run_id)] = _Run(row, queue=queue)
                if checked:
                    self._run_labels.setdefault((flow, run_id), {}).update(checked)
                return True
            if run.row.status == RunStatus.COMPLETED.value:
                return False
            if run.live(now()):
                raise RunOwned(flow, run_id, run.owner or "?", run.claimed_at)
            run.row = run.row._replace(status=RunStatus.QUEUED.value, finished_at=None, updated_at=utc_text(now()))
            run.owner = run.expires_at = run.claimed_at = None
            run.queue = queue
            if checked:
                self._run_labels.setdefault((flow, run_id), {}).update(checked)
            return True

    # -- the LabelStore protocol -------------------------------------------------------------------

    async def set_labels(self, flow: str, run_id: str, labels: Mapping[str, str]) -> None:
        """Merge `labels` into the run's (see `LabelStore.set_labels`).

        Raises:
            TypeError: A name, the mapping, a key or a value is not of its type; nothing is written.
            ValueError: A key is empty; nothing is written.
            StoreError: A name, a key or a value holds text UTF-8 cannot encode; nothing is written.
        """
        checked = checked_labels(flow, run_id, labels)
        await anyio.lowlevel.checkpoint()
        if checked:
            with self._lock:
                self._run_labels.setdefault((flow, run_id), {}).update(checked)

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        """The run's labels, in key order; `{}` if it has none (see `LabelStore.labels`)."""
        check_names("labels", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            labels = self._run_labels.get((flow, run_id), {})
            return dict(sorted(labels.items()))  # code point order: SQLite's order of UTF-8 text

    # -- the EventStore protocol -------------------------------------------------------------------

    async def append_events(self, lease: Lease, events: Sequence[str]) -> None:
        """Append events to the run's history (see `EventStore.append_events`)."""
        texts = check_events("MemoryStore", events)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            run = self._runs.get((lease.flow, lease.run_id))
            if run is None or run.epoch != lease.epoch:
                raise LeaseLost(
                    lease.flow,
                    lease.run_id,
                    lease.epoch,
                    "append_events(): the run is no longer stored"
                    if run is None
                    else f"append_events(): the run is at epoch {run.epoch}",
                )
            kept, count = self._events.setdefault((lease.flow, lease.run_id), (deque(maxlen=EVENTS_KEPT), [0]))
            kept.extend(texts)
            count[0] += len(texts)

    async def events(self, flow: str, run_id: str) -> StoredEvents:
        """The run's stored events, oldest first (see `EventStore.events`)."""
        check_names("events", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            kept, count = self._events.get((flow, run_id), ((), [0]))
            texts = list(kept)
        return stored_events("MemoryStore", flow, run_id, texts, count[0] - len(texts))

    # -- under the lock ----------------------------------------------------------------------------

    def _other_flow(self, flow: str, run_id: str) -> None:
        for other, other_id in self._runs:
            if other_id == run_id and other != flow:
                raise StoreError(f"MemoryStore: run {run_id!r} is a run of flow {other!r}, not of flow {flow!r}")

    def _take(self, run: _Run, owner: str) -> Lease:
        at = now()
        if run.live(at):
            raise RunOwned(run.row.flow, run.row.run_id, run.owner or "?", run.claimed_at)
        run.owner, run.epoch, run.claimed_at = owner, run.epoch + 1, at
        run.expires_at = at + timedelta(seconds=self._lease)
        run.row = run.row._replace(status=RunStatus.RUNNING.value, finished_at=None, updated_at=utc_text(at))
        return Lease(run.row.flow, run.row.run_id, owner, run.epoch, run.expires_at)

    def _held(self, lease: Lease, method: str) -> _Run:
        run = self._runs.get((lease.flow, lease.run_id))
        if run is None:
            raise LeaseLost(lease.flow, lease.run_id, lease.epoch, f"{method}(): the run is no longer stored")
        if (run.owner, run.epoch) != (lease.owner, lease.epoch):
            holder = "nobody" if run.owner is None else run.owner
            raise LeaseLost(
                lease.flow, lease.run_id, lease.epoch, f"{method}(): the run is at epoch {run.epoch}, held by {holder}"
            )
        return run

    def _write(self, run: _Run, lease: Lease, state: RunState, steps: Sequence[StepRow]) -> None:
        run.row = head_row(lease.flow, lease.run_id, state)._replace(started_at=run.row.started_at)
        for step in steps:
            run.steps[step.step] = (lease.epoch, step)

    def _stored(self, run: _Run) -> StoredRun:
        stored = to_stored(run.row, "MemoryStore", list(run.steps.values()), run.epoch)
        return stored.model_copy(update={"record": self._record(run)})

    def _record(self, run: _Run) -> RunRecord:
        expires = None if run.expires_at is None else utc_text(run.expires_at)
        return lease_record(
            run.row,
            "MemoryStore",
            owner=run.owner,
            epoch=run.epoch,
            expires_at=expires,
            queue=run.queue,
            at=utc_text(now()),
        )
