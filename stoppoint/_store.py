"""Stores: where runs are persisted so they survive the process (the `Store`, `LabelStore` and `EventStore`
protocols and records).

A store keeps, per `(flow, run_id)`, the run's latest checkpoint and report as JSON text, (a
`LabelStore`) the run's labels, str key/value pairs for the tools that run it, and (an `EventStore`) the
run's history, its last `EVENTS_KEPT` events. It never
unpickles or evaluates anything: what comes back is validated by pydantic (the flow turns the
checkpoint's outputs back into each step's return type), so a tampered file yields an error, not
code execution.

Two stores come with stoppoint: `MemoryStore` (`_memory.py`: a dict, for tests and runs that need not
outlive the process) and `SQLiteStore` (`_sqlite.py`; `_sqlite_file.py` has its on-disk schema: one SQLite
file, shared safely by several processes). Both keep the same rows, as text (`_rows.py`), so a value
that cannot be serialised fails the same way in both; both are `LabelStore`s and `EventStore`s, as is
`PostgresStore`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from ._checkpoint import Checkpoint
from ._events import Event
from ._outcome import RunReport
from ._signal import InterruptSignal

if TYPE_CHECKING:
    from ._lease import Claim, Lease, Queue

__all__ = [
    "CLI_TARGET_LABEL",
    "EVENTS_KEPT",
    "BasicStore",
    "EventStore",
    "LabelStore",
    "RunRecord",
    "RunState",
    "RunStatus",
    "StepRow",
    "Store",
    "StoredEvents",
    "StoredRun",
    "run_status",
]


class RunStatus(StrEnum):
    """Where a stored run stands."""

    QUEUED = "queued"
    """Submitted (`flow.submit`), waiting for a worker to claim it."""
    RUNNING = "running"
    """Started and not finished; its owner's lease is live (a store without leases cannot tell a
    dead owner's run from a live one: it says running)."""
    ORPHANED = "orphaned"
    """Stored as running, but its lease expired: its owner died (or lost the store). A worker, or
    `run()` with its id, claims and resumes it. Never stored: a store reports it when reading."""
    INTERRUPTED = "interrupted"
    """Stopped by an interrupt: `run()` with its id resumes it."""
    FAILED = "failed"
    """A step failed: `run()` with its id retries from the completed steps."""
    COMPLETED = "completed"
    """Every step completed: `run()` with its id returns the stored result, running nothing."""


def run_status(report: RunReport) -> RunStatus:
    """The status of a run as its report shows it."""
    if report.finished_at is None:
        return RunStatus.RUNNING
    if report.failed:
        return RunStatus.FAILED
    if all(step.status == "completed" for step in report.steps.values()):
        return RunStatus.COMPLETED
    return RunStatus.INTERRUPTED


class RunRecord(BaseModel):
    """One stored run, as `Store.list_runs()` lists it.

    Attributes:
        flow: The flow's name.
        run_id: The run's id.
        flow_version: The flow's version when the run was saved.
        status: Where the run stands.
        started_at: When the run (its first attempt) started.
        updated_at: When its head was last written (claimed, started, ended, queued: not at each step's commit).
        finished_at: When its latest attempt ended; None while running (or after a crash).
        owner: Who holds its lease (`host:pid/token`), None when nobody does (it ended, was
            released, or is queued); a dead owner stays here until the run is claimed again.
        epoch: How many times it was claimed (0: never, a queued run); each attempt writes under its own.
        lease_expires_at: Until when the owner's lease holds without a renewal; None without owner.
        queue: The queue it was submitted to (`flow.submit`), None if it was run directly.
    """

    model_config = ConfigDict(frozen=True)

    flow: str
    run_id: str
    flow_version: str
    status: RunStatus
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    owner: str | None = None
    epoch: int = 0
    lease_expires_at: datetime | None = None
    queue: str | None = None


