"""The stores: `MemoryStore` and `SQLiteStore` against the `Store` and `LabelStore` contracts, and SQLite's
file handling.

The contract tests run on both stores (the `store` fixture); the rest is SQLite's: reopening, WAL mode, the
worker thread, files it must refuse (and leave untouched), rows that do not validate, files written before
labels, and two processes sharing one file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from stoppoint import Checkpoint, CheckpointError, RunReport, StepReport, StepStatus, StoreError
from stoppoint._memory import MemoryStore
from stoppoint._rows import to_row, to_stored
from stoppoint._sqlite import SQLiteStore
from stoppoint._store import BasicStore, LabelStore, RunRecord, RunStatus, StepRow, Store, StoredRun

from .sqlite_v1 import write_schema_1

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_checkpoint(run_id: str = "r1", flow: str = "f", outputs: dict[str, object] | None = None) -> Checkpoint:
    return Checkpoint(flow=flow, flow_version="1", run_id=run_id, inputs={"n": 3}, outputs=outputs or {})


def make_report(
    run_id: str = "r1",
    flow: str = "f",
    started: float = 0,
    finished: float | None = None,
    steps: dict[str, StepStatus] | None = None,
    **more_steps: StepStatus,
) -> RunReport:
    steps = {**(steps or {}), **more_steps}
    return RunReport(
        run_id=run_id,
        flow=flow,
        started_at=at(started),
        finished_at=None if finished is None else at(finished),
        steps={name: StepReport(name=name, status=status) for name, status in steps.items()},
    )


def completed(run_id: str = "r1", flow: str = "f", started: float = 0) -> tuple[Checkpoint, RunReport]:
    """A completed run of two steps: its checkpoint and report."""
    checkpoint = make_checkpoint(run_id, flow, {"a": 1, "b": {"x": [1, 2]}})
    report = make_report(run_id, flow, started, started + 1, a=StepStatus.COMPLETED, b=StepStatus.COMPLETED)
    return checkpoint, report


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """Replaces the stores' clock: each save takes the next minute after T0; the list holds the times given."""
    given: list[datetime] = []

    def now() -> datetime:
        given.append(at(3600 + 60 * len(given)))
        return given[-1]

    monkeypatch.setattr("stoppoint._rows._now", now)
    return given


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        async with SQLiteStore(tmp_path / "runs.db") as sqlite_store:
            yield sqlite_store


# -- the contract, on both stores -------------------------------------------------------------------


async def test_a_store_is_a_store(store: Store) -> None:
    assert isinstance(store, BasicStore)
    assert isinstance(store, Store)


async def test_a_saved_run_loads_back_as_json(store: Store, clock: list[datetime]) -> None:
    checkpoint, report = completed()
    await store.save(checkpoint, report)
    stored = await store.load("f", "r1")
    assert isinstance(stored, StoredRun)
    assert stored.checkpoint_json == checkpoint.to_json()
    assert RunReport.model_validate_json(stored.report_json) == report
    assert stored.record == RunRecord(
        flow="f",
        run_id="r1",
        flow_version="1",
        status=RunStatus.COMPLETED,
        started_at=at(0),
        updated_at=clock[0],
        finished_at=at(1),
    )


async def test_loading_a_run_never_saved_gives_none(store: Store) -> None:
    assert await store.load("f", "nope") is None
    await store.save(*completed())
    assert await store.load("f", "nope") is None
    assert await store.load("other", "r1") is None


@pytest.mark.parametrize(
    ("finished", "steps", "status"),
    [
        (None, {"a": StepStatus.COMPLETED, "b": StepStatus.RUNNING}, RunStatus.RUNNING),
        (None, {"a": StepStatus.COMPLETED, "b": StepStatus.COMPLETED}, RunStatus.RUNNING),  # not ended yet
        (5, {"a": StepStatus.COMPLETED, "b": StepStatus.INTERRUPTED}, RunStatus.INTERRUPTED),
        (5, {"a": StepStatus.CANCELLED, "b": StepStatus.NOT_STARTED}, RunStatus.INTERRUPTED),
        (5, {"a": StepStatus.FAILED, "b": StepStatus.CANCELLED}, RunStatus.FAILED),
        (5, {"a": StepStatus.COMPLETED, "b": StepStatus.COMPLETED}, RunStatus.COMPLETED),
    ],
)
async def test_the_status_is_the_reports(
    store: Store, finished: float | None, steps: dict[str, StepStatus], status: RunStatus
) -> None:
    await store.save(make_checkpoint(), make_report(finished=finished, steps=steps))
    stored = await store.load("f", "r1")
    assert stored is not None
    assert stored.record.status is status
    assert stored.record.finished_at == (None if finished is None else at(finished))
    [record] = await store.list_runs()
    assert record == stored.record


