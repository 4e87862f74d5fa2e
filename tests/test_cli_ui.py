"""`stoppoint ui` (stoppoint/_cli_ui.py): the dashboard served by uvicorn, as a real process.

Each test starts the command and reads the address it serves at from its first line (`--port 0`: a free port),
then talks to it over HTTP; SIGTERM and SIGINT stop it. Timeouts only guard against hangs, and every child is
killed in a `finally` (the `spawn` fixture).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

import stoppoint as sp
from stoppoint._cli import main
from stoppoint._cli_ui import TOKEN_ENV
from stoppoint._ui_guard import TOKEN_COOKIE

from .conftest import a_then_b
from .test_cli_worker import FLOWS, submitted
from .test_hardening_cli import ENV, HANG_GUARD, Proc, command, spawn
from .test_ui import parse, runs_shown

__all__ = ["spawn"]  # the fixture, used by name

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

UI_ENV = {name: value for name, value in ENV.items() if name != TOKEN_ENV}  # no token unless a test gives one
TOKEN = "s3cret-token-for-the-dashboard"
PROMPTLY = 10  # seconds: a stopped server ends its open requests and exits well within this


def ui(*args: str, cwd: Path, env: dict[str, str] = UI_ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command("ui"), *args], capture_output=True, text=True, timeout=HANG_GUARD, check=False, cwd=cwd, env=env
    )


def serving(proc: Proc) -> str:
    """The address the command says it serves at (its first line)."""
    line = proc.expect(r"^stoppoint ui: serving ")
    found = re.fullmatch(r"stoppoint ui: serving (.+) at (http://\S+/)", line)
    assert found is not None, line
    return found.group(2)


def stopped(proc: Proc, sig: signal.Signals) -> tuple[int, str, str]:
    """Send `sig`; the exit code (within PROMPTLY seconds), stdout and stderr."""
    proc.send(sig)
    try:
        proc.proc.wait(timeout=PROMPTLY)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {PROMPTLY} s after {sig.name}")
    return proc.finish()


@pytest.fixture
def runs_db(tmp_path: Path) -> Path:
    """An SQLite store with a completed run `done` and a queued run `waiting` of flow `ab`."""
    path = tmp_path / "runs.db"

    async def make() -> None:
        async with sp.SQLiteStore(path) as store:
            await a_then_b([]).run(store=store, run_id="done")
            await a_then_b([]).submit(store, run_id="waiting")

    anyio.run(make)
    return path


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    """Each in a directory of its own, all at once (each process spends most of its time importing)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cases: list[tuple[list[str], dict[str, str], str]] = [
            (["--host", "0.0.0.0"], {}, "--host 0.0.0.0: not a loopback address; the dashboard can stop runs, so "
             "serving it to other machines needs --token TOKEN (or STOPPOINT_UI_TOKEN)"),
            ([], {TOKEN_ENV: "short"}, "--token: at least 16 characters"),
            (["--port", "70000"], {}, "--port 70000: expected 0 to 65535 (0: any free port)"),
            (["--port", str(port)], {}, f"--host 127.0.0.1 --port {port}: cannot listen there: Address already in use"),
        ]  # fmt: skip
        procs = []
        for n, (args, env, _) in enumerate(cases):
            (tmp_path / str(n)).mkdir()
            procs.append(
                subprocess.Popen(
                    [*command("ui"), *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=tmp_path / str(n),
                    env={**UI_ENV, **env},
                )
            )
        try:
            ended = [proc.communicate(timeout=HANG_GUARD) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    for n, ((args, _, message), proc, (out, err)) in enumerate(zip(cases, procs, ended, strict=True)):
        assert proc.returncode == 2, (args, out, err)
        assert err.startswith(f"stoppoint: error: {message}"), (args, err)
        assert err.count("\n") == 1, err  # one line, no traceback
        assert out == ""
        assert not (tmp_path / str(n) / ".stoppoint").exists()  # refused before any store was made


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "192.0.2.1"], "needs --token TOKEN (or STOPPOINT_UI_TOKEN), which every request must carry"),
        (["--host", "192.0.2.1", "--token", "0123456789abcde"], "--token: at least 16 characters"),
        (["--token", "a token with spaces in it"], "--token: only printable ASCII characters"),
        (["--token", "jeton-secret-très-long"], "--token: only printable ASCII characters"),
        (["--port", "-1"], "--port -1: expected 0 to 65535"),
        (["--port", "0", "--store", "missing/runs.db"], "--store 'missing/runs.db': its directory does not exist"),
        (["--port", "0", "--schema", "s"], "--schema 's': only a PostgreSQL store"),
    ],
)
def test_more_usage_errors_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """The same checks, through `main()` (no process: they cost no start-up)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["ui", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("stoppoint: error: "), err
    assert message in err
    assert not (tmp_path / ".stoppoint").exists()


def test_it_serves_its_stores_runs_until_sigterm(runs_db: Path, tmp_path: Path, spawn: Callable[..., Proc]) -> None:
    proc = spawn([*command("ui", "--store", str(runs_db), "--port", "0")], cwd=tmp_path, env=UI_ENV)
    url = serving(proc)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
    assert proc.seen == [f"stoppoint ui: serving {runs_db} at {url}"]
    with httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
        listed = http.get("/")
        assert listed.status_code == 200
        assert {run_id: row["status"] for run_id, row in runs_shown(parse(listed.text)).items()} == {
            "done": "completed",
            "waiting": "queued",
        }
        assert parse(listed.text).one("span", class_="store").text() == str(runs_db)
        run = http.get("/run", params={"flow": "ab", "id": "done"})
        assert run.status_code == 200
        assert run.headers["x-frame-options"] == "DENY"
        assert http.get("/static/dashboard.js").headers["content-type"].startswith("text/javascript")
        # Only a loopback name is answered without a token (DNS rebinding).
        assert http.get("/", headers={"host": f"evil.example:{urlsplit(url).port}"}).status_code == 403
        started = time.monotonic()
        code, out, err = stopped(proc, signal.SIGTERM)
    assert code == 0, err
    assert err == ""
    assert out == f"stoppoint ui: serving {runs_db} at {url}"
    assert time.monotonic() - started < PROMPTLY


def test_a_token_from_the_environment_guards_every_request_and_sigint_stops_it(
    runs_db: Path, tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    # Any address may be served with a token: 0.0.0.0 (every interface), reached here through the loopback.
    args = command("ui", "--store", str(runs_db), "--port", "0", "--host", "0.0.0.0")
    proc = spawn(args, cwd=tmp_path, env={**UI_ENV, TOKEN_ENV: TOKEN})
    url = serving(proc)
    port = urlsplit(url).port
    assert url == f"http://0.0.0.0:{port}/"
    proc.expect(r"^stoppoint ui: open it once with \?token=TOKEN \(a cookie keeps it\)$")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=HANG_GUARD) as http:
        assert http.get("/").status_code == 401
        assert http.get("/", params={"token": "not-the-token-at-all"}).status_code == 401
        assert http.get("/", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        # Another name than the loopback's: the token is what is checked.
        bearer = {"authorization": f"Bearer {TOKEN}", "host": f"dashboard.example:{port}"}
        assert http.get("/", headers=bearer).status_code == 200
        kept = http.get("/run", params={"flow": "ab", "id": "done", "token": TOKEN})
        assert kept.status_code == 303
        assert kept.headers["location"] == "/run?flow=ab&id=done"
        assert http.cookies[f"{TOKEN_COOKIE}_{port}"] == TOKEN
        assert http.get(kept.headers["location"]).status_code == 200  # the cookie carries it now
        code, out, err = stopped(proc, signal.SIGINT)
    assert code == 0, err
    assert TOKEN not in out + err


def test_its_interrupt_button_stops_a_run_of_a_worker_process(tmp_path: Path, spawn: Callable[..., Proc]) -> None:
    """The whole path: a worker process runs a run, the dashboard process's button interrupts it through the store."""
    submitted(f"{FLOWS}:held", "--input", f"marker={tmp_path / 'h1'}", "--run-id", "h1", cwd=tmp_path)
    worker = spawn(command("worker", f"{FLOWS}:held"), cwd=tmp_path)
    worker.expect(r"^waiting h1 \(epoch 1\)$")
    dashboard = spawn(command("ui", "--port", "0"), cwd=tmp_path, env=UI_ENV)
    url = serving(dashboard)
    with httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
        running = http.get("/run", params={"flow": "held", "id": "h1"})
        assert running.status_code == 200
        form = parse(running.text).one("form", action="/run/interrupt")
        fields = {node.attrs["name"] or "": node.attrs["value"] or "" for node in form.all("input")}
        pressed = http.post("/run/interrupt", data=fields)
        assert pressed.status_code == 303
        assert pressed.headers["location"] == "/run?flow=held&id=h1&said=interrupt"
        worker.expect(r"ended run h1 of flow held: interrupted \(interrupted from the dashboard\)$")
        after = parse(http.get("/run", params={"flow": "held", "id": "h1"}).text)
        assert after.one(id="run-status").attrs["data-status"] == "interrupted"
    for proc in (worker, dashboard):
        code, _, err = stopped(proc, signal.SIGTERM)
        assert code == 0, err


