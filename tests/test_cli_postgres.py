"""The `stoppoint` commands on a PostgreSQL store: `--store postgresql://...` (or `postgres://...`) and `--schema`.

Every command runs as a user runs it, in a subprocess, against the test's own schema (`pg_schema`, dropped after
the test). The order of things comes from the processes' own output (the worker prints a line per claimed and
ended run, the steps of tests/worker_flows.py say where they are); timeouts only guard against hangs, and
every child is killed in a `finally` (the `spawn` fixture).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stoppoint._cli import main

from .pg import CONNECT_TIMEOUT, PgTarget, schema_exists
from .test_cli_worker import expect_all
from .test_hardening_cli import ENV, Proc, command, spawn, stoppoint, write

__all__ = ["spawn"]  # the fixture, used by name

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

FLOWS = str(Path(__file__).resolve().parent / "worker_flows.py")

FAILING_ONCE = """
    from pathlib import Path
    import stoppoint as sp

    fl = sp.Flow("fl")

    @fl.step
    async def a() -> int:
        print("a ran", flush=True)
        return 1

    @fl.step
    async def b(a: int) -> int:
        if not Path(__file__).with_name("ok").exists():
            raise ValueError("not yet")
        return a + 1
"""


def on(pg: PgTarget) -> list[str]:
    """The options that name the test's store."""
    return ["--store", pg.dsn, "--schema", pg.schema]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in this process (`main()`, as `python -m stoppoint` calls it): for the commands that only
    look or ask (a process of their own costs a second of imports each; a worker and a run get one)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def ok(*args: str) -> str:
    done = cli(*args)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def shown(run_id: str, pg: PgTarget) -> dict[str, object]:
    data: dict[str, object] = json.loads(ok("show", run_id, "--json", *on(pg)))
    return data


def with_password(dsn: str, password: str) -> str:
    """`postgresql://user@host/db` with a password (trust authentication ignores it)."""
    scheme, sep, rest = dsn.partition("://")
    user, at, hosts = rest.partition("@")
    assert sep, dsn
    assert at, dsn
    assert ":" not in user, dsn
    return f"{scheme}://{user}:{password}@{hosts}"


