"""`stoppoint run --run-id ID` claims its id: of several commands started at once with one id, exactly one runs.

Looking the id up and then running leaves a gap in which another command can do the same, and both run the
steps. So the run's first save, which comes before any step starts, is the claim: `SQLiteStore._claim` makes
it, with the command's labels, only if no run of that id is stored, in one IMMEDIATE transaction. The other
commands' runs fail at that save, before any step, with `RunIdTaken`. (Stores get leases in issue 14.)
"""

from __future__ import annotations

from collections.abc import Mapping

from ._checkpoint import Checkpoint
from ._errors import StoreError
from ._outcome import RunReport
from ._sqlite import SQLiteStore
from ._store import RunRecord, StoredRun

__all__ = ["NewRun", "RunIdTaken"]


class RunIdTaken(StoreError):
    """Another command claimed the run id first."""


class NewRun:
    """The store as `stoppoint run` hands it to its run, which is new: it loads no stored run (one stored
    meanwhile is another command's, not this run's to resume), and its first save claims the run id."""

    def __init__(self, store: SQLiteStore, labels: Mapping[str, str]) -> None:
        self._store = store
        self._labels = dict(labels)
        self._claimed = False

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        if self._claimed:
            await self._store.save(checkpoint, report)
        elif await self._store._claim(checkpoint, report, self._labels):
            self._claimed = True
        else:
            raise RunIdTaken(
                f"run {checkpoint.run_id!r} is already in the store: another command started it meanwhile, "
                "and may be running it now"
            )

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        return None

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        return await self._store.list_runs(flow)

    async def delete(self, flow: str, run_id: str) -> None:
        await self._store.delete(flow, run_id)
