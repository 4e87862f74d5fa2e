"""The dashboard in a real browser: Debian's Chromium, headless, driven by Selenium through its chromedriver, over
real processes (`stoppoint ui` and `stoppoint worker`) sharing one SQLite file.

A run spins at stopping points (tests/ui_flows.py); its page shows its progress moving without a reload; its
interrupt button stops it at its stopping point, and the page says where; its resume button queues it, the
worker resumes it, and it completes, having gone on counting from where it stopped. With a token, a page without
it is refused, `?token=` lets the browser in (the cookie keeps it, the address drops it), and buttons work.

Run it with:

    .venv/bin/pytest tests/test_ui_browser.py

It needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install chromium chromium-driver`; .ci/run installs
them): without them it skips, but fails in CI (`CI` set, as tests/pg.py decides). Nothing is downloaded: the
browser starts with the network features off, and Selenium Manager is kept offline (`SE_OFFLINE`).

It takes screenshots of the runs list and of a run page, into the test's tmp_path, and also into
`$STOPPOINT_SCREENSHOTS/ui-runs.png` and `ui-run.png` when that variable is set; the docs site's are refreshed
with:

    STOPPOINT_SCREENSHOTS=docs/images .venv/bin/pytest tests/test_ui_browser.py

Every wait is bounded: the processes' output is read by threads into queues, the pages are waited on with
WebDriverWait, and the children are stopped with SIGTERM (killed if they outlive the wait) in a `finally`.
Elements are found again at each check: the page swaps its live parts every second, so one found earlier may be
gone.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

import anyio
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import stoppoint as sp

from .pg import in_ci
from .ui_flows import spin

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals, Debian's chromium")

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLOWS = Path(__file__).resolve().parent / "ui_flows.py"
STORE = "runs.db"  # in the test's tmp_path, the processes' working directory: the pages name it so
SCREENSHOTS_ENV = "STOPPOINT_SCREENSHOTS"
WINDOW = (1400, 900)
WAIT = 30  # seconds: any one wait on a page or a process; only reached when something is broken
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)
STALE = (StaleElementReferenceException, NoSuchElementException, ElementClickInterceptedException)
URL_LINE = r"^stoppoint ui: serving .+ at (http://127\.0\.0\.1:\d+/)$"

T = TypeVar("T")


# -- processes -----------------------------------------------------------------------------------------------


class Child:
    """A `python -m stoppoint ...` child: its stdout lines read by a thread into a queue (so every wait on them
    is bounded), its stderr kept for failure messages."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stoppoint", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._out, daemon=True),
            threading.Thread(target=self._err, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _err(self) -> None:
        assert self.proc.stderr is not None
        self.err.extend(self.proc.stderr)

    def expect(self, pattern: str) -> re.Match[str]:
        """Read lines until one matches `pattern` (at most WAIT seconds)."""
        end = time.monotonic() + WAIT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"stoppoint {self.args[0]}: no line matching {pattern!r} in {WAIT} s; {self.said()}")
            if line is None:
                pytest.fail(f"stoppoint {self.args[0]}: ended without {pattern!r}; {self.said()}")
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def said(self) -> str:
        return f"stdout {self.seen}, stderr {''.join(self.err)!r}"

    def stop(self) -> int:
        """SIGTERM (a graceful stop), then wait for the exit, killing the child if it outlives WAIT; its exit
        code. Again after it ended: the same code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)
        for reader in self.readers:
            reader.join(WAIT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


@contextmanager
def child(*args: str, cwd: Path) -> Iterator[Child]:
    """A child for the block; stopped (SIGTERM, then waited for) when it ends, however it ends."""
    started = Child(list(args), cwd)
    try:
        yield started
    finally:
        started.stop()


def serve(stack: ExitStack, cwd: Path, *extra: str) -> tuple[Child, str]:
    """`stoppoint ui --port 0` over cwd's STORE, for the stack's life; the child and its address (its first line)."""
    ui = stack.enter_context(child("ui", "--port", "0", "--store", STORE, *extra, cwd=cwd))
    return ui, ui.expect(URL_LINE).group(1)


def stoppoint(*args: str, cwd: Path) -> str:
    """Run a `stoppoint` command over cwd's STORE to its end (bounded); its stdout, after checking it succeeded."""
    done = subprocess.run(
        [sys.executable, "-m", "stoppoint", *args, "--store", STORE],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        cwd=cwd,
    )
    assert done.returncode == 0, f"stoppoint {' '.join(args)}: exit {done.returncode}, {done.stderr}"
    return done.stdout


