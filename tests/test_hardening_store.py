"""Issue 13: a store fails with `StoreError`, never a bare exception, and never guesses.

`SQLiteStore` against files made bad for real: names and text in the file that are not UTF-8, an index a flipped
byte made disagree with its table, a write-ahead log of another database beside the file, and a lock another
process holds for longer than the busy timeout (through the Python API and through the `stoppoint` command).
"""

from __future__ import annotations

import os
import re
import select
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import anyio
import pytest

import stoppoint as sp
from stoppoint import StepStatus, StoreError
from stoppoint._sqlite import SQLiteStore

from .test_store import completed, make_checkpoint, make_report, names, snapshot

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
FLOWS = str(ROOT / "tests" / "cli_flows.py")


async def new_store(path: Path, *run_ids: str) -> None:
    """A store at `path` holding completed runs of flow 'f' (closed again, so the file holds it all)."""
    async with SQLiteStore(path) as store:
        for i, run_id in enumerate(run_ids):
            await store.save(*completed(run_id, started=i))


def raw_sql(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Run `statements` on the file with `PRAGMA writable_schema` on: text bound as bytes and cast to TEXT keeps
    its bytes as they are, so a name or a value can be made of bytes that are not UTF-8."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA writable_schema = ON")
        for sql, parameters in statements:
            db.execute(sql, parameters)
    finally:
        db.close()


# -- 1. text that is not UTF-8 ----------------------------------------------------------------------------

RENAME = (
    "UPDATE sqlite_master SET name = CAST(? AS TEXT), tbl_name = CAST(? AS TEXT), sql = CAST(? AS TEXT) WHERE name = ?"
)
NOT_UTF8: dict[str, list[tuple[str, tuple[object, ...]]]] = {
    # Python's sqlite3 turns a column it cannot decode into an OperationalError without sqlite_errorcode.
    "a table name": [
        ("CREATE TABLE extra (a)", ()),
        (RENAME, (b"extra\xff", b"extra\xff", b'CREATE TABLE "extra\xff" (a)', "extra")),
    ],
    # SQLite's message names the object; Python's sqlite3 cannot decode the message: a bare UnicodeDecodeError.
    "an index name": [
        ("CREATE INDEX extra ON runs (flow)", ()),
        ("UPDATE sqlite_master SET name = CAST(? AS TEXT) WHERE name = 'extra'", (b"extra\xff",)),
    ],
    "a schema statement": [
        ("CREATE TABLE extra (a)", ()),
        (RENAME, (b"extra\xff", b"extra", b'CREATE TABLE "extra\xff" (a b c d', "extra")),
    ],
    "the schema version": [("UPDATE meta SET value = CAST(? AS TEXT) WHERE key = 'schema_version'", (b"1\xff",))],
    "the app in meta": [("UPDATE meta SET value = CAST(? AS TEXT) WHERE key = 'app'", (b"stoppoint\xff",))],
    "a column of the old targets table": [
        ("CREATE TABLE cli_targets (run_id TEXT PRIMARY KEY, flow TEXT NOT NULL, target TEXT NOT NULL)", ()),
        (
            "UPDATE sqlite_master SET sql = CAST(? AS TEXT) WHERE name = 'cli_targets'",
            (b'CREATE TABLE cli_targets (run_id TEXT PRIMARY KEY, flow TEXT NOT NULL, "target\xff" TEXT NOT NULL)',),
        ),
    ],
}


@pytest.mark.parametrize("where", list(NOT_UTF8))
async def test_text_that_is_not_utf8_in_the_file_is_a_store_error_naming_it(tmp_path: Path, where: str) -> None:
    path = tmp_path / "runs.db"
    await new_store(path, "r1")
    raw_sql(path, *NOT_UTF8[where])
    before = snapshot(path)
    store = SQLiteStore(path)
    for use in (store.list_runs, lambda: store.save(*completed("r2")), store.__aenter__):
        with pytest.raises(StoreError, match="not UTF-8") as caught:
            await use()
        assert repr(str(path)) in str(caught.value)
    assert snapshot(path) == before  # refused, and left alone