async def test_started_at_is_the_first_saves_and_updated_at_each_saves(store: Store, clock: list[datetime]) -> None:
    await store.save(make_checkpoint(), make_report(started=0, a=StepStatus.RUNNING))
    await store.save(make_checkpoint(outputs={"a": 1}), make_report(started=0, finished=2, a=StepStatus.INTERRUPTED))
    # A resumed attempt reports its own start; the record keeps the run's first one.
    await store.save(make_checkpoint(outputs={"a": 1}), make_report(started=10, a=StepStatus.COMPLETED))
    stored = await store.load("f", "r1")
    assert stored is not None
    assert len(clock) == 3
    assert stored.record.started_at == at(0)
    assert stored.record.updated_at == clock[2] > clock[1] > clock[0]
    assert stored.record.finished_at is None
    assert stored.record.status is RunStatus.RUNNING
    assert json.loads(stored.checkpoint_json)["outputs"] == {"a": 1}
    assert RunReport.model_validate_json(stored.report_json).started_at == at(10)


async def test_naive_times_are_taken_as_utc(store: Store) -> None:
    report = make_report(finished=1).model_copy(update={"started_at": datetime(2026, 1, 1, 12, 0)})
    await store.save(make_checkpoint(), report)
    [record] = await store.list_runs()
    assert record.started_at == at(0)
    assert record.started_at.utcoffset() == timedelta(0)


async def test_runs_are_listed_oldest_first_and_by_flow(store: Store) -> None:
    await store.save(*completed("late", "f", started=30))
    await store.save(*completed("early", "g", started=10))
    await store.save(*completed("tie-1", "f", started=20))
    await store.save(*completed("tie-2", "g", started=20))
    await store.save(*completed("late", "f", started=0))  # a later save does not move the run
    assert [r.run_id for r in await store.list_runs()] == ["early", "tie-1", "tie-2", "late"]
    assert [r.run_id for r in await store.list_runs("f")] == ["tie-1", "late"]
    assert [r.run_id for r in await store.list_runs(flow="g")] == ["early", "tie-2"]
    assert await store.list_runs("none") == []


async def test_a_deleted_run_is_gone(store: Store) -> None:
    await store.save(*completed("r1"))
    await store.save(*completed("r2", started=1))
    await store.delete("f", "r1")
    assert await store.load("f", "r1") is None
    assert [r.run_id for r in await store.list_runs()] == ["r2"]
    await store.delete("f", "r1")  # nothing to delete: nothing happens
    await store.delete("other", "r2")
    assert [r.run_id for r in await store.list_runs()] == ["r2"]
    await store.save(*completed("r1", started=5))  # saved again: a new run, with the new start
    stored = await store.load("f", "r1")
    assert stored is not None
    assert stored.record.started_at == at(5)


async def test_an_output_that_cannot_be_serialised_keeps_the_stored_run(store: Store) -> None:
    await store.save(make_checkpoint(outputs={"a": 1}), make_report(a=StepStatus.COMPLETED, b=StepStatus.PENDING))
    before = await store.load("f", "r1")
    bad = make_checkpoint(outputs={"a": 1, "b": object()})
    with pytest.raises(CheckpointError, match=r"the output of step 'b' \(object\) cannot be serialised"):
        await store.save(bad, make_report(finished=1, a=StepStatus.COMPLETED, b=StepStatus.COMPLETED))
    assert before is not None
    assert await store.load("f", "r1") == before
    assert await store.list_runs() == [before.record]


async def test_an_output_utf8_cannot_encode_keeps_the_stored_run(store: Store) -> None:
    """A str with a lone surrogate (what os.fsdecode makes of a file name that is not UTF-8) cannot be stored."""
    await store.save(make_checkpoint(outputs={"a": 1}), make_report(a=StepStatus.COMPLETED, b=StepStatus.PENDING))
    before = await store.load("f", "r1")
    bad = make_checkpoint(outputs={"a": 1, "b": "caf\udce9.txt"})
    with pytest.raises(CheckpointError, match=r"the output of step 'b' holds text that is not valid Unicode"):
        await store.save(bad, make_report(finished=1, a=StepStatus.COMPLETED, b=StepStatus.COMPLETED))
    assert await store.load("f", "r1") == before


async def test_names_utf8_cannot_encode_are_names_of_no_run(store: Store) -> None:
    await store.save(*completed())
    assert await store.load("f", "r\udce9") is None
    assert await store.list_runs("f\udce9") == []
    await store.delete("f\udce9", "r1")
    assert len(await store.list_runs()) == 1


