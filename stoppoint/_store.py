"""Stores: where runs are persisted so they survive the process (the `Store` protocol and records).

A store keeps, per `(flow, run_id)`, the run's latest checkpoint and report as JSON text. It never
unpickles or evaluates anything: what comes back is validated by pydantic (the flow turns the
checkpoint's outputs back into each step's return type), so a tampered file yields an error, not
code execution.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from ._checkpoint import Checkpoint
    from ._outcome import RunReport

__all__ = ["RunRecord", "RunStatus", "Store", "StoredRun", "run_status"]


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
    """

    model_config = ConfigDict(frozen=True)

    record: RunRecord
    checkpoint_json: str
    report_json: str


@runtime_checkable
class Store(Protocol):
    """Where `Flow.run(store=...)` persists runs. All methods are async, so network stores fit.

    `run()` calls `save()` after every completed step, before any step that depends on it starts,
    and once more when the run ends; a store must have committed the checkpoint when `save()`
    returns. Calls for one run never overlap.
    """

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store `checkpoint` (as `checkpoint.to_json()`) and `report` for `(checkpoint.flow, checkpoint.run_id)`,
        replacing what was stored for that run.

        Raises:
            StoreError: The store cannot be written.
            CheckpointError: An output cannot be serialised (from `checkpoint.to_json()`).
        """
        ...

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None if there is none.

        Raises:
            StoreError: The store cannot be read.
        """
        ...

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first.

        Raises:
            StoreError: The store cannot be read.
        """
        ...

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run; nothing happens if there is none.

        Raises:
            StoreError: The store cannot be written.
        """
        ...