async def test_a_schema_made_not_utf8_while_the_store_is_open_is_a_store_error(tmp_path: Path) -> None:
    """Another connection breaks the schema after this store checked it: SQLite reads the schema again at the
    next statement, and its message about the bad name is not UTF-8."""
    path = tmp_path / "runs.db"
    await new_store(path, "r1")
    async with SQLiteStore(path) as store:
        assert [record.run_id for record in await store.list_runs()] == ["r1"]
        raw_sql(
            path,
            ("CREATE TABLE extra (a)", ()),
            (RENAME, (b"extra\xff", b"extra", b'CREATE TABLE "extra\xff" (a b c d', "extra")),
            ("PRAGMA schema_version = 100", ()),  # tell the other connections the schema changed
        )
        with pytest.raises(StoreError, match="not UTF-8") as caught:
            await store.list_runs()
        assert repr(str(path)) in str(caught.value)
        with pytest.raises(StoreError, match="not UTF-8"):
            await store.save(*completed("r2"))


# -- 2. an index that no longer matches its table ------------------------------------------------------------


def counting_flow(calls: list[str]) -> sp.Flow:
    flow = sp.Flow("nightly")

    @flow.step
    async def fetch() -> int:
        calls.append("fetch")
        return 20

    @flow.step
    async def total(fetch: int) -> int:
        calls.append("total")
        return fetch + 1

    return flow


def flip_a_key_byte(path: Path, index: str, key: bytes) -> None:
    """Flip one bit of `key` where `index`'s root page (a leaf, in a store this small) holds it: the page stays a
    well-formed b-tree page, so only a check of the index against its table can tell."""
    db = sqlite3.connect(path)
    try:
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    finally:
        db.close()
    data = bytearray(path.read_bytes())
    page = bytes(data[(root - 1) * page_size : root * page_size])
    assert page[0] == 0x0A  # a leaf page of an index b-tree
    assert page.count(key) == 1
    data[(root - 1) * page_size + page.index(key) + 1] ^= 0x01  # "nightly-1" becomes "nhghtly-1"
    path.write_bytes(bytes(data))


def pragma(path: Path, name: str) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [line for (line,) in db.execute(f"PRAGMA {name}")]
    finally:
        db.close()


async def test_an_index_that_disagrees_with_its_table_is_refused_and_nothing_runs_again(tmp_path: Path) -> None:
    """A flipped byte in the primary key's index would hide the completed run from load(): run() would run every
    step again and insert a second row for the same (flow, run_id)."""
    path = tmp_path / "runs.db"
    calls: list[str] = []
    flow = counting_flow(calls)
    async with SQLiteStore(path) as store:
        outcome = await flow.run(store=store, run_id="nightly-1")
    assert isinstance(outcome, sp.Completed)
    assert calls == ["fetch", "total"]
    assert names(tmp_path) == ["runs.db"]  # the last close checkpointed the log into the file

    flip_a_key_byte(path, "sqlite_autoindex_runs_1", b"nightly-1")
    assert pragma(path, "quick_check") == ["ok"]  # the damage quick_check cannot see
    assert pragma(path, "integrity_check") != ["ok"]
    before = snapshot(path)

    with pytest.raises(StoreError, match=r"is a damaged SQLite file \(truncated or corrupt\)") as caught:
        await flow.run(store=SQLiteStore(path), run_id="nightly-1")
    assert repr(str(path)) in str(caught.value)
    assert "sqlite_autoindex_runs_1" in str(caught.value)  # SQLite's finding, as it said it
    with pytest.raises(StoreError, match="is a damaged SQLite file"):
        async with SQLiteStore(path):
            pass
    assert calls == ["fetch", "total"]  # nothing ran again
    assert snapshot(path) == before  # nothing was written
    assert names(tmp_path) == ["runs.db"]


# -- 4. a lock held for longer than the busy timeout ---------------------------------------------------------

HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
for statement in sys.argv[2:]:
    db.execute(statement)
print("held", flush=True)
sys.stdin.readline()  # until the test lets go (or dies: end of file)
db.execute("ROLLBACK")
db.close()
"""
WRITE_LOCK = ("BEGIN EXCLUSIVE",)  # in WAL mode: the write lock; readers go on
EVERY_LOCK = ("PRAGMA locking_mode = EXCLUSIVE", "BEGIN EXCLUSIVE", "SELECT count(*) FROM meta")  # readers wait too
BUSY_TIMEOUT_S = 0.2


def wait_for_line(stream: IO[str], seconds: float = 30) -> str:
    """The next line of a child's output, or a failure after `seconds` (a child that hangs fails the test)."""
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, f"no line within {seconds} s"
    return stream.readline()


