"""Hooks into a run's writes to its store, on both paths the runtime takes.

A run with a `Store` (`MemoryStore`, and every store of stoppoint in time) writes under its lease: `write`
once at the start of an attempt (the run is listed as running), `commit_step` after every completed step
(before any step that depends on it starts), `finish` once at the end. A run with a `BasicStore` (the
protocol of stoppoint 0.1: `save`, `load`, `list_runs`, `delete` alone) makes a whole `save` at each of
those moments instead. `HookedStore` (a `MemoryStore`) and `BasicOnly` (a `BasicStore` and nothing more)
call `before(write)` and `after(write)` around each of those writes, so a test can hold a write, fail it,
cancel its caller during it, or record what it committed, whichever path the run takes. Subclass either
and override the hooks, or give them as callables.

The runtime never calls `MemoryStore.save()` during a run: overriding `save()` of a `MemoryStore` hooks
into nothing. A running step's `progress()` writes (at most once a second, not a save point) and the
lease's `renew()` and `interrupts()` are not hooked.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

import stoppoint as sp

__all__ = ["BasicOnly", "HookedStore", "LeaseClock", "Write", "committed", "hooked_store"]

Kind = Literal["write", "commit_step", "finish", "save"]
Hook = Callable[["Write"], Awaitable[None]]


@dataclass(frozen=True)
class Write:
    """One write of a run to its store, as the hooks see it.

    Two writes are equal when they write the same thing (`n` aside): a write cut off by a native cancel
    and made again is another write (`n` + 1) equal to the first.

    Attributes:
        n: How many run writes the store began before this one (0: its first).
        kind: `write` (an attempt's start), `commit_step` (a completed step), `finish` (its end), on a `Store`;
            `save` (any of the three) on a `BasicStore`.
        flow: The flow's name.
        run_id: The run's id.
        state: The head written (`write`, `finish`).
        rows: The step rows written (`commit_step`: its one row; `write`, `finish`: those written with the head).
        checkpoint: The whole checkpoint saved (`save`).
        report: The run's report as written (`write`, `finish`, `save`; None for `commit_step`: a step row
            holds its step's report alone).
    """

    n: int = field(compare=False)
    kind: Kind
    flow: str
    run_id: str
    state: sp.RunState | None = None
    rows: tuple[sp.StepRow, ...] = ()
    checkpoint: sp.Checkpoint | None = None
    report: sp.RunReport | None = None

    @property
    def step(self) -> str | None:
        """The step a `commit_step` commits; None for the other kinds."""
        return self.rows[0].step if self.kind == "commit_step" else None

    @property
    def start(self) -> bool:
        """Is it the write that lists an attempt as running, before any step starts? (A whole save
        cannot tell: it says so for the first save of a fresh run, running with no output.)"""
        if self.kind == "save":
            assert self.report is not None
            assert self.checkpoint is not None
            return self.report.finished_at is None and not self.checkpoint.outputs and not self.checkpoint.nested
        return self.kind == "write"

    @property
    def final(self) -> bool:
        """Is it the write of how the attempt ended?"""
        if self.kind == "save":
            assert self.report is not None
            return self.report.finished_at is not None
        return self.kind == "finish"

    @property
    def outputs(self) -> set[str]:
        """The run's own steps whose outputs this write carries (a whole save carries all those completed
        so far; a step row, its own)."""
        if self.checkpoint is not None:
            return set(self.checkpoint.outputs)
        return {row.step for row in self.rows if row.step in _part(row).get("outputs", {})}

    def nested(self, include: str) -> set[str]:
        """The steps of the flow included as step `include` whose outputs this write carries in that
        include's checkpoint (an include that has not completed)."""
        if self.checkpoint is not None:
            inner = self.checkpoint.nested.get(include)
            return set() if inner is None else set(inner.outputs)
        for row in self.rows:
            inner_doc = _part(row).get("nested", {}).get(include)
            if row.step == include and inner_doc is not None:
                return set(inner_doc.get("outputs", {}))
        return set()


def _part(row: sp.StepRow) -> dict[str, Any]:
    if row.checkpoint_json is None:
        return {}
    part = json.loads(row.checkpoint_json)
    assert isinstance(part, dict)
    return part


async def _nothing(write: Write) -> None:
    pass


_STORE_METHODS = frozenset(name for name in dir(sp.MemoryStore) if not name.startswith("_"))