async def test_a_report_with_a_lone_surrogate_is_stored_escaped(store: Store) -> None:
    """A failed step's message may name a file os.fsdecode decoded: the run is saved all the same."""
    failed = StepReport(name="a", status=StepStatus.FAILED, error="FileNotFoundError: 'caf\udce9.txt'")
    report = make_report(finished=1).model_copy(update={"steps": {"a": failed}})
    await store.save(make_checkpoint(), report)
    stored = await store.load("f", "r1")
    assert stored is not None
    assert stored.record.status is RunStatus.FAILED
    loaded = RunReport.model_validate_json(stored.report_json)
    assert loaded.steps["a"].error == "FileNotFoundError: 'caf\\udce9.txt'"
    assert loaded.model_copy(update={"steps": {"a": failed}}) == report  # the rest as it was


async def test_save_refuses_what_is_not_a_checkpoint_and_its_report(store: Store) -> None:
    checkpoint, report = completed()
    with pytest.raises(TypeError, match="Checkpoint"):
        await store.save(checkpoint.to_json(), report)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RunReport"):
        await store.save(checkpoint, report.model_dump())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not go with the checkpoint"):
        await store.save(checkpoint, make_report(run_id="r2"))
    assert await store.list_runs() == []


# -- labels, on both stores ------------------------------------------------------------------------


@pytest.fixture
def label_store(store: Store) -> LabelStore:
    assert isinstance(store, LabelStore)
    return store


class OnlyABasicStore:
    """A third-party store of stoppoint 0.1, with the `BasicStore` methods alone."""

    async def save(self, checkpoint: Checkpoint, report: RunReport) -> None: ...

    async def load(self, flow: str, run_id: str) -> StoredRun | None: ...

    async def list_runs(self, flow: str | None = None) -> list[RunRecord]: ...

    async def delete(self, flow: str, run_id: str) -> None: ...


class OnlyAStore(OnlyABasicStore):
    """A third-party store with the `Store` methods alone (stubs: only their presence counts here)."""

    lease = 15.0
    interrupt_poll = 1.0

    async def claim(self, *args: object, **kwargs: object) -> None: ...

    async def claim_next(self, *args: object) -> None: ...

    async def renew(self, *args: object) -> None: ...

    async def write(self, *args: object) -> None: ...

    async def commit_step(self, *args: object) -> None: ...

    async def progress(self, *args: object) -> None: ...

    async def finish(self, *args: object) -> None: ...

    async def release(self, *args: object) -> None: ...

    async def interrupt(self, *args: object, **kwargs: object) -> None: ...

    async def interrupts(self, *args: object) -> None: ...

    async def submit(self, *args: object, **kwargs: object) -> None: ...


async def test_both_stores_keep_labels_and_a_store_need_not(store: Store) -> None:
    assert isinstance(store, LabelStore)
    assert isinstance(OnlyAStore(), Store)
    assert not isinstance(OnlyAStore(), LabelStore)
    assert isinstance(OnlyABasicStore(), BasicStore)  # a store of 0.1 is still taken (whole saves)
    assert not isinstance(OnlyABasicStore(), Store)
    assert not isinstance(OnlyABasicStore(), LabelStore)


async def test_labels_are_merged_and_read_back(label_store: LabelStore) -> None:
    await label_store.save(*completed())
    await label_store.set_labels("f", "r1", {"b": "2", "a": "1"})
    assert await label_store.labels("f", "r1") == {"a": "1", "b": "2"}
    await label_store.set_labels("f", "r1", {"b": "3", "c": ""})  # b is replaced, a stays
    labels = await label_store.labels("f", "r1")
    assert labels == {"a": "1", "b": "3", "c": ""}
    assert list(labels) == ["a", "b", "c"]  # in key order
    labels["a"] = "changed"  # a copy: the store's labels stay
    assert (await label_store.labels("f", "r1"))["a"] == "1"
    await label_store.set_labels("f", "r1", {})
    assert await label_store.labels("f", "r1") == {"a": "1", "b": "3", "c": ""}
    assert await label_store.labels("g", "r1") == {}  # labels are the run's: flow and id
    assert await label_store.labels("f", "r2") == {}


async def test_label_text_round_trips(label_store: LabelStore) -> None:
    labels = {
        "stoppoint.target": "/srv/caf\u00e9/flows.py:deploy",
        "z": "a\x00b\nc",
        "\u00e9t\u00e9 \U0001f600": "x" * 10_000,
    }
    await label_store.set_labels("f", "r1", labels)
    assert await label_store.labels("f", "r1") == labels
    assert list(await label_store.labels("f", "r1")) == sorted(labels)


async def test_a_run_without_labels_has_none(label_store: LabelStore) -> None:
    await label_store.save(*completed())
    assert await label_store.labels("f", "r1") == {}
    assert await label_store.labels("f", "never saved") == {}
    assert await label_store.labels("f", "r\udce9") == {}  # as load(): a name no run can have
    with pytest.raises(TypeError, match=r"labels\(\): run_id must be a str, got int"):
        await label_store.labels("f", 1)  # type: ignore[arg-type]


