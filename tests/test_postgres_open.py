"""Opening a PostgresStore on a server that cannot be used: it fails at once, saying why."""

from __future__ import annotations

import socket

import anyio
import pytest

from stoppoint import StoreError
from tests.pg import PgTarget

pytestmark = pytest.mark.anyio


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_server_that_is_not_there_fails_on_open_at_once_with_libpqs_reason() -> None:
    from stoppoint._postgres import PostgresStore

    dsn = f"postgresql://postgres@127.0.0.1:{closed_port()}/test"
    with anyio.fail_after(5):  # the pool alone waited 15 s, then said "pool initialization incomplete"
        with pytest.raises(StoreError, match="Connection refused") as raised:
            async with PostgresStore(dsn):
                pass
    assert "PostgresStore(127.0.0.1:" in str(raised.value)


async def test_a_database_that_does_not_exist_fails_on_open_saying_so(pg_schema: PgTarget) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from stoppoint._postgres import PostgresStore

    params = conninfo_to_dict(pg_schema.dsn)
    dsn = make_conninfo(**{**params, "dbname": "stoppoint_no_such_database"})
    with anyio.fail_after(5):
        with pytest.raises(StoreError, match='database "stoppoint_no_such_database" does not exist'):
            async with PostgresStore(dsn, schema=pg_schema.schema):
                pass
