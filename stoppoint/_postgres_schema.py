"""A `PostgresStore`'s tables, in a schema of their own (`schema=`, "stoppoint" by default).

    meta        (key text PRIMARY KEY, value text)          app = 'stoppoint', schema_version = '1'
    runs        one row per run: flow, run_id (the key), flow_version, status, started_at, updated_at,
                finished_at (timestamptz), checkpoint and report (JSON text: the head), owner, epoch,
                lease_expires_at, claimed_at (the lease; times on the server's clock), queue, and seq
                (insertion order, the tie-break of equal start times)
    steps       one row per (flow, run_id, step): epoch (of the claim that wrote it), checkpoint (the step's
                part: its output, or an include's checkpoint; NULL for a progress row), report; seq keeps
                the order of the rows' first writes
    interrupts  pending interrupt requests: id (bigserial: the request's number), flow, run_id, reason,
                force, source, requested_at
    labels      (flow, run_id, key, value)
    events      each run's history (EventStore): (flow, run_id, seq, event): seq numbers the run's events
                from 1, event is one event's JSON; the last EVENTS_KEPT are kept, older ones deleted

Created on first use, in one transaction under an advisory lock, so that processes starting together do
not race; a schema of a newer version is refused. The events table came later and keeps the schema version:
it is purely additive (no table or column a stoppoint before it reads changed, and such a stoppoint ignores
it), so a schema made before it gets it on first use, in the same transaction, rather than through an upgrade
that would lock older stoppoints out. A new run row (a claim's or a submit's) first deletes any events left
under its name (by an older stoppoint's `delete()`, which did not know them).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from ._errors import StoreError

__all__ = ["SCHEMA_VERSION", "ensure_schema", "lock_key"]

SCHEMA_VERSION = 1
_APP = "stoppoint"

_TABLES = (
    "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE runs ("
    " flow text NOT NULL, run_id text NOT NULL, flow_version text NOT NULL, status text NOT NULL,"
    " started_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, finished_at timestamptz,"
    " checkpoint text NOT NULL, report text NOT NULL,"
    " owner text, epoch bigint NOT NULL DEFAULT 0, lease_expires_at timestamptz, claimed_at timestamptz,"
    " queue text, seq bigint GENERATED ALWAYS AS IDENTITY, PRIMARY KEY (flow, run_id))",
    "CREATE INDEX runs_by_id ON runs (run_id)",
    "CREATE INDEX runs_by_start ON runs (started_at, seq)",
    "CREATE INDEX runs_to_claim ON runs (status, started_at, seq) WHERE status IN ('queued', 'running')",
    "CREATE TABLE steps (flow text NOT NULL, run_id text NOT NULL, step text NOT NULL, epoch bigint NOT NULL,"
    " checkpoint text, report text NOT NULL, seq bigint GENERATED ALWAYS AS IDENTITY,"
    " PRIMARY KEY (flow, run_id, step))",
    "CREATE TABLE interrupts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, flow text NOT NULL,"
    " run_id text NOT NULL, reason text NOT NULL, force boolean NOT NULL, source text,"
    " requested_at timestamptz NOT NULL)",
    "CREATE INDEX interrupts_by_run ON interrupts (flow, run_id, id)",
    "CREATE TABLE labels (flow text NOT NULL, run_id text NOT NULL, key text NOT NULL, value text NOT NULL,"
    " PRIMARY KEY (flow, run_id, key))",
)
_EVENTS = (
    "CREATE TABLE events (flow text NOT NULL, run_id text NOT NULL, seq bigint NOT NULL, event text NOT NULL,"
    " PRIMARY KEY (flow, run_id, seq))"
)
_NAMES = {"meta", "runs", "steps", "interrupts", "labels"}  # not events: a schema made before it lacks it


def lock_key(schema: str, name: str) -> sql.Composed:
    """An advisory lock's key for `name` within `schema` (a 64-bit hash; a collision only serialises two
    transactions that need not wait for each other)."""
    return sql.SQL("hashtextextended({}, 0)").format(sql.Literal(f"{schema}/{name}"))


def ensure_schema(connection: psycopg.Connection[Any], schema: str, where: str) -> None:
    """Create the store's schema and tables if missing, else check them; in one transaction.

    Raises:
        StoreError: The schema holds tables that are not a stoppoint store's, or those of a newer version.
    """
    with connection.transaction():
        connection.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(lock_key(schema, "schema")))
        names = {
            name
            for (name,) in connection.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
            )
        }
        if not names & _NAMES:
            connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            for statement in (*_TABLES, _EVENTS):
                connection.execute(statement)
            connection.execute(
                "INSERT INTO meta (key, value) VALUES ('app', %s), ('schema_version', %s)",
                (_APP, str(SCHEMA_VERSION)),
            )
            return
        foreign = f"{where}: schema {schema!r} is not a stoppoint store's"
        if "meta" not in names:
            raise StoreError(f"{foreign} (it has no meta table; its tables: {', '.join(sorted(names))})")
        meta: dict[str, str] = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("app") != _APP:
            raise StoreError(f"{foreign} (its meta table has no app = 'stoppoint' row)")
        version = str(meta.get("schema_version"))
        if version.isdigit() and int(version) > SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema {schema!r} is a stoppoint store of a newer schema version ({version}) than this "
                f"stoppoint reads ({SCHEMA_VERSION}); upgrade stoppoint to use it"
            )
        if version != str(SCHEMA_VERSION):
            raise StoreError(f"{where}: schema {schema!r} is a stoppoint store of an unknown version {version!r}")
        missing = sorted(_NAMES - names)
        if missing:
            raise StoreError(
                f"{where}: schema {schema!r} is a damaged stoppoint store: its {missing[0]} table is missing"
            )
        if "events" not in names:
            connection.execute(_EVENTS)