async def test_labels_set_before_the_first_save_stay_through_the_saves(label_store: LabelStore) -> None:
    await label_store.set_labels("f", "r1", {"target": "flows.py:f"})
    assert await label_store.list_runs() == []  # labels alone are no run
    assert await label_store.load("f", "r1") is None
    await label_store.save(make_checkpoint(), make_report(a=StepStatus.RUNNING))
    await label_store.save(*completed())
    assert await label_store.labels("f", "r1") == {"target": "flows.py:f"}
    stored = await label_store.load("f", "r1")
    assert stored is not None
    assert stored.record.status is RunStatus.COMPLETED


async def test_deleting_a_run_forgets_its_labels(label_store: LabelStore) -> None:
    for run_id in ("r1", "r2"):
        await label_store.save(*completed(run_id))
        await label_store.set_labels("f", run_id, {"k": run_id})
    await label_store.set_labels("f", "unsaved", {"k": "v"})
    await label_store.delete("f", "r1")
    await label_store.delete("f", "unsaved")
    assert await label_store.labels("f", "r1") == {}
    assert await label_store.labels("f", "unsaved") == {}
    assert await label_store.labels("f", "r2") == {"k": "r2"}
    await label_store.save(*completed("r1"))  # saved again: a new run, without the old labels
    assert await label_store.labels("f", "r1") == {}


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ({1: "x"}, TypeError, "a label key must be a str, got int 1"),
        ({"": "x"}, ValueError, "a label key cannot be empty"),
        ({"k": 1}, TypeError, "the value of label 'k' must be a str, got int"),
        ({"k": None}, TypeError, "the value of label 'k' must be a str, got NoneType"),
        ({"k\udce9": "x"}, StoreError, r"label key 'k\\udce9' holds a lone surrogate, which UTF-8 cannot encode"),
        ({"k": "caf\udce9"}, StoreError, r"the value of label 'k' holds a lone surrogate, which UTF-8 cannot encode"),
    ],
)
async def test_bad_labels_are_refused_naming_the_run_and_none_is_written(
    label_store: LabelStore, bad: dict[object, object], error: type[Exception], message: str
) -> None:
    await label_store.set_labels("f", "r1", {"a": "1"})
    labels = {"a": "changed", "new": "x", **bad}  # good labels first: all or nothing
    with pytest.raises(error, match=rf"^set_labels\(\): flow 'f', run 'r1': {message}"):
        await label_store.set_labels("f", "r1", labels)  # type: ignore[arg-type]
    assert await label_store.labels("f", "r1") == {"a": "1"}