@contextmanager
def lock_held(path: Path, statements: tuple[str, ...]) -> Iterator[subprocess.Popen[str]]:
    """Another process, holding the lock `statements` take on `path` until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), *statements],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert wait_for_line(holder.stdout) == "held\n", holder.stderr.read() if holder.stderr else ""
        yield holder
    finally:
        try:
            _, err = holder.communicate("go\n", timeout=30)
        finally:
            holder.kill()  # a no-op once it has exited
        assert holder.returncode == 0, err


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stoppoint._sqlite_file._BUSY_TIMEOUT_S", BUSY_TIMEOUT_S)


def busy_message(path: Path, holder: subprocess.Popen[str]) -> str:
    """What the StoreError says: the store is busy, its path, the holder's process (where the system tells: Linux)
    and the timeout."""
    who = rf"process {holder.pid} \(.*-c.*\)" if sys.platform.startswith("linux") else "another connection"
    return (
        rf"SQLite store {re.escape(repr(str(path)))} is busy: {who} has held a lock on it "
        rf"for longer than the busy timeout \({BUSY_TIMEOUT_S:g} s\)"
    )


@pytest.mark.usefixtures("short_busy_timeout")
async def test_a_write_lock_held_too_long_fails_a_run_as_busy_before_any_step(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    await new_store(path)
    calls: list[str] = []
    with lock_held(path, WRITE_LOCK) as holder:
        store = SQLiteStore(path)
        assert await store.list_runs() == []  # in WAL mode a reader does not wait for the writer
        with pytest.raises(StoreError, match=busy_message(path, holder)):
            await counting_flow(calls).run(store=store, run_id="nightly-1")  # its first save waits
        with pytest.raises(StoreError, match=busy_message(path, holder)):
            await store.set_labels("nightly", "nightly-1", {"owner": "ops"})
        await store.aclose()
    assert calls == []  # no step started
    async with SQLiteStore(path) as store:
        assert await store.list_runs() == []
        assert await store.labels("nightly", "nightly-1") == {}


@pytest.mark.usefixtures("short_busy_timeout")
async def test_a_lock_that_keeps_readers_out_fails_opening_as_busy(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    await new_store(path, "r1")
    with lock_held(path, EVERY_LOCK) as holder, pytest.raises(StoreError, match=busy_message(path, holder)):
        await SQLiteStore(path).list_runs()
    async with SQLiteStore(path) as store:
        assert [record.run_id for record in await store.list_runs()] == ["r1"]


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m stoppoint ARGS`, with the busy timeout made short (the module global, set before main runs)."""
    run_command = (
        f"import runpy, stoppoint._sqlite_file; stoppoint._sqlite_file._BUSY_TIMEOUT_S = {BUSY_TIMEOUT_S}; "
        "runpy.run_module('stoppoint', run_name='__main__', alter_sys=True)"
    )
    return subprocess.run(
        [sys.executable, "-c", run_command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def assert_busy_exit(done: subprocess.CompletedProcess[str], path: Path, holder: subprocess.Popen[str]) -> None:
    assert done.returncode == 2, done.stderr  # an unusable store is exit code 2; 1 is "a step failed"
    assert "Traceback" not in done.stderr
    assert re.search(rf"^stoppoint: error: StoreError: {busy_message(path, holder)}", done.stderr), done.stderr


def test_the_command_says_the_store_is_busy_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    anyio.run(new_store, path, "r1")
    with lock_held(path, EVERY_LOCK) as holder:
        assert_busy_exit(command("runs", "--store", str(path), cwd=tmp_path), path, holder)


def test_the_command_says_the_store_is_busy_when_a_run_meets_the_lock_as_it_claims(tmp_path: Path) -> None:
    """`resume` finds the run (reading), then its claim, the first write, before the run begins, meets the
    lock. (Before leases, the first write was the run's first save, inside its task group.)"""
    path = tmp_path / "runs.db"
    failed = command("run", f"{FLOWS}:failing", "--run-id", "r1", "--store", str(path), cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    with lock_held(path, WRITE_LOCK) as holder:
        resumed = command("resume", "r1", "--store", str(path), cwd=tmp_path)
    assert_busy_exit(resumed, path, holder)
    assert "resumed:" not in resumed.stdout  # met at the claim: the run never began


# -- 3. a write-ahead log that is another database's --------------------------------------------------------


def store_id(path: Path) -> int:
    """The store id in the file's own header (`PRAGMA user_version`, bytes 60-63), read without SQLite."""
    return int.from_bytes(path.read_bytes()[60:64], "big", signed=True)


def log_pages(log: Path) -> set[int]:
    """The page numbers of the frames in a write-ahead log (a 32-byte header, then 24-byte frame headers, each
    followed by a page)."""
    data = log.read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    return {
        int.from_bytes(data[offset : offset + 4], "big")
        for offset in range(32, len(data) - 24 - page_size + 1, 24 + page_size)
    }


async def leave_the_log_of_another_store(path: Path, *, big: bool) -> None:
    """Put beside `path` the write-ahead log of another store, copied while that store was open (as a process
    killed mid-run leaves it). `big` outputs make the other store grow, so that its log holds page 1."""
    other = path.with_name("other.db")
    async with SQLiteStore(other) as store:
        outputs = {"a": "x" * 20_000} if big else {"a": 1}
        await store.save(make_checkpoint("b1", outputs=outputs), make_report("b1", a=StepStatus.COMPLETED))
        (path.parent / f"{path.name}-wal").write_bytes((other.parent / "other.db-wal").read_bytes())


async def test_a_log_of_another_store_is_refused_and_not_merged_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    log = tmp_path / "runs.db-wal"
    await new_store(path, "a1", "a2")
    assert store_id(path) != 0
    await leave_the_log_of_another_store(path, big=True)
    assert 1 in log_pages(log)  # the other store's page 1, with its store id, is in the log
    before = snapshot(path), log.read_bytes()

    for _ in range(2):  # refused, and refused again: the first refusal did not merge the log into the file
        with pytest.raises(StoreError, match=r"has beside it a write-ahead log that is not its own") as caught:
            await SQLiteStore(path).list_runs()
        assert repr(str(path)) in str(caught.value)
        assert repr(str(log)) in str(caught.value)
        with pytest.raises(StoreError, match="is not its own"):
            await SQLiteStore(path).save(*completed("a3"))
        assert (snapshot(path), log.read_bytes()) == before
    # (SQLite may have made runs.db-shm, the log's index, reading the log: it holds nothing of the file's.)

    log.unlink()  # move the log away (the index SQLite may have left is rebuilt), and the file is the store it was
    async with SQLiteStore(path) as store:
        assert [record.run_id for record in await store.list_runs()] == ["a1", "a2"]


async def test_a_store_opens_with_its_own_log_beside_it(tmp_path: Path) -> None:
    """Another process (here: another store object) has the file open, so its log is there, holding page 1."""
    path = tmp_path / "runs.db"
    await new_store(path, "a1")
    async with SQLiteStore(path) as first:
        await first.save(make_checkpoint("a2", outputs={"a": "x" * 20_000}), make_report("a2", a=StepStatus.COMPLETED))
        assert 1 in log_pages(tmp_path / "runs.db-wal")
        async with SQLiteStore(path) as second:
            assert [record.run_id for record in await second.list_runs()] == ["a1", "a2"]


async def test_a_file_written_before_store_ids_gets_one_at_its_first_write(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    await new_store(path, "a1")
    raw_sql(path, ("PRAGMA user_version = 0", ()))  # as a stoppoint without store ids left it
    assert store_id(path) == 0
    async with SQLiteStore(path) as store:
        assert [record.run_id for record in await store.list_runs()] == ["a1"]
    assert store_id(path) == 0  # reading modifies nothing
    async with SQLiteStore(path) as store:
        await store.save(*completed("a2"))
        given = store_id(path)  # in the file itself, not only in its log
        assert given != 0
    async with SQLiteStore(path) as store:
        await store.save(*completed("a3"))
    assert store_id(path) == given  # given once
    assert pragma(path, "user_version") == [given]


async def test_a_log_of_another_store_that_never_wrote_page_1_cannot_be_told_apart(tmp_path: Path) -> None:
    """The limit of the check (see the schema in stoppoint/_sqlite_file.py): the store id is in page 1, and a log only
    holds the pages its transactions changed. A store that never grew (or freed a page) since its log began has
    no page 1 in its log, and such a log replayed over another file cannot be told from the file's own: this test
    shows it happening. If it fails, the check has become stronger: update the docstring."""
    path = tmp_path / "runs.db"
    await new_store(path, "a1", "a2")
    await leave_the_log_of_another_store(path, big=False)
    assert 1 not in log_pages(tmp_path / "runs.db-wal")
    async with SQLiteStore(path) as store:
        assert [record.run_id for record in await store.list_runs()] == ["b1"]  # the other store's runs
