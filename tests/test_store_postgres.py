"""What `PostgresStore` does beyond the `Store` protocol (the conformance suite checks that): its schema, bad
input, a server it cannot reach, a broken connection, and how owners hear of interrupt requests (a NOTIFY, the
catch-up after a reconnect, the renewal's fallback) without asking the server every `interrupt_poll`.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import stoppoint as sp
from stoppoint._postgres import PostgresStore
from tests.conftest import until
from tests.pg import PgTarget
from tests.test_store_conformance import T0, A, B, claimed, done, outputs, state

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(pg_schema: PgTarget) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as opened:
        yield opened


def sql(target: PgTarget, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on the test's server, outside any store (autocommit); `{s}` is the test's schema."""
    with psycopg.connect(target.dsn, autocommit=True, connect_timeout=5) as connection:
        cursor = connection.execute(statement.replace("{s}", f'"{target.schema}"'), params or None)
        return cursor.fetchall() if cursor.description else []


def terminate(target: PgTarget, role: str) -> int:
    """End the server processes of the test schema's store connections of `role` ("pool" or "listen")."""
    rows = sql(
        target,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = left(%s, 63)",
        f"stoppoint {role} {target.schema}",
    )
    return len(rows)


# -- the schema ---------------------------------------------------------------------------------------------


async def test_its_tables_are_made_on_first_use_in_its_own_schema(pg_schema: PgTarget) -> None:
    store = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    assert sql(pg_schema, "SELECT 1 FROM pg_namespace WHERE nspname = %s", pg_schema.schema) == []  # untouched
    async with store:
        await claimed(store)
    tables = sql(pg_schema, "SELECT tablename FROM pg_tables WHERE schemaname = %s", pg_schema.schema)
    assert {name for (name,) in tables} == {"meta", "runs", "steps", "interrupts", "labels", "events"}
    assert dict(sql(pg_schema, "SELECT key, value FROM {s}.meta")) == {"app": "stoppoint", "schema_version": "1"}


async def test_a_schema_made_before_events_gets_their_table_on_first_use(pg_schema: PgTarget) -> None:
    """The events table is additive: the schema keeps its version, and a run's stale events (an older
    stoppoint's `delete()` left them) go when a new run of that name is made."""
    async with PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as store:
        await claimed(store)
    sql(pg_schema, "DROP TABLE {s}.events")
    async with PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as store:
        assert list(await store.events("f", "r1")) == []
        event = sp.StepProgressEvent(run_id="r2", flow="f", at=T0, step="a", done=1).model_dump_json()
        sql(pg_schema, "INSERT INTO {s}.events VALUES ('f', 'r2', 1, %s)", event)
        assert len(await store.events("f", "r2")) == 1
        await claimed(store, "r2")
        assert list(await store.events("f", "r2")) == []
    assert dict(sql(pg_schema, "SELECT key, value FROM {s}.meta")) == {"app": "stoppoint", "schema_version": "1"}


async def test_a_schema_of_a_newer_version_is_refused_and_left_as_it_is(pg_schema: PgTarget) -> None:
    async with PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as store:
        await claimed(store)
    sql(pg_schema, "UPDATE {s}.meta SET value = '7' WHERE key = 'schema_version'")
    with pytest.raises(sp.StoreError, match=r"newer schema version \(7\).*upgrade stoppoint"):
        async with PostgresStore(pg_schema.dsn, schema=pg_schema.schema):
            pass
    assert sql(pg_schema, "SELECT run_id FROM {s}.runs") == [("r1",)]


async def test_a_schema_holding_other_tables_is_refused(pg_schema: PgTarget) -> None:
    sql(pg_schema, "CREATE SCHEMA {s}")
    sql(pg_schema, "CREATE TABLE {s}.runs (id int)")
    with pytest.raises(sp.StoreError, match=r"is not a stoppoint store's \(it has no meta table; its tables: runs\)"):
        async with PostgresStore(pg_schema.dsn, schema=pg_schema.schema):
            pass


