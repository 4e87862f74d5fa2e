"""Issue 13: a store fails with `StoreError`, never a bare exception, and never guesses.

`SQLiteStore` against files made bad for real: names and text in the file that are not UTF-8, an index a flipped
byte made disagree with its table, a write-ahead log of another database beside the file, and a lock another
process holds for longer than the busy timeout (through the Python API and through the `stoppoint` command).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from stoppoint import StoreError
from stoppoint._sqlite import SQLiteStore

from .test_store import completed, snapshot

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
