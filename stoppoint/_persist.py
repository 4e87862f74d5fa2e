"""Persist: what a run with a store writes, and when; and, with a leased store, keeping its lease.

`Control.save()` (shielded, one at a time) calls one of these; the run's attempt made it:

- `WholeSaves`, for a `BasicStore` (stoppoint 0.1's protocol): the whole checkpoint and report at
  every save.
- `Leased`, for a `Store`: the head at the attempt's start (`write`), one step row per completed
  step (`commit_step`), one per `ctx.save()` (`commit_step` too: the row's checkpoint part holds the
  saved state, in `progress`, until the step's output replaces it), the head and the unfinished
  includes' rows at its end (`finish`, which gives the lease up); every write carries the lease, so
  once another claim came none lands. In the background, while steps run, it renews the lease every
  `lease / 3` s, stops the run when no renewal succeeded for `0.8 x lease` (self-fencing: another
  process may claim it at `lease`), and asks the store for interrupt requests every
  `store.interrupt_poll` s, delivering them as signals.

With an `EventStore`, the run's events (progress included) are kept in memory as they are told and
appended in batches by a background writer every `EVENTS_INTERVAL` s, and once more after the run's end
was told (`flush`): never on a step's path, so a persisted step costs the building of its events, not one
write more. An append is fenced by the attempt's epoch (the run's end is told after `finish()` gave the
lease up, and still belongs to the attempt). Events told after that flush (the end of a run whose caller
cancelled it, told by `FlowRun`) are not stored.
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import anyio

from ._checkpoint import Checkpoint
from ._errors import LeaseLost, StoreError
from ._events import RunEvent
from ._lease import Lease
from ._outcome import StepStatus
from ._store import EVENTS_KEPT, BasicStore, EventStore, RunState, RunStatus, StepRow, Store, run_status

if TYPE_CHECKING:
    from ._control import Control
    from ._executor import Run

__all__ = ["EVENTS_INTERVAL", "PROGRESS_INTERVAL", "Leased", "Persist", "WholeSaves"]

PROGRESS_INTERVAL = 1.0
"""Seconds between two writes of a running step's progress (API.md: at most once a second per step)."""

EVENTS_INTERVAL = 0.5
"""Seconds between two appends of a run's new events to an `EventStore` (in the background)."""


class Persist(ABC):
    """How one attempt writes its run (see the module docstring)."""

    __slots__ = ("control", "top")

    def __init__(self, top: Run) -> None:
        self.top = top  # the attempt's top level
        self.control = top.control

    @abstractmethod
    async def start(self) -> None:
        """The attempt begins: list the run as running, before any step starts."""

    @abstractmethod
    async def step(self, level: Run, name: str) -> None:
        """Step `name` of `level` completed: commit its output before any step that depends on it starts.
        Also called when it saved its progress (`ctx.save()`): commit that before the save returns."""

    @abstractmethod
    async def end(self) -> None:
        """The attempt ended: write how."""

    def background(self, control: Control) -> None:
        """Spawn what keeps the run's claim while its steps run (nothing without a lease)."""
        return

    async def over(self) -> None:
        """The attempt is over, its end written or not (nothing to do without a lease)."""
        return

    async def flush(self) -> None:
        """The run's end was told: store the events not stored yet (nothing to do without an `EventStore`)."""
        return


class WholeSaves(Persist):
    """A `BasicStore`: the whole checkpoint and report at every save."""

    __slots__ = ("store",)

    def __init__(self, top: Run, store: BasicStore) -> None:
        super().__init__(top)
        self.store = store

    async def _save(self) -> None:
        top = self.top
        await self.store.save(top.checkpoint(), top.timeline.report())

    async def start(self) -> None:
        await self._save()

    async def step(self, level: Run, name: str) -> None:
        await self._save()

    async def end(self) -> None:
        await self._save()


