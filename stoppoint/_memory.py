"""MemoryStore: runs in a dict, for tests and for runs that need not outlive the process."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import anyio.lowlevel

from ._checkpoint import Checkpoint
from ._outcome import RunReport
from ._rows import Row, check_names, checked_labels, to_record, to_row, to_stored
from ._store import RunRecord, StoredRun

__all__ = ["MemoryStore"]


class MemoryStore:
    """A store in a dict: for tests, and for runs that need not outlive the process.

    It keeps the same JSON text as `SQLiteStore` (`checkpoint.to_json()`, `report.model_dump_json()`),
    so it behaves like a persistent store: an output that cannot be serialised fails here too, and
    what `load()` returns is validated the same way. One store may be shared by runs in several
    threads and event loops. It is a `LabelStore`: it keeps labels beside the runs.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], Row] = {}  # in the order of the runs' first saves
        self._run_labels: dict[tuple[str, str], dict[str, str]] = {}  # never holds an empty dict
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._runs)} runs>)"

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None:
        """Store the run's checkpoint and report (see `Store.save`).

        Raises:
            CheckpointError: An output cannot be serialised; what was stored for the run is kept.
        """
        await anyio.lowlevel.checkpoint()
        row = to_row(checkpoint, report)
        key = (row.flow, row.run_id)
        with self._lock:
            previous = self._runs.get(key)
            if previous is not None:
                row = row._replace(started_at=previous.started_at)
            self._runs[key] = row  # replacing a key keeps its place: the order stays that of first saves

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        """The stored run, or None (see `Store.load`)."""
        check_names("load", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            row = self._runs.get((flow, run_id))
        return None if row is None else to_stored(row, "MemoryStore")

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]:
        """Records of the stored runs (of `flow` only, if given), oldest first (see `Store.list_runs`)."""
        check_names("list_runs", flow)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            rows = [row for row in self._runs.values() if flow is None or row.flow == flow]
        rows.sort(key=lambda row: row.started_at)  # stable: ties stay in the order of first saves
        return [to_record(row, "MemoryStore") for row in rows]

    async def delete(self, flow: str, run_id: str) -> None:
        """Forget a run; nothing happens if there is none (see `Store.delete`)."""
        check_names("delete", flow, run_id)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            self._runs.pop((flow, run_id), None)
            self._run_labels.pop((flow, run_id), None)

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