def submit(cwd: Path, target: str, run_id: str, *inputs: str, queue_name: str | None = None) -> None:
    words = [f"{FLOWS}:{target}", "--run-id", run_id]
    words += [word for given in inputs for word in ("--input", given)]
    words += ["--queue", queue_name] if queue_name is not None else []
    assert stoppoint("submit", *words, cwd=cwd).startswith(f"run {run_id} of flow {target} queued in ")


def load(cwd: Path, flow: str, run_id: str) -> sp.StoredRun:
    """The run as cwd's STORE has it now, read from this process."""

    async def read() -> sp.StoredRun | None:
        async with sp.SQLiteStore(cwd / STORE) as store:
            return await store.load(flow, run_id)

    stored = anyio.run(read)
    assert stored is not None, f"no run {run_id} of flow {flow} in {cwd / STORE}"
    return stored


# -- the browser ---------------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless Chromium, in a fresh profile, its window WINDOW; quit after the test."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        why = f"no {' nor '.join(missing)}: apt-get install chromium chromium-driver"
        if in_ci():
            pytest.fail(f"{why} (in CI a missing browser is a failure, not a skip)", pytrace=False)
        pytest.skip(why)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        # The window's size is the page's (the viewport, what a screenshot shows) plus the browser's frame.
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        outer = driver.get_window_size()
        driver.set_window_size(WINDOW[0] + outer["width"] - inner[0], WINDOW[1] + outer["height"] - inner[1])
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        yield driver
    finally:
        driver.quit()


def until(driver: WebDriver, check: Callable[[WebDriver], T | None], what: str) -> T:
    """Wait (at most WAIT seconds) until `check(driver)` is truthy, checking every 0.1 s; its value. An element
    gone stale, or not there yet, between a find and its use only means: not yet."""
    try:
        value = WebDriverWait(driver, WAIT, poll_frequency=0.1, ignored_exceptions=STALE).until(check, message=what)
    except TimeoutException:
        print(f"the page at the timeout ({driver.current_url}):\n{driver.page_source}")
        raise
    assert value is not None  # until() returns a truthy value
    return value


def text(driver: WebDriver, css: str) -> str | None:
    """The text of the first element `css` finds, None if none."""
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else None


def attribute(driver: WebDriver, css: str, name: str) -> str | None:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].get_attribute(name) if found else None


def press(driver: WebDriver, button: str) -> None:
    """Click the button `#button` once it is enabled, found again at each try (the live parts are swapped)."""

    def click(driver: WebDriver) -> bool:
        element = driver.find_element(By.ID, button)
        if not element.is_enabled():
            return False
        element.click()
        return True

    until(driver, click, f"button #{button} enabled and clicked")


def progress_beyond(floor: int) -> Callable[[WebDriver], int | None]:
    """A check for `until`: the `turn` step's progress value, as its row shows it, once it is above `floor`."""

    def check(driver: WebDriver) -> int | None:
        shown = text(driver, 'tr.step[data-step="turn"] span.done')
        return int(shown) if shown and int(shown) > floor else None

    return check


def screenshot(driver: WebDriver, tmp_path: Path, name: str, *, docs: bool = True) -> None:
    """A screenshot into tmp_path, and, for the docs' (`docs`), into $STOPPOINT_SCREENSHOTS when set."""
    data = driver.get_screenshot_as_png()
    (tmp_path / name).write_bytes(data)
    directory = os.environ.get(SCREENSHOTS_ENV)
    if docs and directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / name).write_bytes(data)


def stopping_line() -> int:
    """The line of ui_flows.py's stopping point in `turn`."""
    lines = FLOWS.read_text().splitlines()
    found = [number for number, line in enumerate(lines, 1) if "await ctx.checkpoint()" in line]
    assert len(found) == 1, found
    return found[0]


# -- the tests -----------------------------------------------------------------------------------------------


