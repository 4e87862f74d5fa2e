"""Stores: where runs are persisted so they survive the process (the `Store` and `LabelStore` protocols
and records).

A store keeps, per `(flow, run_id)`, the run's latest checkpoint and report as JSON text, and (a
`LabelStore`) the run's labels, str key/value pairs for the tools that run it. It never
unpickles or evaluates anything: what comes back is validated by pydantic (the flow turns the
checkpoint's outputs back into each step's return type), so a tampered file yields an error, not
code execution.

Two stores come with stoppoint: `MemoryStore` (`_memory.py`: a dict, for tests and runs that need not
outlive the process) and `SQLiteStore` (`_sqlite.py`; `_sqlite_file.py` has its on-disk schema: one SQLite
file, shared safely by several processes). Both keep the same rows, as text (`_rows.py`), so a value
that cannot be serialised fails the same way in both; both are `LabelStore`s.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from ._checkpoint import Checkpoint
from ._outcome import RunReport

__all__ = ["CLI_TARGET_LABEL", "LabelStore", "RunRecord", "RunStatus", "Store", "StoredRun", "run_status"]


class RunStatus(StrEnum):
    """Where a stored run stands."""

    RUNNING = "running"
    """Started and not finished (or its process died): `run()` with its id resumes it."""
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
        updated_at: When it was last saved.
        finished_at: When its latest attempt ended; None while running (or after a crash).
    """

    model_config = ConfigDict(frozen=True)

    flow: str
    run_id: str
    flow_version: str
    status: RunStatus
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


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


@runtime_checkable
class Store(Protocol):
    """Where `Flow.run(store=...)` persists runs. All methods are async, so network stores fit.

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


CLI_TARGET_LABEL = "stoppoint.target"
"""The label under which the `stoppoint` command keeps the `FILE.py:FLOW` a run was started from (the
file's absolute path), so that `stoppoint resume RUN_ID` needs nothing else."""


@runtime_checkable
class LabelStore(Store, Protocol):
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