async def test_stores_in_two_schemas_of_one_database_are_separate(pg_schema: PgTarget, store: PostgresStore) -> None:
    other = PgTarget(pg_schema.dsn, pg_schema.schema + "_other")
    try:
        async with PostgresStore(other.dsn, schema=other.schema) as second:
            await claimed(store)
            assert await second.load("f", "r1") is None
            await claimed(second)  # the same id, in its own schema
    finally:
        sql(other, "DROP SCHEMA IF EXISTS {s} CASCADE")


# -- bad input and a server out of reach --------------------------------------------------------------------


def test_bad_arguments_are_refused_when_the_store_is_made() -> None:
    with pytest.raises(TypeError, match="dsn must be a str"):
        PostgresStore(b"postgresql://x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a PostgreSQL connection string"):
        PostgresStore("host='unterminated")
    with pytest.raises(ValueError, match="1 to 63 bytes"):
        PostgresStore("postgresql://x", schema="")
    with pytest.raises(ValueError, match="1 to 63 bytes"):
        PostgresStore("postgresql://x", schema="s" * 64)
    with pytest.raises(TypeError, match="lease must be a number"):
        PostgresStore("postgresql://x", lease=0)
    with pytest.raises(TypeError, match="max_connections"):
        PostgresStore("postgresql://x", max_connections=0)


async def test_a_server_out_of_reach_fails_at_once_with_a_store_error() -> None:
    """Not after the pool's wait for its first connection (15 s, then "pool initialization incomplete")."""
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/test")
    with anyio.fail_after(5), pytest.raises(sp.StoreError, match="Connection refused") as raised:
        async with store:
            pass
    assert f"PostgresStore(127.0.0.1:{port}/test" in str(raised.value)


async def test_a_database_that_does_not_exist_fails_on_open_saying_so(pg_schema: PgTarget) -> None:
    dsn = make_conninfo(**{**conninfo_to_dict(pg_schema.dsn), "dbname": "stoppoint_no_such_database"})
    with anyio.fail_after(5), pytest.raises(sp.StoreError, match='database "stoppoint_no_such_database" does not'):
        async with PostgresStore(dsn, schema=pg_schema.schema):
            pass


async def test_text_postgresql_cannot_hold_is_refused_before_anything_is_written(store: PostgresStore) -> None:
    with pytest.raises(sp.StoreError, match="NUL character"):
        await store.claim("f", "r\x00", A, new=state("r\x00"))
    with pytest.raises(sp.StoreError, match="NUL character"):
        await store.set_labels("f", "r1", {"k": "a\x00b"})
    assert await store.load("f", "r\x00") is None  # no run of that name can be stored
    assert await store.labels("f", "r1") == {}
    assert await store.list_runs() == []


# -- a broken connection ------------------------------------------------------------------------------------


async def test_a_step_commit_on_a_broken_connection_is_tried_once_more_on_a_new_one(
    pg_schema: PgTarget, store: PostgresStore
) -> None:
    lease = await claimed(store)
    assert terminate(pg_schema, "pool") >= 1  # as a server restart would: every pooled connection is dead
    await store.commit_step(lease, done("a", 1))
    assert outputs(await store.load("f", "r1")) == {"a": 1}


async def test_a_claim_on_a_broken_connection_fails_with_a_store_error(
    pg_schema: PgTarget, store: PostgresStore
) -> None:
    """A claim is not tried again: whether the first one committed is unknown, and a second would find the run
    held (by this very claim)."""
    await store.list_runs()
    assert terminate(pg_schema, "pool") >= 1
    with pytest.raises(sp.StoreError):
        await claimed(store)
    await claimed(store)  # the pool has a new connection now