def test_a_run_is_watched_interrupted_and_resumed_from_its_page(browser: WebDriver, tmp_path: Path) -> None:
    release = tmp_path / "release"
    with ExitStack() as stack:
        worker = stack.enter_context(child("worker", str(FLOWS), "--store", STORE, cwd=tmp_path))
        worker.expect(r"serving flows spin, publish from queues default ")
        ui, base = serve(stack, tmp_path)

        # Runs of each ending, for the runs list to look like one: completed (its release file is there at
        # once), failed, interrupted while it spun, queued (in a queue nobody serves), and then the one this
        # test watches, spinning at its stopping points.
        (tmp_path / "released").touch()
        submit(tmp_path, "spin", "spin-0408", f"release={tmp_path / 'released'}")
        worker.expect(r"ended run spin-0408 of flow spin: completed$")
        submit(tmp_path, "publish", "publish-0409", "pages=3")
        worker.expect(r"ended run publish-0409 of flow publish: failed")
        submit(tmp_path, "spin", "spin-0409", f"release={tmp_path / 'never'}")
        worker.expect(r"claimed run spin-0409 of flow spin ")
        stoppoint("interrupt", "spin-0409", "--reason", "the deploy window closed", cwd=tmp_path)
        worker.expect(r"ended run spin-0409 of flow spin: interrupted")
        submit(tmp_path, "publish", "publish-0410", "pages=5", queue_name="nightly")
        submit(tmp_path, "spin", "spin-0410", f"release={release}")

        browser.get(base)
        until(browser, lambda d: attribute(d, 'tr[data-run="spin-0410"]', "data-status") == "running", "running")
        statuses = {
            row.get_attribute("data-run"): row.get_attribute("data-status")
            for row in browser.find_elements(By.CSS_SELECTOR, "tr[data-run]")
        }
        assert statuses == {
            "spin-0410": "running",
            "publish-0410": "queued",
            "spin-0409": "interrupted",
            "publish-0409": "failed",
            "spin-0408": "completed",
        }
        screenshot(browser, tmp_path, "ui-runs.png")

        link = 'tr[data-run="spin-0410"] a.run-link'
        until(browser, lambda d: d.find_element(By.CSS_SELECTOR, link), "the run's link").click()
        until(browser, lambda d: attribute(d, "#run-status", "data-status") == "running", "the run's page")
        assert browser.current_url == f"{base}run?flow=spin&id=spin-0410"

        # Its progress moves, without a reload: the page keeps what a script set on it.
        browser.execute_script("window.__marker = 1")
        first = until(browser, progress_beyond(0), "progress shown")
        until(browser, progress_beyond(first), f"progress beyond {first}")
        assert browser.execute_script("return window.__marker") == 1, "the page reloaded"
        assert text(browser, "#connection") == "live"
        assert attribute(browser, 'tr.step[data-step="prepare"]', "data-status") == "completed"
        assert attribute(browser, 'tr.step[data-step="finish"]', "data-status") == "pending"
        screenshot(browser, tmp_path, "ui-run.png")

        # Interrupt: the run stops at its stopping point, and its page says where.
        press(browser, "interrupt")
        # Its note (class ok): "asked its owner", or, when the worker stopped the run before the page looked
        # again, "marked interrupted" (the dashboard tells the two apart by the run's state after the request).
        until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#said.ok"), "the interrupt's note")
        until(browser, lambda d: attribute(d, "#run-status", "data-status") == "interrupted", "interrupted")
        where = f"ui_flows.py:{stopping_line()}"
        until(browser, lambda d: text(d, 'tr.step[data-step="turn"] .stopped-at') == f"stopped at {where}", where)
        assert attribute(browser, 'tr.step[data-step="turn"]', "data-status") == "interrupted"
        assert "interrupted from the dashboard" in (text(browser, 'section[data-part="interrupts"]') or "")
        worker.expect(r"ended run spin-0410 of flow spin: interrupted \(interrupted from the dashboard\)$")
        screenshot(browser, tmp_path, "ui-run-interrupted.png", docs=False)

        stored = load(tmp_path, "spin", "spin-0410")
        assert (stored.record.status, stored.record.owner) == (sp.RunStatus.INTERRUPTED, None)
        turn = sp.RunReport.model_validate_json(stored.report_json).steps["turn"]
        assert (turn.status, turn.stopped_at) == (sp.StepStatus.INTERRUPTED, where)
        turns = spin.load_checkpoint(stored.checkpoint_json).progress["turn"]  # what it saved last
        assert isinstance(turns, int)
        assert turns > first
        assert turn.progress is not None
        assert turn.progress.done == turns

        # Resume, with the release file there: the worker claims it, `turn` goes on from its saved count (and
        # ends at once), and the run completes.
        release.touch()
        press(browser, "resume")
        until(browser, lambda d: "Queued" in (text(d, "#said") or ""), "the resume's note")
        until(browser, lambda d: attribute(d, "#run-status", "data-status") == "completed", "completed")
        steps = {
            row.get_attribute("data-step"): row.get_attribute("data-status")
            for row in browser.find_elements(By.CSS_SELECTOR, "tr.step")
        }
        assert steps == {"prepare": "completed", "turn": "completed", "finish": "completed"}
        until(browser, lambda d: not d.find_element(By.ID, "interrupt").is_enabled(), "interrupt disabled")
        assert not browser.find_element(By.ID, "resume").is_enabled()
        worker.expect(r"claimed run spin-0410 of flow spin \(epoch 2, was queued\)$")
        worker.expect(r"ended run spin-0410 of flow spin: completed$")
        screenshot(browser, tmp_path, "ui-run-completed.png", docs=False)

        shown = json.loads(stoppoint("show", "spin-0410", "--json", cwd=tmp_path))
        assert (shown["status"], shown["epoch"], shown["owner"]) == ("completed", 2, None)
        outputs = spin.load_checkpoint(load(tmp_path, "spin", "spin-0410").checkpoint_json).outputs
        assert outputs["turn"] == turns  # went on from the saved count (a fresh one would be 0)
        assert outputs["finish"] == f"released after {turns} turns"

        assert worker.stop() == 0, worker.said()
        assert ui.stop() == 0, ui.said()


