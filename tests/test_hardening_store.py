"""Issue 13: a store fails with `StoreError`, never a bare exception, and never guesses.

`SQLiteStore` against files made bad for real: names and text in the file that are not UTF-8, an index a flipped
byte made disagree with its table, a write-ahead log of another database beside the file, and a lock another
process holds for longer than the busy timeout (through the Python API and through the `stoppoint` command).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import stoppoint as sp
from stoppoint import StoreError
from stoppoint._sqlite import SQLiteStore

from .test_store import completed, names, snapshot

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


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
