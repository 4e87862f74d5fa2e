"""The `stoppoint` commands on a PostgreSQL store: `--store postgresql://...` (or `postgres://...`) and `--schema`.

Imported only when a command names such a store, so that the command needs psycopg (the `postgres` extra) only
then; without it the command says so in one line. A server that cannot be reached fails the command with the
server's (libpq's) reason, as a `StoreError`: exit code 2, no traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio.to_thread

from ._cli_store import _fail, shown_dsn
from ._errors import StoreError

if TYPE_CHECKING:
    from ._postgres import PostgresStore

__all__ = ["existing_postgres_store", "postgres_store"]

CONNECT_TIMEOUT = 10  # seconds: as the store's own connections


def postgres_store(dsn: str, lease: float, schema: str | None) -> PostgresStore:
    """A `PostgresStore` on `dsn`, in `schema` (default: `stoppoint`); not opened yet."""
    try:
        from ._postgres import PostgresStore
    except ImportError as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        _fail(f"--store {shown_dsn(dsn)}: {exc}{cause}")
    try:
        if schema is None:
            return PostgresStore(dsn, lease=lease)
        return PostgresStore(dsn, lease=lease, schema=schema)
    except (TypeError, ValueError) as exc:
        _fail(f"--store {shown_dsn(dsn)}: {exc}")


async def existing_postgres_store(dsn: str, lease: float, schema: str | None) -> PostgresStore | None:
    """The store on `dsn` in `schema` if that schema exists, else None: looking creates no schema (a
    mistyped `--schema` makes none)."""
    store = postgres_store(dsn, lease, schema)
    try:
        found = await anyio.to_thread.run_sync(_schema_exists, dsn, store.schema, repr(store))
    except BaseException:
        store.close()
        raise
    if not found:
        store.close()
        return None
    return store


def _schema_exists(dsn: str, schema: str, where: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT, application_name="stoppoint") as connection:
            row = connection.execute(
                "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)", (schema,)
            ).fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"{where}: {exc}") from exc
    return bool(row and row[0])