def test_with_a_token_a_page_needs_it_once_and_its_buttons_work(browser: WebDriver, tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    assert len(token) == 32
    submit(tmp_path, "spin", "spin-1", f"release={tmp_path / 'release'}")  # queued: no worker here
    with ExitStack() as stack:
        ui, base = serve(stack, tmp_path, "--host", "127.0.0.1", "--token", token)

        # Without the token: refused, in the browser and to any other client.
        browser.get(base)
        until(browser, lambda d: text(d, "h1") == "Token required", "the refusal")
        assert "?token=TOKEN" in (text(browser, "p.error") or "")
        assert not browser.find_elements(By.CSS_SELECTOR, "tr[data-run]")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base, timeout=WAIT)
        with refused.value:  # its response: closed
            assert refused.value.code == 401

        # With it once: the runs list, the token out of the address, kept in a cookie.
        browser.get(f"{base}?token={token}")
        until(browser, lambda d: attribute(d, 'tr[data-run="spin-1"]', "data-status") == "queued", "the runs list")
        assert browser.current_url == base
        cookie = browser.get_cookie(f"stoppoint_token_{urllib.parse.urlsplit(base).port}")  # named after the port
        assert cookie is not None
        assert (cookie["value"], cookie["httpOnly"]) == (token, True)

        # Pages and buttons work with the cookie alone.
        browser.find_element(By.CSS_SELECTOR, 'tr[data-run="spin-1"] a.run-link').click()
        until(browser, lambda d: attribute(d, "#run-status", "data-status") == "queued", "the run's page")
        press(browser, "interrupt")
        until(browser, lambda d: "marked interrupted" in (text(d, "#said") or ""), "the interrupt's note")
        assert attribute(browser, "#run-status", "data-status") == "interrupted"
        assert "token" not in browser.current_url
        assert load(tmp_path, "spin", "spin-1").record.status is sp.RunStatus.INTERRUPTED
        # The live updates carry the cookie too: each one that succeeds says so on the badge again.
        browser.execute_script("document.getElementById('connection').textContent = 'checking'")
        until(browser, lambda d: text(d, "#connection") == "live", "a live update")

        assert ui.stop() == 0, ui.said()
