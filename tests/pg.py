"""PostgreSQL for the tests: a server found (or started) once per session, a fresh schema per test, and
private throwaway clusters for the tests that restart or break a server.

The session's server (`find_server`, behind conftest's `pg_server`), first found of:

1. `STOPPOINT_TEST_PG_DSN`, when set (an error if it cannot be reached: it was asked for);
2. `postgresql://postgres@127.0.0.1:5432/test`, when a connection to it succeeds within 3 s (this probe is
   left out when `STOPPOINT_TEST_PG_NO_LOCAL` is set, to exercise the next path on a machine that has a server);
3. a throwaway cluster (`throwaway_cluster`), when `initdb` and `pg_ctl` are found, on PATH or in
   /usr/lib/postgresql/*/bin: database `postgres`, stopped and removed at the end of the session.

With none of them the Postgres tests skip, saying how to run them; in CI (`CI` set, and not `0`/`false`/`no`)
they fail instead: there a missing server is a broken runner, never a reason to pass.

Every wait is bounded: `connect_timeout`, `pg_ctl -w -t 30`, and a timeout on each command run.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = [
    "DSN_ENV",
    "LOCAL_DSN",
    "NO_LOCAL_ENV",
    "NoServer",
    "PgTarget",
    "ThrowawayCluster",
    "drop_schema",
    "find_server",
    "fresh_schema",
    "in_ci",
    "schema_exists",
    "throwaway_cluster",
    "unavailable",
    "unique_schema",
]

DSN_ENV = "STOPPOINT_TEST_PG_DSN"
NO_LOCAL_ENV = "STOPPOINT_TEST_PG_NO_LOCAL"
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT = 3  # seconds, for probing a server
PG_CTL_TIMEOUT = 30  # seconds, pg_ctl -t: starting or stopping a cluster
COMMAND_TIMEOUT = 120  # seconds, any one command (initdb the slowest)
HOW_TO_RUN = (
    f"to run them, point {DSN_ENV} at a server ({DSN_ENV}=postgresql://USER@HOST:PORT/DB python -m pytest), "
    "start one on 127.0.0.1:5432 (user postgres, database test, trust auth), "
    "or install PostgreSQL's initdb and pg_ctl for a throwaway cluster"
)


class NoServer(Exception):
    """No PostgreSQL server could be found or started; the message says what was tried."""


@dataclass(frozen=True)
class PgTarget:
    """Where a test's store lives: a server's DSN and a schema of its own (not created: the store creates it)."""

    dsn: str
    schema: str


def _flag(name: str) -> bool:
    """Whether an environment variable is set to something other than empty, `0`, `false` or `no`."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def in_ci() -> bool:
    """Whether this is a CI run (`CI` set, as CI services set it: `CI=true`), where a missing server fails."""
    return _flag("CI")


def unavailable(error: NoServer) -> NoReturn:
    """End the test that needs a server: a skip saying how to run it, or a failure in CI or when
    `STOPPOINT_TEST_PG_DSN` names a server that cannot be reached."""
    if in_ci():
        pytest.fail(f"{error} (in CI a missing server is a failure, not a skip)", pytrace=False)
    if os.environ.get(DSN_ENV):
        pytest.fail(str(error), pytrace=False)
    pytest.skip(f"{error}; {HOW_TO_RUN}")


def _connect_error(dsn: str) -> str | None:
    """None when `dsn` accepts a connection (made and closed), else why not."""
    try:
        import psycopg
    except ImportError as error:  # pragma: no cover - the test extra installs it
        return f"psycopg is not installed ({error}; pip install -e '.[test]')"
    try:
        with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        return str(error).strip() or type(error).__name__
    return None


# ---------------------------------------------------------------------------------------------- schemas


def unique_schema() -> str:
    """A schema name no other test uses: `stoppoint_test_<32 hex>`."""
    return f"stoppoint_test_{uuid.uuid4().hex}"


