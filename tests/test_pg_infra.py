"""The PostgreSQL test infrastructure itself (tests/pg.py, conftest's `pg_server` and `pg_schema`): a throwaway
cluster starts, restarts and leaves nothing behind; a test's schema is dropped with all it holds; the session's
server is found in order, and its absence skips, or fails in CI."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import LiteralString

import psycopg
import pytest
from psycopg import sql

from . import pg
from .pg import PgTarget


def one(dsn: str, query: LiteralString) -> object:
    """The first column of the first row of `query`, on a connection of its own."""
    with psycopg.connect(dsn, connect_timeout=pg.CONNECT_TIMEOUT, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def refused(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(3)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def processes_mentioning(text: str) -> list[str]:
    """The command lines of this machine's processes that contain `text` (Linux's /proc; [] elsewhere)."""
    found: list[str] = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in line:
                found.append(line)
    return found


@contextlib.contextmanager
def cluster_or_skip() -> Iterator[pg.ThrowawayCluster]:
    """A throwaway cluster, or the test skips (fails in CI) saying why there is none."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(pg.throwaway_cluster())
        except pg.NoServer as error:
            pg.unavailable(error)
        yield cluster


def test_throwaway_cluster_restarts_and_leaves_nothing() -> None:
    with cluster_or_skip() as cluster:
        root, port = cluster.root, cluster.port
        assert cluster.dsn == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        assert cluster.datadir.is_dir()
        assert cluster.running
        with psycopg.connect(cluster.dsn, connect_timeout=pg.CONNECT_TIMEOUT, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (7)")

        cluster.restart()
        assert cluster.port == port
        assert one(cluster.dsn, "SELECT n FROM kept") == 7

        cluster.stop()
        assert not cluster.running
        assert refused(port)
        cluster.start()
        assert one(cluster.dsn, "SELECT count(*) FROM kept") == 1

    assert not root.exists()
    assert refused(port)
    assert processes_mentioning(str(root)) == []


def test_throwaway_cluster_is_removed_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="the test's own"), cluster_or_skip() as cluster:  # noqa: PT012
        root, port = cluster.root, cluster.port
        raise RuntimeError("the test's own")
    assert not root.exists()
    assert refused(port)


def test_fresh_schema_is_not_created_and_is_dropped_with_what_it_holds(pg_server: str) -> None:
    with pg.fresh_schema(pg_server) as target:
        assert re.fullmatch(r"stoppoint_test_[0-9a-f]{32}", target.schema)
        assert target.dsn == pg_server
        assert not pg.schema_exists(target)
        with psycopg.connect(target.dsn, connect_timeout=pg.CONNECT_TIMEOUT, autocommit=True) as conn:
            schema = sql.Identifier(target.schema)
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            conn.execute(sql.SQL("CREATE TABLE {}.runs (id text PRIMARY KEY)").format(schema))
            conn.execute(sql.SQL("INSERT INTO {}.runs VALUES ('r1')").format(schema))
        assert pg.schema_exists(target)
    assert not pg.schema_exists(target)


def test_pg_schema_gives_a_fresh_name_on_the_session_server(pg_server: str, pg_schema: PgTarget) -> None:
    assert pg_schema.dsn == pg_server
    assert pg_schema.schema.startswith("stoppoint_test_")
    assert not pg.schema_exists(pg_schema)  # the store creates it; the fixture only drops it
    with pytest.raises(AttributeError):
        pg_schema.schema = "other"  # type: ignore[misc]  # frozen


def test_drop_schema_of_a_schema_never_created_is_quiet(pg_server: str) -> None:
    pg.drop_schema(PgTarget(pg_server, pg.unique_schema()))


def test_without_a_local_server_the_session_gets_a_throwaway_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pg.DSN_ENV, raising=False)
    monkeypatch.setenv(pg.NO_LOCAL_ENV, "1")
    with contextlib.ExitStack() as stack:
        try:
            dsn = pg.find_server(stack)
        except pg.NoServer as error:
            pg.unavailable(error)
        assert dsn.startswith("postgresql://postgres@127.0.0.1:")
        assert not dsn.startswith("postgresql://postgres@127.0.0.1:5432/")
        assert one(dsn, "SELECT current_database()") == "postgres"
        port = int(dsn.rsplit(":", 1)[1].split("/", 1)[0])
    assert refused(port)


def closed_port_dsn() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/x"


def test_a_dsn_given_that_cannot_be_reached_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = closed_port_dsn()
    monkeypatch.setenv(pg.DSN_ENV, dsn)
    monkeypatch.delenv("CI", raising=False)
    with contextlib.ExitStack() as stack, pytest.raises(pg.NoServer, match=re.escape(f"{pg.DSN_ENV}={dsn}")):
        pg.find_server(stack)
    with pytest.raises(pytest.fail.Exception):
        pg.unavailable(pg.NoServer("unreachable"))


def test_with_no_server_at_all_tests_skip_but_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pg.DSN_ENV, raising=False)
    monkeypatch.setenv(pg.NO_LOCAL_ENV, "1")
    monkeypatch.setattr(pg, "find_bindir", lambda: None)
    with contextlib.ExitStack() as stack, pytest.raises(pg.NoServer) as raised:
        pg.find_server(stack)
    assert "not probed" in str(raised.value)
    assert "no initdb and pg_ctl" in str(raised.value)

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=re.escape(f"{pg.DSN_ENV}=postgresql://")):
        pg.unavailable(raised.value)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        pg.unavailable(raised.value)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="in CI a missing server is a failure"):
        pg.unavailable(raised.value)