async def test_a_transaction_left_open_by_a_paused_client_is_ended_by_the_server(pg_schema: PgTarget) -> None:
    """A client stopped mid-write (SIGSTOP, a partition) would hold the run's row lock, and with it every claim
    of the run: the server ends such a session once it has been idle in its transaction for the store's
    connection wait (the lease, 1 to 15 s)."""
    async with PostgresStore(pg_schema.dsn, schema=pg_schema.schema, lease=1) as store:
        lease = await claimed(store)
        pool = store._open()
        with pool.connection() as stalled:
            stalled.execute("BEGIN")
            stalled.execute("SELECT 1 FROM runs WHERE run_id = 'r1' FOR UPDATE")  # then nothing, as if paused
            with anyio.fail_after(10):
                await store.commit_step(lease, done("a", 1))  # waits for the lock, until the server ends it
            with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
                stalled.execute("SELECT 1")
        assert outputs(await store.load("f", "r1")) == {"a": 1}


# -- hearing of interrupt requests ------------------------------------------------------------------------


class Counted(PostgresStore):
    """Counts the reads of interrupt requests that reach the server."""

    reads = 0

    async def _call(self, operation: Any, *args: Any, **options: Any) -> Any:
        if operation.__name__ == "interrupts":
            self.reads += 1
        return await super()._call(operation, *args, **options)


async def test_an_owner_reads_its_requests_from_the_server_only_when_told_they_changed(pg_schema: PgTarget) -> None:
    async with (
        Counted(pg_schema.dsn, schema=pg_schema.schema) as owner,
        PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as other,
    ):
        lease = await claimed(owner)
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(owner._listener.listening.wait)
        assert await owner.interrupts(lease) == []
        reads = owner.reads
        for _ in range(20):  # an owner's poll, every interrupt_poll: nothing changed, nothing read
            assert await owner.interrupts(lease) == []
        assert owner.reads == reads
        assert await other.interrupt("f", "r1", "deploy window closed", source="ops")  # another store: a NOTIFY

        async def heard() -> bool:
            return bool(await owner.interrupts(lease))

        await until(heard, within=5)
        [(_, signal)] = await owner.interrupts(lease)
        assert (signal.reason, signal.source) == ("deploy window closed", "ops")
        assert owner.reads == reads + 1


async def test_a_request_sent_while_the_listener_reconnects_is_found_by_the_catch_up(pg_schema: PgTarget) -> None:
    async with (
        PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as owner,
        PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as other,
    ):
        lease = await claimed(owner)
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(owner._listener.listening.wait)
        assert await owner.interrupts(lease) == []
        assert terminate(pg_schema, "listen") == 1
        assert await other.interrupt("f", "r1", "now")  # its NOTIFY may reach nobody

        async def heard() -> bool:
            return bool(await owner.interrupts(lease))

        await until(heard, within=5)  # long before a renewal (every 5 s with this lease)


async def test_without_notifications_the_renewal_finds_a_request(pg_schema: PgTarget) -> None:
    async with (
        PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as owner,
        PostgresStore(pg_schema.dsn, schema=pg_schema.schema) as other,
    ):
        lease = await claimed(owner)
        await anyio.to_thread.run_sync(owner._listener.stop)  # nothing will be heard from now on
        assert await owner.interrupts(lease) == []
        assert await other.interrupt("f", "r1", "now")
        assert await owner.interrupts(lease) == []  # the last read stands: nobody said it changed
        lease = await owner.renew(lease)
        [(_, signal)] = await owner.interrupts(lease)
        assert signal.reason == "now"


async def test_a_run_taken_over_elsewhere_is_lost_at_the_owners_next_poll(pg_schema: PgTarget) -> None:
    async with (
        PostgresStore(pg_schema.dsn, schema=pg_schema.schema, lease=0.5) as owner,
        PostgresStore(pg_schema.dsn, schema=pg_schema.schema, lease=0.5) as other,
    ):
        lease = await claimed(owner)
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(owner._listener.listening.wait)
        assert await owner.interrupts(lease) == []

        async def taken() -> bool:
            try:
                return (await other.claim("f", "r1", B)) is not None
            except sp.RunOwned:
                return False

        await until(taken, within=5)  # once the lease expired: the claim NOTIFYs the old owner

        async def lost() -> bool:
            try:
                await owner.interrupts(lease)
            except sp.LeaseLost:
                return True
            return False

        await until(lost, within=5)
        with pytest.raises(sp.LeaseLost, match="held by host-b"):
            await owner.commit_step(lease, done("a", 1))