def drop_schema(target: PgTarget) -> None:
    """DROP SCHEMA ... CASCADE if it exists, on a connection of its own (autocommit). Bounded: a lock still held
    by a connection the test left open makes it fail after 10 s rather than wait."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(target.dsn, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target.schema)))


def schema_exists(target: PgTarget) -> bool:
    """Whether the schema is there, seen from a connection of its own."""
    import psycopg

    with psycopg.connect(target.dsn, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (target.schema,)).fetchone()
    return row is not None and row[0] == 1


@contextlib.contextmanager
def fresh_schema(dsn: str) -> Iterator[PgTarget]:
    """A unique schema name on `dsn` (not created), dropped with all it holds on exit (the `pg_schema` fixture)."""
    target = PgTarget(dsn, unique_schema())
    try:
        yield target
    finally:
        drop_schema(target)


# ---------------------------------------------------------------------------------------------- clusters


def _version(bindir: Path) -> tuple[int, ...]:
    """The version in a /usr/lib/postgresql/<version>/bin path, for sorting (newest first)."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """A directory holding both `initdb` and `pg_ctl`: theirs on PATH, else the newest /usr/lib/postgresql/*/bin."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        # Both on PATH (often symlinks into the versioned directory): use where initdb really lives when
        # pg_ctl is there too, so the two come from one installation.
        real = Path(initdb).resolve().parent
        return real if (real / "pg_ctl").exists() else Path(initdb).parent
    candidates = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if (path / "initdb").exists()]
    candidates = [path for path in candidates if (path / "pg_ctl").exists()]
    return max(candidates, key=_version) if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThrowawayCluster:
    """A private PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:`port` (and a Unix socket
    in its directory), superuser `postgres` with trust auth. Made by `throwaway_cluster()`.

    Attributes:
        dsn: `postgresql://postgres@127.0.0.1:<port>/postgres`.
        port: Its TCP port.
        datadir: Its data directory.
    """

    def __init__(self, bindir: Path, root: Path, port: int, run_as: str | None) -> None:
        self.bindir = bindir
        self.root = root
        self.datadir = root / "data"
        self.logfile = root / "server.log"
        self.port = port
        self.run_as = run_as
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / program), *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        # cwd: the server's user must be able to enter it (root's home, for one, it cannot).
        return subprocess.run(
            command,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise NoServer(
                f"{what} failed (exit {result.returncode}): {result.stdout.strip()} {result.stderr.strip()}"
                + (f"\nserver log:\n{log}" if log else "")
            )

    def initdb(self) -> None:
        result = self._run(
            "initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync", "-D", str(self.datadir)
        )
        self._check(result, "initdb")

    def start(self) -> None:
        """pg_ctl start -w: returns once the server accepts connections (at most 30 s)."""
        # pg_ctl gives -o to a shell: the socket directory is quoted.
        options = f"-p {self.port} -k {shlex.quote(str(self.root))} -c listen_addresses=127.0.0.1"
        # -l: the server's output goes to a file; inherited pipes would keep this call waiting for their end.
        result = self._run(
            "pg_ctl", "start", "-w", "-t", str(PG_CTL_TIMEOUT), "-D", str(self.datadir), "-l", str(self.logfile),
            "-o", options,
        )  # fmt: skip
        self._check(result, "pg_ctl start")

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -w -m `mode` (fast: connections are ended, a clean shutdown; immediate: like a crash)."""
        result = self._run("pg_ctl", "stop", "-w", "-t", str(PG_CTL_TIMEOUT), "-m", mode, "-D", str(self.datadir))
        self._check(result, f"pg_ctl stop -m {mode}")

    def restart(self) -> None:
        """Stop (fast) and start again, on the same port and data."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """Whether pg_ctl finds its server running."""
        return self._run("pg_ctl", "status", "-D", str(self.datadir)).returncode == 0


def _server_user() -> str | None:
    """The OS user to run the cluster as: None (this one) unless running as root, which postgres refuses."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise NoServer("running as root, and there is no `postgres` OS user to run a throwaway cluster as") from None
    if shutil.which("runuser") is None:
        raise NoServer("running as root, and there is no `runuser` to run a throwaway cluster as `postgres`")
    return "postgres"


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[ThrowawayCluster]:
    """A private cluster, started (initdb, then pg_ctl start on a free port); on exit stopped
    (`pg_ctl stop -m immediate`, if running) and its directory removed. Raises `NoServer` when it cannot be
    made (no initdb/pg_ctl, no user to run them as, or they failed)."""
    bindir = find_bindir()
    if bindir is None:
        raise NoServer("no initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin")
    run_as = _server_user()
    root = Path(tempfile.mkdtemp(prefix="stoppoint-pg-"))
    cluster: ThrowawayCluster | None = None
    try:
        if run_as is not None:
            user = pwd.getpwnam(run_as)
            os.chown(root, user.pw_uid, user.pw_gid)
        cluster = ThrowawayCluster(bindir, root, _free_port(), run_as)
        cluster.initdb()
        for attempt in range(3):  # the free port may be taken between finding it and the server's bind
            try:
                cluster.start()
                break
            except NoServer:
                if attempt == 2:
                    raise
                cluster.port = _free_port()
                cluster.dsn = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        yield cluster
    finally:
        try:
            if cluster is not None and cluster.datadir.exists() and cluster.running:
                cluster.stop("immediate")
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the server


def find_server(stack: contextlib.ExitStack) -> str:
    """The DSN of a reachable server, in the order of this module's docstring; a throwaway cluster's stop is
    pushed on `stack`. Raises `NoServer` saying what was tried."""
    given = os.environ.get(DSN_ENV)
    if given:
        error = _connect_error(given)
        if error is not None:
            raise NoServer(f"{DSN_ENV}={given} is set, but no connection to it: {error}")
        return given
    tried: list[str] = []
    if _flag(NO_LOCAL_ENV):
        tried.append(f"{LOCAL_DSN}: not probed ({NO_LOCAL_ENV} is set)")
    else:
        error = _connect_error(LOCAL_DSN)
        if error is None:
            return LOCAL_DSN
        tried.append(f"{LOCAL_DSN}: {error}")
    try:
        cluster = stack.enter_context(throwaway_cluster())
    except NoServer as error:
        tried.append(f"a throwaway cluster: {error}")
    else:
        return cluster.dsn
    raise NoServer("no PostgreSQL server for the tests; tried " + "; ".join(tried))