class _Hooks:
    """The hooks, and the count of the writes begun. An attribute named as a store method (`release`,
    `write`, ...) is refused: it would hide the method from the runtime that calls it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _STORE_METHODS:
            raise AttributeError(f"{type(self).__name__}.{name} would hide the store's {name}(): name it otherwise")
        super().__setattr__(name, value)

    def _setup_hooks(self, before: Hook | None, after: Hook | None) -> None:
        self.begun = 0
        self.before_hook = before or _nothing
        self.after_hook = after or _nothing

    def _begin(self, kind: Kind, flow: str, run_id: str, **content: Any) -> Write:
        write = Write(self.begun, kind, flow, run_id, **content)
        self.begun += 1
        return write

    async def before(self, write: Write) -> None:
        """Called before the write reaches the store: raise to fail it (nothing is written)."""
        await self.before_hook(write)

    async def after(self, write: Write) -> None:
        """Called once the store has committed the write, before the write returns to the run."""
        await self.after_hook(write)


class HookedStore(_Hooks, sp.MemoryStore):
    """A `MemoryStore` (a `Store`: a run writes under its lease) whose run writes (`write`, `commit_step`,
    `finish`) call `before(write)` and `after(write)` around the real write."""

    def __init__(self, *, lease: float = 15.0, before: Hook | None = None, after: Hook | None = None) -> None:
        super().__init__(lease=lease)
        self._setup_hooks(before, after)

    async def write(self, lease: sp.Lease, state: sp.RunState, steps: Sequence[sp.StepRow] = ()) -> None:
        rows = tuple(steps)
        write = self._begin("write", lease.flow, lease.run_id, state=state, rows=rows, report=_report(state))
        await self.before(write)
        await super().write(lease, state, rows)
        await self.after(write)

    async def commit_step(self, lease: sp.Lease, step: sp.StepRow) -> None:
        write = self._begin("commit_step", lease.flow, lease.run_id, rows=(step,))
        await self.before(write)
        await super().commit_step(lease, step)
        await self.after(write)

    async def finish(self, lease: sp.Lease, state: sp.RunState, steps: Sequence[sp.StepRow] = ()) -> None:
        rows = tuple(steps)
        write = self._begin("finish", lease.flow, lease.run_id, state=state, rows=rows, report=_report(state))
        await self.before(write)
        await super().finish(lease, state, rows)
        await self.after(write)


def _report(state: sp.RunState) -> sp.RunReport:
    return sp.RunReport.model_validate_json(state.report_json)


class BasicOnly(_Hooks):
    """A third-party store of stoppoint 0.1: `save`, `load`, `list_runs` and `delete` alone, kept in a
    `MemoryStore` (`inner`). A run makes whole saves to it, each one calling `before(write)` and
    `after(write)` (kind `save`) around the real save."""

    def __init__(self, before: Hook | None = None, after: Hook | None = None) -> None:
        self.inner = sp.MemoryStore()
        self._setup_hooks(before, after)

    async def save(self, checkpoint: sp.Checkpoint, report: sp.RunReport) -> None:
        write = self._begin("save", checkpoint.flow, checkpoint.run_id, checkpoint=checkpoint, report=report)
        await self.before(write)
        await self.inner.save(checkpoint, report)
        await self.after(write)

    async def load(self, flow: str, run_id: str) -> sp.StoredRun | None:
        return await self.inner.load(flow, run_id)

    async def list_runs(self, flow: str | None = None) -> list[sp.RunRecord]:
        return await self.inner.list_runs(flow)

    async def delete(self, flow: str, run_id: str) -> None:
        await self.inner.delete(flow, run_id)


def hooked_store(path: str) -> HookedStore | BasicOnly:
    """A hooked store of the path a test is parametrised with: `leased` (a `Store`) or `whole` (a `BasicStore`)."""
    if path == "leased":
        return HookedStore()
    assert path == "whole"
    return BasicOnly()


async def committed(store: sp.BasicStore, flow: str, run_id: str) -> sp.Checkpoint | None:
    """The run's checkpoint as the store holds it now (for a `Store`: its head merged with its step rows),
    its values as JSON gives them (untyped); None if the store holds no such run."""
    stored = await store.load(flow, run_id)
    if stored is None:
        return None
    return sp.Checkpoint.model_validate_json(stored.checkpoint_json)


class LeaseClock:
    """The clock of `MemoryStore`'s leases, moved forward at will: a lease expires (its owner "died")
    without waiting for it. Install it before the run whose lease it moves."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = timedelta(0)
        monkeypatch.setattr("stoppoint._memory.now", self.now)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)
