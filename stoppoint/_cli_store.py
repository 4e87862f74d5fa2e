"""The `stoppoint` command's stores: `--store` (an SQLite file's path, or a PostgreSQL URL: `_cli_postgres`) and
`--schema`, opened to run in or to look into (looking creates nothing), named in messages, and written back into
the commands the CLI prints (without a URL's password); and the usage errors every command shares."""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from ._sqlite import SQLiteStore
from ._store import CLI_TARGET_LABEL, BasicStore, LabelStore, RunRecord

if TYPE_CHECKING:
    from ._postgres import PostgresStore

    OpenStore: TypeAlias = SQLiteStore | PostgresStore

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_STORE",
    "DSN_SCHEMES",
    "UsageError",
    "_check_run_id",
    "_command",
    "_existing_store",
    "_fail",
    "_find",
    "_resume_command",
    "_store",
    "_stored_run",
    "_target_of",
    "add_store_options",
    "is_dsn",
    "lease_of",
    "shown_dsn",
    "store_name",
    "store_place",
    "store_words",
]

DEFAULT_STORE = Path(".stoppoint") / "runs.db"


class UsageError(Exception):
    """A problem with what the command was asked to do (exit code 2)."""


def _fail(message: str) -> NoReturn:
    raise UsageError(message)


def lease_of(args: argparse.Namespace) -> float:
    """`--lease SECONDS` (a command that owns runs takes it), checked."""
    lease = getattr(args, "lease", None)
    if lease is None:
        return DEFAULT_LEASE
    if not (math.isfinite(lease) and lease > 0):
        _fail(f"--lease {lease}: expected a number of seconds > 0")
    return float(lease)


DEFAULT_LEASE = 15.0
DSN_SCHEMES = ("postgresql://", "postgres://")


def is_dsn(store_arg: str | None) -> bool:
    """Whether `--store` names a PostgreSQL database (a URL) rather than an SQLite file (a path)."""
    return store_arg is not None and store_arg.startswith(DSN_SCHEMES)


def shown_dsn(dsn: str) -> str:
    """The URL without its password (in the user part or a `password=` parameter), to print: the commands
    the CLI prints end up in terminals and logs; libpq finds the password in PGPASSWORD or ~/.pgpass."""
    parts = urlsplit(dsn)
    user, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}{at}{hosts}"
    query = "&".join(item for item in parts.query.split("&") if item and not item.startswith("password="))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _sqlite_only(schema: str | None) -> None:
    if schema is not None:
        _fail(f"--schema {schema!r}: only a PostgreSQL store (--store postgresql://...) has schemas")


def _store(path: str | None, lease: float = DEFAULT_LEASE, schema: str | None = None) -> OpenStore:
    """The store to run in (made, with `.stoppoint/`, if it does not exist yet)."""
    if is_dsn(path):
        from ._cli_postgres import postgres_store

        assert path is not None
        return postgres_store(path, lease, schema)
    _sqlite_only(schema)
    store_path = Path(path) if path is not None else DEFAULT_STORE
    if path is None:
        store_path.parent.mkdir(parents=True, exist_ok=True)
    elif not store_path.parent.is_dir():
        _fail(f"--store {path!r}: its directory does not exist")
    return SQLiteStore(store_path, lease=lease)


async def _existing_store(
    path: str | None, run_id: str | None = None, lease: float = DEFAULT_LEASE, schema: str | None = None
) -> OpenStore | None:
    """The store to look into, or None if there is none yet (looking creates nothing: neither a file nor
    a schema)."""
    if is_dsn(path):
        from ._cli_postgres import existing_postgres_store

        assert path is not None
        found: OpenStore | None = await existing_postgres_store(path, lease, schema)
    else:
        _sqlite_only(schema)
        store_path = Path(path) if path is not None else DEFAULT_STORE
        found = SQLiteStore(store_path, lease=lease) if store_path.exists() else None
    if found is None and run_id is not None:
        _fail(f"no run {run_id!r}: there is no store {store_place(path, schema)} yet")
    return found


def store_place(path: str | None, schema: str | None) -> str:
    """Where `--store` and `--schema` point, for messages: `at PATH`, `in schema S of URL`."""
    if is_dsn(path):
        assert path is not None
        return f"in schema {schema or 'stoppoint'!r} of {shown_dsn(path)}"
    return f"at {path if path is not None else DEFAULT_STORE}"


def store_name(store: OpenStore) -> str:
    """The store, for messages: an SQLite file's path, `PostgresStore(host:port/db, 'schema')`."""
    return str(store.path) if isinstance(store, SQLiteStore) else repr(store)


def store_words(store_arg: str | None, schema: str | None) -> list[str]:
    """`--store` (and `--schema`) for a printed command: a file other than the default one by its absolute
    path, so that the command works from any directory; a PostgreSQL URL without its password."""
    if is_dsn(store_arg):
        assert store_arg is not None
        return ["--store", shown_dsn(store_arg), *(["--schema", schema] if schema is not None else [])]
    if store_arg is None or (store := Path(store_arg).resolve()) == DEFAULT_STORE.resolve():
        return []
    return ["--store", str(store)]


def _check_run_id(run_id: str) -> str:
    if not run_id:
        _fail("--run-id: a run id cannot be empty")
    try:
        run_id.encode("utf-8")
    except UnicodeEncodeError:
        _fail(f"run id {run_id!r}: not valid UTF-8 text")
    return run_id


def _resume_command(run_id: str, store_arg: str | None, schema: str | None = None) -> str:
    """The command to resume `run_id`, quoted for a shell (see `_command`)."""
    return _command("resume", run_id, store_arg, schema)


def _command(verb: str, run_id: str, store_arg: str | None, schema: str | None = None) -> str:
    """`stoppoint VERB RUN_ID`, quoted for a shell, with the store's options (`store_words`)."""
    return shlex.join(["stoppoint", verb, run_id, *store_words(store_arg, schema)])


async def _target_of(store: LabelStore, record: RunRecord) -> str | None:
    """The `FILE.py:FLOW` the run was started from (the run's `stoppoint.target` label, which `run`
    sets); None for a run stored from Python."""
    return (await store.labels(record.flow, record.run_id)).get(CLI_TARGET_LABEL)


async def _find(store: BasicStore, run_id: str) -> RunRecord | None:
    """The stored record of `run_id`, whatever its flow."""
    for record in await store.list_runs():
        if record.run_id == run_id:
            return record
    return None


@contextlib.asynccontextmanager
async def _stored_run(
    store_arg: str | None, run_id: str, lease: float = 15.0, schema: str | None = None
) -> AsyncIterator[tuple[OpenStore, RunRecord]]:
    """The store `--store` names (it must exist) and the record of `run_id` in it (it must be there)."""
    existing = await _existing_store(store_arg, run_id, lease, schema)
    assert existing is not None
    async with existing as store:
        record = await _find(store, run_id)
        if record is None:
            _fail(f"no run {run_id!r} in {store_name(store)} (`stoppoint runs` lists them)")
        yield store, record


def add_store_options(parser: argparse.ArgumentParser, store_help: str) -> None:
    """`--store` and `--schema`, for every command that opens a store."""
    parser.add_argument("--store", metavar="STORE", help=store_help)
    parser.add_argument(
        "--schema",
        metavar="NAME",
        help="with a PostgreSQL store: the schema of its tables, created on first use (default: stoppoint)",
    )