def test_run_runs_show_and_resume_on_postgres(tmp_path: Path, pg_schema: PgTarget) -> None:
    write(tmp_path, "flows.py", FAILING_ONCE)
    dsn = with_password(pg_schema.dsn, "s3cret")  # never printed
    done = stoppoint("run", "flows.py:fl", "--run-id", "r1", "--store", dsn, "--schema", pg_schema.schema, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "step 'b' failed: ValueError: not yet" in done.stdout
    assert schema_exists(pg_schema)  # made by the first run
    line = next(line for line in done.stdout.splitlines() if line.startswith("to resume: "))
    words = shlex.split(line.removeprefix("to resume: "))
    assert words == ["stoppoint", "resume", "r1", "--store", pg_schema.dsn, "--schema", pg_schema.schema], line
    assert "s3cret" not in done.stdout + done.stderr

    listed = ok("runs", *on(pg_schema))
    assert re.search(r"^r1\s+fl\s+failed\s", listed, re.M), listed
    data = shown("r1", pg_schema)
    assert (data["status"], data["flow"], data["epoch"], data["owner"]) == ("failed", "fl", 1, None)
    assert data["target"] == f"{(tmp_path / 'flows.py').resolve()}:fl"
    text = ok("show", "r1", *on(pg_schema))
    assert text.startswith("run r1 of flow fl: failed\n"), text
    assert f"to resume: stoppoint resume r1 --store {pg_schema.dsn} --schema {pg_schema.schema}" in text

    (tmp_path / "ok").touch()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = stoppoint(*words[1:], cwd=elsewhere)  # the printed command, as printed, from another directory
    assert resumed.returncode == 0, resumed.stderr
    assert "a ran" not in resumed.stdout  # completed in the first attempt: taken from the store
    data = shown("r1", pg_schema)
    assert (data["status"], data["epoch"]) == ("completed", 2)
    report = data["report"]
    assert isinstance(report, dict)
    assert (report["steps"]["a"]["status"], report["steps"]["b"]["status"]) == ("completed", "completed")
    assert report["steps"]["a"]["resumed"]

    again = cli("run", str(tmp_path / "flows.py:fl"), "--run-id", "r1", *on(pg_schema))
    assert again.returncode == 2
    assert "run 'r1' is already in the store; use `stoppoint resume r1 --store " in again.stderr


def test_the_postgres_scheme_and_the_default_schema(tmp_path: Path, pg_server: str) -> None:
    """`postgres://` is PostgreSQL too; without `--schema` the store is in schema `stoppoint` (as
    `PostgresStore`'s default), and the printed commands name none."""
    from .pg import drop_schema

    dsn = "postgres://" + pg_server.partition("://")[2]
    run_id = f"cli-default-{time.time_ns()}"  # the default schema may be shared with other runs: an id of its own
    target = PgTarget(pg_server, "stoppoint")
    existed = schema_exists(target)
    try:
        write(tmp_path, "flows.py", FAILING_ONCE)
        done = stoppoint("run", "flows.py:fl", "--run-id", run_id, "--store", dsn, cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        assert f"to resume: stoppoint resume {run_id} --store {dsn}\n" in done.stdout
        assert re.search(rf"^{run_id}\s+fl\s+failed\s", ok("runs", "--store", dsn), re.M)
    finally:
        if not existed:
            drop_schema(target)


def test_submit_worker_interrupt_on_postgres(tmp_path: Path, pg_schema: PgTarget, spawn: Callable[..., Proc]) -> None:
    out = ok(
        "submit",
        f"{FLOWS}:held",
        "--input",
        f"marker={tmp_path / 'h1'}",
        "--run-id",
        "h1",
        *on(pg_schema),
    )
    assert out == "run h1 of flow held queued in default\n"
    ok("submit", f"{FLOWS}:double", "--input", "n=21", "--run-id", "d1", *on(pg_schema))
    assert re.search(r"^h1\s+held\s+queued\s+\S+ \S+\s+default\s+0\s+-\s+-$", ok("runs", *on(pg_schema)), re.M)

    worker = spawn(command("worker", FLOWS, *on(pg_schema), "--lease", "5"), cwd=tmp_path)
    worker.expect(
        rf"worker \S+:\d+/\w+: serving flows double, held, stuck from queues default of "
        rf"PostgresStore\(\S+, '{pg_schema.schema}'\)$"
    )
    expect_all(worker, [r"ended run d1 of flow double: completed$", r"^waiting h1 \(epoch 1\)$"])  # either order
    owner = rf"\S+:{worker.proc.pid}/\w+"
    listed = ok("runs", *on(pg_schema))
    assert re.search(rf"^h1\s+held\s+running\s+\S+ \S+\s+default\s+1\s+in \d+ s\s+{owner}$", listed, re.M), listed
    text = ok("show", "h1", *on(pg_schema))
    assert re.search(rf"^  owner: {owner} \(epoch 1\), lease expires in \d+ s$", text, re.M), text
    assert f"to stop it: stoppoint interrupt h1 --store {pg_schema.dsn} --schema {pg_schema.schema}" in text

    done = cli("interrupt", "h1", "--reason", "ops asked", *on(pg_schema))
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"asked {owner} to stop run h1 of flow held at its next stopping point\n", done.stdout)
    worker.expect(r"ended run h1 of flow held: interrupted \(ops asked\)$")
    again = cli("interrupt", "h1", *on(pg_schema))
    assert again.returncode == 1
    assert again.stderr == "stoppoint: nothing to stop: run h1 of flow held is interrupted and nobody is running it\n"

    worker.send(signal.SIGTERM)
    worker.expect(r"stopped$")
    code, _, err = worker.finish()
    assert code == 0, err
    data = shown("h1", pg_schema)
    assert (data["status"], data["owner"], data["epoch"]) == ("interrupted", None, 1)
    report = data["report"]
    assert isinstance(report, dict)
    assert [(request["reason"], request["source"]) for request in report["interrupts"]] == [("ops asked", "cli")]
    assert shown("d1", pg_schema)["status"] == "completed"


def test_looking_into_a_schema_that_is_not_there_creates_nothing(tmp_path: Path, pg_schema: PgTarget) -> None:
    assert ok("runs", *on(pg_schema)) == "no runs\n"
    place = f"in schema '{pg_schema.schema}' of {pg_schema.dsn}"
    for verb in ("show", "resume"):
        done = cli(verb, "r1", *on(pg_schema))
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"stoppoint: error: no run 'r1': there is no store {place} yet\n"
    done = cli("interrupt", "r1", *on(pg_schema))
    assert done.returncode == 1
    assert done.stderr == f"stoppoint: nothing to stop: no run 'r1': there is no store {place} yet\n"
    assert not schema_exists(pg_schema)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "args",
    [
        ["runs"],
        ["show", "r1"],
        ["interrupt", "r1"],
        ["run", f"{FLOWS}:double", "--input", "n=1"],
        ["submit", f"{FLOWS}:double", "--input", "n=1"],
        ["worker", FLOWS],
    ],
    ids=lambda args: args[0],
)
def test_a_server_that_is_not_there_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    dsn = f"postgresql://postgres:pw@127.0.0.1:{closed_port()}/test"
    started = time.monotonic()
    done = cli(*args, "--store", dsn)
    assert done.returncode == 2, (done.stdout, done.stderr)
    [line] = done.stderr.splitlines()[:1]
    assert line.startswith("stoppoint: error: StoreError: PostgresStore(127.0.0.1:"), done.stderr
    assert "Connection refused" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert ":pw@" not in done.stderr
    assert time.monotonic() - started < CONNECT_TIMEOUT + 10  # refused at once: no wait for a pool's timeout