class StoredRun(BaseModel):
    """What `Store.load()` returns: the record and the run's latest checkpoint and report, as JSON.

    `Flow.load_checkpoint(stored.checkpoint_json)` turns the checkpoint back into typed outputs.

    Attributes:
        record: The run's record.
        checkpoint_json: Its latest checkpoint (`Checkpoint.to_json()`).
        report_json: Its latest report (`RunReport.model_dump_json()`).
    """

    model_config = ConfigDict(frozen=True)

    record: RunRecord
    checkpoint_json: str
    report_json: str


@dataclass(frozen=True, slots=True)
class RunState:
    """A run's head, as `Store.write()` and `Store.finish()` store it (and `Store.claim()` and
    `Store.submit()` a new run): everything of the run but its step rows.

    Attributes:
        flow_version: The flow's version.
        status: Where the run stands (`run_status(report)` for a written run).
        started_at: When the run (its first attempt) started; a store keeps the first one it got.
        finished_at: When the attempt ended; None while running.
        checkpoint_json: The run's checkpoint (`Checkpoint.to_json()`); step rows add to its outputs
            and nested checkpoints (the runtime writes it with neither, and each step in a row).
        report_json: The run's report (`RunReport.model_dump_json()`); the step rows of the current
            epoch replace their steps' reports in it.
    """

    flow_version: str
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    checkpoint_json: str
    report_json: str


@dataclass(frozen=True, slots=True)
class StepRow:
    """One step's row: what `Store.commit_step()` stores when a step completes.

    Attributes:
        step: The step's name.
        report_json: Its report (`StepReport.model_dump_json()`).
        checkpoint_json: Its part of the run's checkpoint, as a checkpoint of the run holding only that
            part: its output (in `outputs`), or, for an include step that has not completed, the
            included flow's own checkpoint (in `nested`); None for a row of progress alone.
    """

    step: str
    report_json: str
    checkpoint_json: str | None = None


@runtime_checkable
class BasicStore(Protocol):
    """The stores of stoppoint 0.1: whole saves, no leases. `Flow.run(store=...)` still takes one, saving
    the whole checkpoint and report after every step, with no owner and no interrupts from other
    processes; new stores implement `Store`. All methods are async, so network stores fit.

    `run()` calls `save()` once before the first step (so the run is listed as running), after
    every completed step (before any step that depends on it starts), and once more when the run
    ends; a store must have committed the checkpoint when `save()` returns. Calls for one run never
    overlap.

    On asyncio a native cancellation of the task running the flow (`Task.cancel()`, which an anyio
    shield does not stop) may cut a `save()` off; `run()` then makes the same save again, to its
    end, before the cancellation goes on. So a `save()` that raises a cancellation must have stopped
    what it was doing, or finished it: a write still going on afterwards (in a worker thread, say)
    could land after the next save and undo it. `SQLiteStore` waits for its worker thread.

    A store that also keeps labels beside its runs (as both stores of stoppoint do, for the `stoppoint`
    command among others) is a `LabelStore`; a store need not be one.
    """

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store `checkpoint` (as `checkpoint.to_json()`) and `report` for `(checkpoint.flow, checkpoint.run_id)`,
        replacing what was stored for that run.

        Args:
            checkpoint: The run's checkpoint now.
            report: The run's report now (its status is derived from it: `run_status()`).

        Raises:
            StoreError: The store cannot be written.
            CheckpointError: An output cannot be serialised (from `checkpoint.to_json()`).
        """
        ...

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None if there is none.

        Args:
            flow: The flow's name.
            run_id: The run's id.

        Returns:
            The record and the run's latest checkpoint and report as JSON, or None.

        Raises:
            StoreError: The store cannot be read.
        """
        ...

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first.

        Args:
            flow: Only the runs of this flow (None: all).

        Returns:
            The records, oldest first.

        Raises:
            StoreError: The store cannot be read.
        """
        ...

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run; nothing happens if there is none.

        Args:
            flow: The flow's name.
            run_id: The run's id.

        Raises:
            StoreError: The store cannot be written.
        """
        ...