async def test_labels_of_bad_names_or_not_a_mapping_are_refused(label_store: LabelStore) -> None:
    with pytest.raises(TypeError, match=r"set_labels\(\): flow must be a str, got int"):
        await label_store.set_labels(1, "r1", {"a": "1"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"set_labels\(\): run_id must be a str, got NoneType"):
        await label_store.set_labels("f", None, {"a": "1"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"flow 'f', run 'r1': labels must be a mapping .*, got list"):
        await label_store.set_labels("f", "r1", [("a", "1")])  # type: ignore[arg-type]
    with pytest.raises(StoreError, match=r"flow 'f', run 'r\\udce9': the run id holds a lone surrogate"):
        await label_store.set_labels("f", "r\udce9", {"a": "1"})
    with pytest.raises(StoreError, match=r"flow 'f\\udce9', run 'r1': the flow name holds a lone surrogate"):
        await label_store.set_labels("f\udce9", "r1", {"a": "1"})
    assert await label_store.labels("f", "r1") == {}


# -- SQLite ------------------------------------------------------------------------------------------


async def test_sqlite_runs_survive_closing_and_reopening(tmp_path: Path, clock: list[datetime]) -> None:
    path = tmp_path / "runs.db"
    checkpoint, report = completed()
    async with SQLiteStore(path) as store:
        await store.save(checkpoint, report)
        await store.save(*completed("r2", "g", started=5))
        records = await store.list_runs()
    store = SQLiteStore(str(path))  # a str works as well as a Path
    try:
        assert await store.list_runs() == records
        stored = await store.load("f", "r1")
        assert stored is not None
        assert stored.checkpoint_json == checkpoint.to_json()
        assert RunReport.model_validate_json(stored.report_json) == report
    finally:
        store.close()


async def test_sqlite_uses_wal_and_writes_its_meta(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.save(*completed())
        assert store._connection is not None
        assert store._connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        with sqlite3.connect(path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert dict(other.execute("SELECT key, value FROM meta")) == {"app": "stoppoint", "schema_version": "2"}
            assert other.execute("SELECT flow, run_id, status FROM runs").fetchall() == [("f", "r1", "completed")]
        other.close()


async def test_sqlite_waits_for_the_disk_in_a_worker_thread(tmp_path: Path) -> None:
    """Another connection holds the write lock: the save waits for it, and the event loop goes on meanwhile."""
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.save(*completed())
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            saved = anyio.Event()

            async def save() -> None:
                await store.save(*completed("r2", started=1))
                saved.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(save)
                await anyio.wait_all_tasks_blocked()  # runs: the save does not hold the event loop
                assert not saved.is_set()  # and it cannot have committed while the lock is held
                blocker.execute("COMMIT")
                with anyio.fail_after(10):
                    await saved.wait()
        finally:
            blocker.close()
        assert [r.run_id for r in await store.list_runs()] == ["r1", "r2"]


async def test_sqlite_path_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"str or os\.PathLike"):
        SQLiteStore(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"str or os\.PathLike"):
        SQLiteStore(b"runs.db")  # type: ignore[arg-type]
    for path in ("", ":memory:"):
        with pytest.raises(ValueError, match="MemoryStore"):
            SQLiteStore(path)
    strange = tmp_path / "a ?#%20 b.db"  # characters a URI would read otherwise
    async with SQLiteStore(strange) as store:
        await store.save(*completed())
        assert store.path == str(strange)
    assert names(tmp_path) == [strange.name]  # the WAL files are gone after close


async def test_sqlite_construction_touches_nothing_and_an_empty_file_is_initialised(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    SQLiteStore(path)
    assert not path.exists()
    path.touch()
    async with SQLiteStore(path) as store:
        await store.save(*completed())
    async with SQLiteStore(path) as store:
        assert len(await store.list_runs()) == 1


async def test_a_closed_sqlite_store_refuses_to_work(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "runs.db")
    await store.save(*completed())
    await store.aclose()
    await store.aclose()  # closing twice does nothing
    store.close()
    with pytest.raises(StoreError, match="is closed"):
        await store.load("f", "r1")
    with pytest.raises(StoreError, match="is closed"):
        async with store:
            pass


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


async def write_random(path: Path) -> None:
    await anyio.Path(path).write_bytes(bytes(range(256)) * 40)


async def write_text(path: Path) -> None:
    await anyio.Path(path).write_text("flow,run_id\nf,r1\n")


async def write_garbage_after_header(path: Path) -> None:
    await anyio.Path(path).write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 40)


async def write_foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE x (a)")
        db.execute("INSERT INTO x VALUES (1)")
    db.close()


async def write_foreign_with_meta(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (name TEXT, val TEXT)")
        db.execute("INSERT INTO meta VALUES ('app', 'stoppoint')")
    db.close()


def write_meta(version: str | int, app: str = "stoppoint") -> Callable[[Path], Awaitable[None]]:
    async def write(path: Path) -> None:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE meta (key, value)")  # no column types: the version may be an integer
            db.executemany("INSERT INTO meta VALUES (?, ?)", [("app", app), ("schema_version", version)])
            db.execute("CREATE TABLE runs (flow TEXT, run_id TEXT)")
        db.close()

    return write


async def write_truncated(path: Path) -> None:
    async with SQLiteStore(path) as store:
        for i in range(30):
            await store.save(*completed(f"r{i}", started=i))
    data = await anyio.Path(path).read_bytes()
    assert len(data) > 8 * 4096
    await anyio.Path(path).write_bytes(data[: len(data) // 2])


BAD_FILES: dict[str, tuple[Callable[[Path], Awaitable[None]], str]] = {
    "random bytes": (write_random, "is not a SQLite database"),
    "text": (write_text, "is not a SQLite database"),
    "SQLite header and garbage": (write_garbage_after_header, "is a damaged SQLite file"),
    "truncated store": (write_truncated, r"is a damaged SQLite file \(truncated or corrupt\)"),
    "foreign database": (write_foreign, r"is a SQLite database that is not a stoppoint store \(it has no meta table"),
    "foreign database with a meta table": (write_foreign_with_meta, r"not a stoppoint store \(its meta table is not"),
    "another app's meta": (write_meta("1", app="other"), r"not a stoppoint store \(its meta table has no app"),
    "newer schema": (write_meta("99"), r"newer schema version \(99\) than this stoppoint reads \(2\); upgrade"),
    "newer schema, as an integer": (write_meta(3), r"newer schema version \(3\)"),
    "unknown schema": (write_meta("one"), "unknown schema version 'one'"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
async def test_sqlite_refuses_a_file_it_cannot_use_and_leaves_it_alone(tmp_path: Path, kind: str) -> None:
    write, message = BAD_FILES[kind]
    path = tmp_path / "runs.db"
    await write(path)
    before = snapshot(path)
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=message) as caught:
        await store.list_runs()
    assert str(path) in str(caught.value)
    with pytest.raises(StoreError, match=message):  # every use says so, a save included
        await store.save(*completed())
    with pytest.raises(StoreError, match=message):
        async with store:
            pass
    assert snapshot(path) == before
    assert names(tmp_path) == ["runs.db"]  # no WAL or journal left behind either


async def test_sqlite_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / "inside").write_text("x")
    with pytest.raises(StoreError, match="is a directory") as caught:
        await SQLiteStore(tmp_path).list_runs()
    assert str(tmp_path) in str(caught.value)
    assert names(tmp_path) == ["inside"]


async def test_sqlite_refuses_a_path_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await SQLiteStore(tmp_path / "missing" / "runs.db").list_runs()
    assert names(tmp_path) == []


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Makes `directory` read-only for the duration; skips the test where that would not stop this process
    (Windows; root, unless it lacks CAP_DAC_OVERRIDE)."""
    if sys.platform == "win32":
        pytest.skip("POSIX permissions")
    os.chmod(directory, 0o555)
    try:
        probe = directory / "probe"
        try:
            probe.touch(exist_ok=False)
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("this process writes into read-only directories (root)")
        yield
    finally:
        os.chmod(directory, 0o755)


async def test_sqlite_refuses_a_read_only_directory(tmp_path: Path) -> None:
    with read_only(tmp_path):
        with pytest.raises(StoreError, match="directory is not writable") as caught:
            await SQLiteStore(tmp_path / "runs.db").list_runs()
        assert str(tmp_path / "runs.db") in str(caught.value)
    assert names(tmp_path) == []


async def test_sqlite_refuses_a_store_in_a_directory_made_read_only(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.save(*completed())
    before = snapshot(path)
    with read_only(tmp_path), pytest.raises(StoreError, match="directory is not writable"):
        await SQLiteStore(path).list_runs()
    assert snapshot(path) == before
    assert names(tmp_path) == ["runs.db"]


async def test_sqlite_refuses_a_read_only_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.save(*completed())
    before = snapshot(path)
    os.chmod(path, 0o444)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("this process writes into read-only files (root)")
        with pytest.raises(StoreError, match="the file is not readable and writable"):
            await SQLiteStore(path).list_runs()
    finally:
        os.chmod(path, 0o644)
    assert snapshot(path) == before


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE runs SET status = 'bogus'", r"stored record of run 'r1' of flow 'f' is invalid(.|\n)*status"),
        ("UPDATE runs SET started_at = 'yesterday'", r"stored record of run 'r1' of flow 'f' is invalid"),
    ],
)
async def test_sqlite_refuses_an_invalid_record(tmp_path: Path, sql: str, message: str) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.save(*completed())
        with sqlite3.connect(path) as other:
            other.execute(sql)
        other.close()
        with pytest.raises(StoreError, match=message):
            await store.list_runs()
        with pytest.raises(StoreError, match=message):
            await store.load("f", "r1")


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE runs SET checkpoint = 'not json'", "the stored checkpoint is invalid"),
        ('UPDATE runs SET checkpoint = \'{"format": "pickle"}\'', "the stored checkpoint is invalid"),
        ("UPDATE runs SET checkpoint = X'00'", "the checkpoint column holds bytes, not JSON text"),
        ("UPDATE runs SET report = '[]'", "the stored report is invalid"),
        (
            "UPDATE runs SET checkpoint = replace(checkpoint, '\"r1\"', '\"r2\"')",
            "the stored checkpoint is that of run 'r2'",
        ),
        (
            "UPDATE runs SET report = replace(report, '\"f\"', '\"g\"')",
            "the stored report is that of run 'r1' of flow 'g'",
        ),
    ],
)
async def test_sqlite_refuses_an_invalid_stored_run(tmp_path: Path, sql: str, message: str) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.save(*completed())
        with sqlite3.connect(path) as other:
            other.execute(sql)
        other.close()
        with pytest.raises(StoreError, match=f"run 'r1' of flow 'f': {message}"):
            await store.load("f", "r1")
        assert [r.run_id for r in await store.list_runs()] == ["r1"]  # the record alone is fine


# -- SQLite: labels and the files written before them ----------------------------------------------


def tables_of(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    return tables


def label_rows(path: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT flow, run_id, key, value FROM labels ORDER BY flow, run_id, key").fetchall()
    db.close()
    return rows


async def write_before_labels(path: Path, *runs: tuple[str, str]) -> None:
    """A store as a stoppoint without labels left it: schema 1, runs, no labels table."""
    write_schema_1(path, [completed(run_id, flow) for flow, run_id in runs], labels_table=False)


OLD_TARGETS = (
    "CREATE TABLE IF NOT EXISTS cli_targets (run_id TEXT PRIMARY KEY, flow TEXT NOT NULL, target TEXT NOT NULL)"
)


async def test_sqlite_labels_survive_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.set_labels("f", "r1", {"a": "1", "b": "2"})
        await store.save(*completed())
        await store.set_labels("f", "r1", {"b": "3"})
    async with SQLiteStore(path) as store:
        assert await store.labels("f", "r1") == {"a": "1", "b": "3"}
    assert label_rows(path) == [("f", "r1", "a", "1"), ("f", "r1", "b", "3")]


async def test_sqlite_a_new_file_has_the_labels_table(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path):
        pass
    assert tables_of(path) == {"meta", "runs", "steps", "interrupts", "labels", "events", "sqlite_sequence"}
    with sqlite3.connect(path) as db:
        columns = [
            (name, kind, notnull, pk) for _, name, kind, notnull, _, pk in db.execute("PRAGMA table_info(labels)")
        ]
        meta = dict(db.execute("SELECT key, value FROM meta"))
    db.close()
    assert columns == [("flow", "TEXT", 1, 1), ("run_id", "TEXT", 1, 2), ("key", "TEXT", 1, 3), ("value", "TEXT", 1, 0)]
    assert meta == {"app": "stoppoint", "schema_version": "2"}


async def test_sqlite_a_file_written_before_labels_gets_the_table(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    await write_before_labels(path, ("f", "r1"))
    assert tables_of(path) == {"meta", "runs"}
    async with SQLiteStore(path) as store:
        assert await store.labels("f", "r1") == {}
        assert tables_of(path) == {"meta", "runs"}  # opening and reading modify nothing
        await store.set_labels("f", "r1", {"a": "1"})  # the first write adds it (and upgrades to schema 2)
        assert {"labels", "steps"} <= tables_of(path)
        assert [r.run_id for r in await store.list_runs()] == ["r1"]
    async with SQLiteStore(path) as store:
        assert await store.labels("f", "r1") == {"a": "1"}
    with sqlite3.connect(path) as db:
        assert dict(db.execute("SELECT key, value FROM meta")) == {"app": "stoppoint", "schema_version": "2"}
    db.close()


async def test_sqlite_the_old_commands_targets_are_moved_into_labels(tmp_path: Path) -> None:
    """The `stoppoint` command used to keep each run's target in a `cli_targets` table of its own."""
    path = tmp_path / "runs.db"
    await write_before_labels(path, ("f", "r1"), ("g", "r2"))
    with sqlite3.connect(path) as db:
        db.execute(OLD_TARGETS)
        db.executemany(
            "INSERT INTO cli_targets VALUES (?, ?, ?)",
            [("r1", "f", "/srv/flows.py:f"), ("r2", "g", "/srv/other.py:g"), ("started", "f", "/srv/flows.py:f")],
        )
        db.execute("INSERT INTO cli_targets VALUES (NULL, 'f', '/srv/flows.py:f')")  # SQLite allows it; never found
    db.close()
    async with SQLiteStore(path) as store:
        for _ in range(2):  # read where they are, then where the first write moved them
            assert await store.labels("f", "r1") == {"stoppoint.target": "/srv/flows.py:f"}
            assert await store.labels("g", "r2") == {"stoppoint.target": "/srv/other.py:g"}
            assert await store.labels("f", "started") == {"stoppoint.target": "/srv/flows.py:f"}  # never saved
            assert await store.labels("g", "r1") == {}
            assert len(await store.list_runs()) == 2
            assert ("cli_targets" in tables_of(path)) is (_ == 0)  # reading moved nothing
            await store.delete("f", "no such run")  # deletes nothing: the upgrade alone
    assert "cli_targets" not in tables_of(path)  # the old table is gone
    assert label_rows(path) == [
        ("f", "r1", "stoppoint.target", "/srv/flows.py:f"),
        ("f", "started", "stoppoint.target", "/srv/flows.py:f"),
        ("g", "r2", "stoppoint.target", "/srv/other.py:g"),
    ]


async def test_sqlite_targets_an_older_command_wrote_after_the_move_are_moved_too(tmp_path: Path) -> None:
    """An older `stoppoint` sharing the file makes its table again: its row is the newer one."""
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.save(*completed())
        await store.set_labels("f", "r1", {"stoppoint.target": "/old.py:f", "other": "kept"})
    with sqlite3.connect(path) as db:
        db.execute(OLD_TARGETS)
        db.execute("INSERT INTO cli_targets VALUES ('r1', 'f', '/new.py:f')")
    db.close()
    async with SQLiteStore(path) as store:
        assert await store.labels("f", "r1") == {"other": "kept", "stoppoint.target": "/new.py:f"}
        assert "cli_targets" in tables_of(path)  # moved by the first write, not by opening or reading
        await store.save(*completed("r2"))
        assert await store.labels("f", "r1") == {"other": "kept", "stoppoint.target": "/new.py:f"}
    assert "cli_targets" not in tables_of(path)


async def test_sqlite_refuses_a_cli_targets_table_the_command_did_not_make_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    await write_before_labels(path, ("f", "r1"))
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE cli_targets (name TEXT, address TEXT)")
        db.execute("INSERT INTO cli_targets VALUES ('r1', 'somewhere')")
    db.close()
    before = snapshot(path)
    with pytest.raises(StoreError, match=r"stoppoint store with a cli_targets table that is not the one") as caught:
        await SQLiteStore(path).list_runs()
    assert str(path) in str(caught.value)
    assert "its columns: name, address" in str(caught.value)
    assert snapshot(path) == before
    assert tables_of(path) == {"meta", "runs", "cli_targets"}


async def test_sqlite_refuses_a_stored_label_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path) as store:
        await store.set_labels("f", "r1", {"k": "v"})
        with sqlite3.connect(path) as other:
            other.execute("UPDATE labels SET value = X'00'")
        other.close()
        with pytest.raises(
            StoreError, match=r"run 'r1' of flow 'f': the value of a stored label \('k'\) holds bytes"
        ) as caught:
            await store.labels("f", "r1")
        assert str(path) in str(caught.value)


CHILD = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime

    import anyio

    from stoppoint import Checkpoint, RunReport, StepReport, StepStatus
    from stoppoint._sqlite import SQLiteStore

    path, name = sys.argv[1], sys.argv[2]
    STEPS = [f"s{k}" for k in range(5)]

    async def run(store: SQLiteStore, i: int) -> None:
        run_id = f"{name}-{i:02d}"
        started = datetime.now(UTC)
        for k in range(5):
            checkpoint = Checkpoint(
                flow="shared", flow_version="1", run_id=run_id, inputs={"i": i},
                outputs={step: [i, j] for j, step in enumerate(STEPS[: k + 1])},
            )
            steps = {
                step: StepReport(name=step, status=StepStatus.COMPLETED if j <= k else StepStatus.PENDING)
                for j, step in enumerate(STEPS)
            }
            report = RunReport(
                run_id=run_id, flow="shared", started_at=started if k == 0 else datetime.now(UTC),
                finished_at=datetime.now(UTC) if k == 4 else None, steps=steps,
            )
            await store.save(checkpoint, report)

    async def main() -> None:
        async with SQLiteStore(path) as store, anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(run, store, i)

    print("ready", flush=True)
    assert sys.stdin.readline() == "go\\n"
    anyio.run(main, backend=name)
    print("done", flush=True)
    """
)


def run_children(path: Path, backends: tuple[str, ...]) -> None:
    """Start one child per backend, let them go together once all are ready, and wait for them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for backend in backends
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            out, err = child.communicate(timeout=30)
            assert child.returncode == 0, err
            assert out == "done\n"
    finally:
        for child in children:
            child.kill()
            child.communicate()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the children run on asyncio and on trio
async def test_two_processes_share_one_file(tmp_path: Path) -> None:
    """Two processes (one on asyncio, one on trio) create the store and save 50 runs x 5 saves each at once."""
    path = tmp_path / "runs.db"
    run_children(path, ("asyncio", "trio"))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()
    async with SQLiteStore(path) as store:
        records = await store.list_runs("shared")
        assert sorted(r.run_id for r in records) == sorted(
            f"{b}-{i:02d}" for b in ("asyncio", "trio") for i in range(50)
        )
        assert {r.status for r in records} == {RunStatus.COMPLETED}
        assert [r.started_at for r in records] == sorted(r.started_at for r in records)
        for record in records:
            stored = await store.load("shared", record.run_id)
            assert stored is not None
            assert len(json.loads(stored.checkpoint_json)["outputs"]) == 5
            assert record.started_at < record.updated_at


# -- step rows that do not merge --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (StepRow("a", "not json"), r"the stored row of step 'a': its report is not JSON"),
        (StepRow("a", "[1]"), r"the stored row of step 'a': its report is not a JSON object"),
        (StepRow("a", "{}", "{broken"), r"the stored row of step 'a': its checkpoint is not JSON"),
        (StepRow("a", "{}", '{"outputs": 3}'), r"the stored row of step 'a': its checkpoint part is not a checkpoint"),
        (StepRow("a", b"\xff"), r"the stored row of step 'a': its report is not JSON"),  # type: ignore[arg-type]
        (StepRow("a", None), r"the stored row of step 'a': its report holds NoneType"),  # type: ignore[arg-type]
    ],
)
def test_a_step_row_that_does_not_merge_is_a_store_error_naming_the_run(row: StepRow, message: str) -> None:
    """`merge_rows` raised a bare ValueError (json's) for a damaged row; `to_stored` says which run and step."""
    checkpoint, report = completed()
    with pytest.raises(StoreError, match=rf"^here: run 'r1' of flow 'f': {message}"):
        to_stored(to_row(checkpoint, report), "here", [(1, row)], 1)