def test_without_psycopg_the_command_says_what_to_install(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    write(fake, "psycopg.py", "raise ImportError('No module named psycopg (hidden by the test)')")
    env = {**ENV, "PYTHONPATH": str(fake)}
    proc = Proc(command("worker", FLOWS, "--store", "postgresql://nobody:pw@db.invalid/x"), cwd=tmp_path, env=env)
    try:
        code, out, err = proc.finish()
    finally:
        proc.close()
    assert code == 2, (out, err)
    assert err == (
        "stoppoint: error: --store postgresql://nobody@db.invalid/x: PostgresStore needs psycopg 3 and "
        "psycopg-pool: pip install 'stoppoint[postgres]' (No module named psycopg (hidden by the test))\n"
    )
    assert stoppoint("runs", cwd=tmp_path).stdout == "no runs\n"  # SQLite needs no psycopg


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["runs", "--schema", "x"], "--schema 'x': only a PostgreSQL store (--store postgresql://...) has schemas"),
        (["runs", "--store", "postgresql://h/db?nope=1"], "--store postgresql://h/db?nope=1: PostgresStore(dsn): "),
        (["runs", "--store", "postgresql://h/db", "--schema", ""], "PostgresStore(schema=''): a schema name must be"),
    ],
)
def test_store_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("stoppoint: error: "), done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_schema_is_read_by_every_command(tmp_path: Path, pg_schema: PgTarget) -> None:
    """Two schemas of one database are two stores: a run submitted to one is not in the other."""
    other = PgTarget(pg_schema.dsn, pg_schema.schema + "_b")
    try:
        ok("submit", f"{FLOWS}:double", "--input", "n=1", "--run-id", "only-a", *on(pg_schema))
        ok("submit", f"{FLOWS}:double", "--input", "n=1", "--run-id", "only-b", *on(other))
        assert "only-a" in ok("runs", *on(pg_schema))
        assert "only-b" not in ok("runs", *on(pg_schema))
        assert "only-b" in ok("runs", *on(other))
        done = cli("show", "only-a", *on(other))
        assert done.returncode == 2
        assert "no run 'only-a' in PostgresStore(" in done.stderr
    finally:
        from .pg import drop_schema

        drop_schema(other)