@runtime_checkable
class Store(BasicStore, Protocol):
    """Where `Flow.run(store=...)` persists runs, with one owner per run: the protocol every store of
    stoppoint implements, and a third-party store implements to get the same guarantees. All methods
    are async, so network stores fit; `tests/test_store_conformance.py` checks any store against it.

    **What a store keeps, per `(flow, run_id)`.** A *run row*: the run's head (`RunState`: its
    checkpoint without step outputs, its report, status and times), its lease (`owner`, `epoch`,
    `lease_expires_at`), its queue, and its pending interrupt requests. And *step rows*, one per step
    name (`StepRow`): the step's part of the checkpoint (its output, or an unfinished include's own
    checkpoint) and its report. `load()` returns the head merged with the rows (`merge_rows()` does
    it): outputs and nested checkpoints of every row, reports of the rows of the current epoch.

    **Ownership.** `claim()` and `claim_next()` make a lease; every write of a run (`write`,
    `commit_step`, `progress`, `finish`, `release`, `renew`) takes the lease and is refused with
    `LeaseLost`, writing nothing, unless the run's stored `(owner, epoch)` is still the lease's: the
    check and the write are one transaction. A lease is live until its `expires_at`; a claim of a run
    whose lease is live raises `RunOwned`, whoever asks (the same process too).

    **Sizes.** `commit_step()` and `progress()` write one step row: their cost must not grow with the
    steps already stored. `write()` and `finish()` (once at the start and once at the end of an
    attempt) may write the whole head.

    How `Flow.run` uses it, per attempt: `claim` (or a worker's `claim_next`); `write` (listed as
    running); `commit_step` after each completed step, before any step that depends on it starts;
    `progress` at most once a second per running step; `renew` every `lease / 3` s, and
    `interrupts` every `interrupt_poll` s, in the background; `finish` at the end. Calls for one
    lease never overlap, except `renew` and `interrupts`, which may overlap the others. Only the
    top level's steps write progress (a step of an included flow shows in its include's row when that
    one is written).

    A native cancellation on asyncio (see `BasicStore`) may cut a call off; a store must then have
    stopped what it was doing or finished it (`SQLiteStore` waits for its worker thread).
    """

    @property
    def lease(self) -> float:
        """Seconds a claim holds without renewal (the `lease=` the store was made with)."""
        ...

    @property
    def interrupt_poll(self) -> float:
        """Seconds between two `interrupts()` calls of an owner: how soon it notices a request."""
        ...

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
        """Claim one run, atomically: of any number of claims racing for one run, exactly one wins.

        - No run of that id (in any flow): with `new`, it is created from it, owned, epoch 1, with
          `labels` (a `LabelStore`; others ignore them); without, returns None.
        - A stored run whose status is completed: returns `Claim(None, stored)`, claiming nothing;
          with `reopen`, claims it like an unfinished one (a flow that gained steps at the same version).
        - A stored unfinished run (queued, interrupted, failed, running with an expired lease, or
          released) of this flow: claimed, epoch + 1, its pending interrupt requests kept (the new owner
          receives them), status running (not finished); returns `Claim(lease, stored)`, stored as it
          was before the claim. (So `run()` checks what it can of a stored run before claiming it: a
          claim given up at once leaves it running, orphaned, for a worker.)
        - A run of that id in another flow: raises `StoreError` naming it.

        Raises:
            RunOwned: Its lease is live.
            StoreError: The store cannot be read or written.
        """
        ...

    async def claim_next(self, owner: str, flows: Collection[str], queues: Sequence[Queue]) -> Claim | None:
        """Claim one run of one of `flows` that is queued in one of `queues` and not held, or orphaned (in
        any queue or none: what `list_runs()` reports as `ORPHANED`, a run once claimed, stored running,
        whose lease expired or was released; not a run saved running by `save()` alone, whose writer may
        live), oldest first; None if there is none to claim. A queue with a `concurrency` limit gets no
        claim while that many of its runs hold live leases (counted in the claim's transaction, so the
        limit holds across every worker). Atomic like `claim()`.

        Raises:
            StoreError: The store cannot be read or written.
        """
        ...

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease to `lease` seconds from now; returns it with its new `expires_at`.

        Raises:
            LeaseLost: The run is no longer held under this lease.
            StoreError: The store cannot be written.
        """
        ...

    async def write(self, lease: Lease, state: RunState, steps: Sequence[StepRow] = ()) -> None:
        """Replace the run's head with `state` and store `steps` (replacing rows of the same step names),
        in one transaction. Step rows not named stay.

        Raises:
            LeaseLost: The run is no longer held under this lease; nothing is written.
            StoreError: The store cannot be written.
        """
        ...

    async def commit_step(self, lease: Lease, step: StepRow) -> None:
        """Store one step row (replacing the row of that step name), in one transaction.

        Raises:
            LeaseLost: The run is no longer held under this lease; nothing is written.
            StoreError: The store cannot be written.
        """
        ...

    async def progress(self, lease: Lease, step: str, report_json: str) -> None:
        """Store a running step's report (its progress), keeping the step row's checkpoint part if it has one.

        Raises:
            LeaseLost: The run is no longer held under this lease; nothing is written.
            StoreError: The store cannot be written.
        """
        ...

    async def finish(self, lease: Lease, state: RunState, steps: Sequence[StepRow] = ()) -> None:
        """`write()`, then give the run up: no owner, no lease, its interrupt requests dropped (the
        attempt that received them is over), all in one transaction.

        Raises:
            LeaseLost: The run is no longer held under this lease; nothing is written.
            StoreError: The store cannot be written.
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give the run up as it is stored (no owner, no lease): a stored running run can then be claimed
        at once. Nothing happens if the lease was lost already.

        Raises:
            StoreError: The store cannot be written.
        """
        ...

    async def interrupt(
        self, flow: str, run_id: str, reason: str = "interrupted", *, force: bool = False, source: str | None = "api"
    ) -> bool:
        """Ask a run to stop, durably. A run with a live owner gets the request (the owner's next
        `interrupts()` returns it); a queued or orphaned run (stored running, nobody holds it) is marked
        interrupted at once (finished now, the signal added to its report's interrupts, its steps shown
        running marked interrupted there, which the step rows' reports no longer replace; its checkpoint
        unchanged). False when there is nothing to stop: no run of that id, or one that ended
        (completed, interrupted, failed) and nobody holds.

        Raises:
            TypeError: A name or the reason is not a str, `force` not a bool.
            StoreError: The store cannot be written.
        """
        ...

    async def interrupts(self, lease: Lease, after: int = 0) -> list[tuple[int, InterruptSignal]]:
        """The run's pending interrupt requests numbered above `after`, in order, each with its number
        (numbers only grow). Cheap when there are none: an owner calls it every `interrupt_poll` seconds.

        Raises:
            LeaseLost: The run is no longer held under this lease.
            StoreError: The store cannot be read.
        """
        ...

    async def submit(
        self, flow: str, run_id: str, new: RunState, *, queue: str = "default", labels: Mapping[str, str] | None = None
    ) -> bool:
        """Queue a run for a worker: a new one from `new` (status queued, no owner, epoch 0), or a stored
        unfinished one nobody holds (interrupted, failed, orphaned, queued), which keeps its checkpoint
        and gets status queued in `queue`. False for a stored completed run (nothing to do).

        Raises:
            RunOwned: Its lease is live.
            StoreError: A run of that id is stored in another flow, or the store cannot be written.
        """
        ...


CLI_TARGET_LABEL = "stoppoint.target"
"""The label under which the `stoppoint` command keeps the `FILE.py:FLOW` a run was started from (the
file's absolute path), so that `stoppoint resume RUN_ID` needs nothing else."""


@runtime_checkable
class LabelStore(BasicStore, Protocol):
    """A `Store` that also keeps **labels** beside each run: str key/value pairs for the tools that run it.

    The `stoppoint` command keeps the `FILE.py:FLOW` a run was started from under `"stoppoint.target"`
    (`CLI_TARGET_LABEL`); keys that start with `stoppoint.` are stoppoint's own. Labels are not part
    of the run's checkpoint or report: `save()` leaves them as they are, and a run may be labelled
    before its first save. `delete(flow, run_id)` forgets them with the run.

    `MemoryStore` and `SQLiteStore` are label stores. A store with only the `Store` methods is still a
    `Store` (`flow.run(store=...)` needs nothing more); `isinstance(store, LabelStore)` tells the two apart.
    """

    async def set_labels(self, flow: str, run_id: str, labels: Mapping[str, str]) -> None:
        """Merge `labels` into the run's: a key given again gets the new value, the others stay.

        All or nothing: the labels are checked before anything is written, and a bad one leaves the
        run's labels as they were.

        Args:
            flow: The flow's name.
            run_id: The run's id (the run need not be stored yet).
            labels: Keys (non-empty str) and their values (str), both encodable as UTF-8.

        Raises:
            TypeError: `flow` or `run_id` is not a str, `labels` is not a mapping, or a key or a value
                is not a str (the message names the flow, the run and the key).
            ValueError: A key is empty.
            StoreError: The flow name, the run id, a key or a value holds text that UTF-8 cannot encode
                (a lone surrogate, as `os.fsdecode()` makes of bytes that are not UTF-8): no store can
                keep it, as `save()` refuses a checkpoint that holds such text. Or the store cannot be
                written.
        """
        ...

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        """The run's labels, in key order (by code point); `{}` if it has none (or there is no such run).

        Args:
            flow: The flow's name.
            run_id: The run's id.

        Returns:
            A new dict of the run's labels.

        Raises:
            TypeError: `flow` or `run_id` is not a str.
            StoreError: The store cannot be read, or a stored label is not text.
        """
        ...


EVENTS_KEPT = 1000
"""How many events an `EventStore` keeps per run: the last ones (older ones are dropped, and counted)."""


class StoredEvents(list[Event]):
    """A run's stored events, oldest first (a list), and `dropped`: how many older events of the run the
    store no longer keeps (it keeps the last `EVENTS_KEPT`)."""

    __slots__ = ("dropped",)

    def __init__(self, events: Iterable[Event] = (), dropped: int = 0) -> None:
        super().__init__(events)
        self.dropped = dropped

    def __repr__(self) -> str:
        return f"StoredEvents({list(self)!r}, dropped={self.dropped})"


@runtime_checkable
class EventStore(Store, Protocol):
    """A `Store` that also keeps each run's **history**: the events its attempts told (`Event`s, progress
    included), so it survives the process and can be read from anywhere (`stoppoint show RUN_ID --events`).

    The runtime appends a run's events (in batches, in the background, under the attempt's lease) only to a
    store that is an `EventStore`; a `Store` without these methods works as before, without history.

    Each event is one append, never a rewrite. A store keeps the last `EVENTS_KEPT` (1,000) events of each
    run and counts the older ones it dropped (`StoredEvents.dropped`): a long run's end, and its
    latest progress, are what people look at. `delete(flow, run_id)` forgets them with the run; a
    resumed run's attempts append to the same history. `MemoryStore`, `SQLiteStore` and `PostgresStore`
    are event stores.
    """

    async def append_events(self, lease: Lease, events: Sequence[str]) -> None:
        """Append `events` (each an event's JSON, as `RunEvent.model_dump_json()` writes it), in order, to
        the history of the lease's run, dropping (and counting) the oldest beyond `EVENTS_KEPT`.

        Fenced by the claim: they are appended only while the run's last claim is `lease`'s (its epoch),
        held or finished since (the end of a run is told after `finish()` gave the lease up); once
        another claim came, none is.

        Raises:
            LeaseLost: The run was claimed again since (or deleted).
            StoreError: The store cannot be written.
        """
        ...

    async def events(self, flow: str, run_id: str) -> StoredEvents:
        """The run's stored events, oldest first, with the count of older ones dropped (an empty list,
        dropped 0, for a run the store has no events of).

        Raises:
            TypeError: `flow` or `run_id` is not a str.
            StoreError: The store cannot be read, or a stored event is not one this stoppoint reads.
        """
        ...