def has_ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


def test_a_token_option_on_the_loopback_wins_over_the_environments(tmp_path: Path, spawn: Callable[..., Proc]) -> None:
    """Served on the IPv6 loopback when there is one (its address in brackets), from the default store."""
    host = "::1" if has_ipv6_loopback() else "127.0.0.1"
    env = {**UI_ENV, TOKEN_ENV: "ignored-because-the-option-wins"}
    proc = spawn(command("ui", "--host", host, "--port", "0", "--token", TOKEN), cwd=tmp_path, env=env)
    url = serving(proc)
    if host == "::1":
        assert re.fullmatch(r"http://\[::1\]:\d+/", url)
    with httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
        assert http.get("/").status_code == 401
        assert http.get("/", headers={"authorization": "Bearer ignored-because-the-option-wins"}).status_code == 401
        listed = http.get("/", headers={"authorization": f"Bearer {TOKEN}"})
        assert listed.status_code == 200
        assert runs_shown(parse(listed.text)) == {}
    code, _, err = stopped(proc, signal.SIGTERM)
    assert code == 0, err


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_without_the_ui_extra_it_says_what_to_install(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    missing: str,
) -> None:
    """One line naming the extra, not a traceback: the guard's own checks need starlette too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for name in [name for name in sys.modules if name == missing or name.startswith(f"{missing}.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("stoppoint._ui", "stoppoint._ui_guard", "stoppoint._ui_html"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    assert main(["ui", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == 'stoppoint: error: stoppoint ui needs the "ui" extra ('
        + missing
        + ' is missing): pip install "stoppoint[ui]"\n'
    )
    assert not (tmp_path / ".stoppoint").exists()