class Leased(Persist):
    """A `Store`: fenced writes under the attempt's lease, renewed in the background."""

    __slots__ = ("history", "lease", "renewed", "requeue", "rows_stored", "seen", "store")

    def __init__(self, top: Run, store: Store, lease: Lease, rows_stored: bool) -> None:
        super().__init__(top)
        self.store = store
        self.lease = lease
        self.rows_stored = rows_stored  # resumed from the store: its outputs' rows are there already
        self.control.epoch = lease.epoch
        self.renewed = anyio.current_time()  # when the last successful renewal (or the claim) was sent
        self.seen = 0  # the number of the last interrupt request delivered
        self.requeue = False  # a worker stopping: an interrupted end is stored queued, for another worker
        # The events told and not appended yet (an EventStore's), in order; None: the store keeps none.
        self.history: list[RunEvent] | None = None
        if isinstance(store, EventStore):
            self.history = []
            self.control.observers.add(self.history.append)

    # -- writes ----------------------------------------------------------------------------------------

    def state(self) -> RunState:
        """The run's head now: its checkpoint without outputs (each is in its step's row) and its report."""
        top = self.top
        report = top.timeline.report()
        status = run_status(report)
        if self.requeue and status is RunStatus.INTERRUPTED:
            status = RunStatus.QUEUED
        head = Checkpoint(
            flow=top.name, flow_version=top.plan.version, run_id=top.run_id, inputs=dict(top.inputs), outputs={}
        )
        head._fit = top.fit
        return RunState(
            flow_version=top.plan.version,
            status=status,
            started_at=report.started_at,
            finished_at=report.finished_at,
            checkpoint_json=head.to_json(),
            report_json=report.model_dump_json(),
        )

    def row(self, step: str) -> StepRow | None:
        """Top-level step `step`'s row: its output if it completed, else its include's checkpoint so far,
        else the state it saved (None if it has none of them: an output a save dropped)."""
        top = self.top
        if step in top.outputs:
            part = Checkpoint(
                flow=top.name,
                flow_version=top.plan.version,
                run_id=top.run_id,
                inputs={},
                outputs={step: top.outputs[step]},
            )
        elif step in top.progress:
            part = Checkpoint(
                flow=top.name,
                flow_version=top.plan.version,
                run_id=top.run_id,
                inputs={},
                outputs={},
                progress={step: top.progress[step]},
            )
        else:
            inner = top.includes.get(step)
            nested = inner.checkpoint() if inner is not None else top.partial.get(step)
            if nested is None:
                return None
            part = Checkpoint(
                flow=top.name,
                flow_version=top.plan.version,
                run_id=top.run_id,
                inputs={},
                outputs={},
                nested={step: nested},
            )
        part._fit = top.fit
        text = part.to_json()  # first: a CheckpointError leaves the store as it was
        return StepRow(step, top.timeline.step_report(step).model_dump_json(), text)

    async def start(self) -> None:
        # A checkpoint given to run(resume=...) may hold outputs the store lacks: they go in with the head.
        # One the store gave holds none (rewriting them would cost a resume of a long run one row per step).
        resumed = () if self.rows_stored else (*self.top.timeline.resumed, *self.top.partial, *self.top.progress)
        rows = [row for step in resumed if (row := self.row(step)) is not None]
        await self.store.write(self.lease, self.state(), rows)

    async def step(self, level: Run, name: str) -> None:
        row = self.row(level.path[0] if level.path else name)
        if row is not None:
            await self.store.commit_step(self.lease, row)

    async def end(self) -> None:
        top = self.top
        rows = [row for step in (*top.partial, *top.includes) if (row := self.row(step)) is not None]
        # A step that ran and did not complete may have a row of its progress, reporting it running:
        # its row gets how it ended, as the head's report says (with the state it saved, kept).
        written = {row.step for row in rows}
        for name, record in top.records.items():
            if record.status is not StepStatus.COMPLETED and name not in written:
                row = self.row(name) if name in top.progress else None
                rows.append(row or StepRow(name, top.timeline.step_report(name).model_dump_json()))
        await self.store.finish(self.lease, self.state(), rows)

    async def over(self) -> None:
        """An attempt that a failing write ended (not a lost lease) gives its lease up, best effort: nothing
        runs the run any more, and another attempt must not wait for the lease to expire to claim it."""
        error = self.control.store_error
        if error is None or isinstance(error, LeaseLost) or not self.control.store_down:
            return
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):  # it expires anyway
            await self.store.release(self.lease)

    # -- in the background -------------------------------------------------------------------------------

    def background(self, control: Control) -> None:
        control.spawn(self.renew)
        control.spawn(self.fence)
        control.spawn(self.watch)
        control.spawn(self.report_progress)
        if self.history is not None:
            control.spawn(self.write_events)

    def lost(self, why: str | LeaseLost) -> None:
        """The lease is gone: stop at once, writing nothing more; run() raises LeaseLost."""
        lease = self.lease
        error = why if isinstance(why, LeaseLost) else LeaseLost(lease.flow, lease.run_id, lease.epoch, why)
        self.control.store_failed(error)

    async def renew(self) -> None:
        """Renew every third of the lease; a refusal loses it, a failing store is retried until `fence` gives up."""
        period = self.store.lease / 3
        while True:
            await anyio.sleep(period)
            sent = anyio.current_time()
            try:
                self.lease = await self.store.renew(self.lease)
            except LeaseLost as exc:
                self.lost(exc)
                return
            except StoreError:
                continue  # a store down for a moment: `fence` stops the run if it stays down
            self.renewed = sent

    async def fence(self) -> None:
        """Stop the run once no renewal has succeeded for 0.8 of the lease (another may claim it at 1.0)."""
        limit = 0.8 * self.store.lease
        while True:
            left = self.renewed + limit - anyio.current_time()
            if left <= 0:
                self.lost(f"no renewal succeeded for {limit:g} s (0.8 of the {self.store.lease:g} s lease)")
                return
            await anyio.sleep(left)

    async def watch(self) -> None:
        """Deliver the store's interrupt requests for this run as ordinary signals."""
        store, poll = self.store, self.store.interrupt_poll
        if not (isinstance(poll, int | float) and math.isfinite(poll) and poll > 0):
            poll = 0.05
        while True:
            await anyio.sleep(poll)
            try:
                requests = await store.interrupts(self.lease, self.seen)
            except LeaseLost as exc:
                self.lost(exc)
                return
            except StoreError:
                continue  # the renewal says whether the store is gone
            for number, signal in requests:
                if number > self.seen:
                    self.seen = number
                    self.control.on_signal(signal)

    async def report_progress(self) -> None:
        """Write the progress of the run's running steps (of its top level) at most once a second each,
        so that another process's `load()` shows it; a step's end writes its final report anyway."""
        top, control, store = self.top, self.control, self.store
        written: dict[str, object] = {}  # the progress last written, by step
        while True:
            await anyio.sleep(PROGRESS_INTERVAL)
            for name, record in list(top.records.items()):
                ctx = record.ctx
                if ctx is None or ctx._progress is None or written.get(name) is ctx._progress:
                    continue
                assert control.save_lock is not None
                async with control.save_lock:  # not across a commit: its report is the last word
                    if record.ctx is not ctx or control.store_down:
                        continue
                    written[name] = ctx._progress
                    try:
                        await store.progress(self.lease, name, top.timeline.step_report(name).model_dump_json())
                    except LeaseLost as exc:
                        self.lost(exc)
                        return
                    except StoreError:
                        pass  # progress is for people watching; the renewal says whether the store is gone

    async def write_events(self) -> None:
        """Append the events told since the last append, every `EVENTS_INTERVAL` s."""
        while True:
            await anyio.sleep(EVENTS_INTERVAL)
            await self.append_history()

    async def append_history(self) -> None:
        """Append the events told and not appended yet (shielded: a batch taken is a batch written). A store
        that fails keeps them for the next try; once the lease is lost, none is written any more."""
        history, store = self.history, self.store
        if not history or self.control.store_down:
            return
        batch = history[:]
        del history[: len(batch)]  # (in place: the observers append to this list)
        assert isinstance(store, EventStore)
        with anyio.CancelScope(shield=True):
            try:
                await store.append_events(self.lease, [event.model_dump_json() for event in batch])
            except LeaseLost:
                history.clear()  # not this attempt's run any more: the renewal says so too
            except StoreError:
                history[:0] = batch  # a store down for a moment: the next append tries again
                del history[:-EVENTS_KEPT]  # (a store that never takes them: no more than it would keep)
            except Exception:  # events are for people watching: a failure to store them must not stop the run
                logging.getLogger("stoppoint").exception(
                    "storing the events of run %s of flow %s failed", self.lease.run_id, self.lease.flow
                )

    async def flush(self) -> None:
        if self.history:
            await self.append_history()
