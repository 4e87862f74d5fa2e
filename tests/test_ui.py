"""The dashboard (`sp.dashboard(store)`, `stoppoint/_ui.py` and `_ui_guard.py`): its pages over every store, on
both backends, with real runs (running, queued, orphaned, interrupted, failed, completed), its buttons, and its
guard (token, loopback rule, CSRF, security headers). `tests/test_cli_ui.py` serves it with `stoppoint ui`.

The app is driven in-process through httpx's ASGI transport; its pages are parsed (`parse`) so that the tests
read what a browser shows, cell by cell. The order of things comes from the runs' own steps (anyio events they
set or wait on) or, for what a background task of the run writes on its own clock (a progress write, a run's
end stored by a worker), from a bounded poll (`until`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import stoppoint as sp
import stoppoint._persist
from stoppoint._flow import plan_of
from stoppoint._launch import new_state
from stoppoint._ui import INTERRUPT_REASON
from stoppoint._ui_guard import CSRF_COOKIE as CSRF_PREFIX
from stoppoint._ui_guard import TOKEN_COOKIE as TOKEN_PREFIX
from stoppoint._ui_guard import is_loopback
from stoppoint._ui_html import SAID
from stoppoint.testing import interrupt_at

from .conftest import a_then_b, line_after, until
from .hooks import BasicOnly

pytestmark = pytest.mark.anyio

BASE = "http://127.0.0.1:8765"
TOKEN_COOKIE = f"{TOKEN_PREFIX}_8765"  # cookies are named after the port the browser addressed
CSRF_COOKIE = f"{CSRF_PREFIX}_8765"
TOKEN = "s3cret-token-for-the-dashboard"
HANG = 10  # seconds; only reached when something hangs
HOSTILE = '<script>alert("x")</script>&\'<b>'
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


# -- reading pages as a browser shows them ------------------------------------------------------------------

VOID = {"meta", "link", "input", "br", "img", "hr"}


@dataclass
class Node:
    """An element of a parsed page (or its root, `#root`)."""

    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        """The text inside it, as shown (entities decoded), whitespace collapsed."""
        parts: list[str] = []

        def walk(node: Node) -> None:
            for child in node.children:
                if isinstance(child, str):
                    parts.append(child)
                else:
                    walk(child)

        walk(self)
        return " ".join("".join(parts).split())

    def all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Every element inside it of that tag (any: None) whose attributes have those values (`data_part=`
        for `data-part`; `class_=` for one of its classes)."""
        wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attrs.items()}
        found: list[Node] = []

        def matches(node: Node) -> bool:
            for name, value in wanted.items():
                have = node.attrs.get(name)
                if name == "class":
                    if value not in (have or "").split():
                        return False
                elif have != value:
                    return False
            return tag is None or node.tag == tag

        def walk(node: Node) -> None:
            for child in node.children:
                if isinstance(child, Node):
                    if matches(child):
                        found.append(child)
                    walk(child)

        walk(self)
        return found

    def one(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}> found"
        return found[0]

    def elements(self) -> list[Node]:
        return [child for child in self.children if isinstance(child, Node)]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    """The page's elements; every element it opens must be closed in order (a text that was not escaped
    would open or close elements of its own)."""
    builder = _Builder()
    builder.feed(html)
    builder.close()
    assert builder.stack == [builder.root], f"unclosed elements: {[node.tag for node in builder.stack[1:]]}"
    return builder.root


def rows_by(doc: Node, attribute: str) -> dict[str, Node]:
    """The table rows with `attribute` (`data-run`, `data-step`), by its value."""
    found = {}
    for row in doc.all("tr"):
        key = row.attrs.get(attribute)
        if key is not None:
            assert key not in found, f"two rows {attribute}={key!r}"
            found[key] = row
    return found


def cells(row: Node) -> list[str]:
    return [cell.text() for cell in row.all("td")]


RUN_COLUMNS = ("status", "flow", "run", "owner", "lease", "epoch", "queue", "started", "updated", "finished")
STEP_COLUMNS = ("step", "status", "timeline", "progress", "started", "finished", "duration", "attempts", "note")


def runs_shown(doc: Node) -> dict[str, dict[str, str]]:
    """The runs list's rows, by run id: each column's text."""
    return {run_id: dict(zip(RUN_COLUMNS, cells(row), strict=True)) for run_id, row in rows_by(doc, "data-run").items()}


def steps_shown(doc: Node) -> dict[str, dict[str, str]]:
    """The run page's step rows, by step name: each column's text, and `depth` (0: the run's own steps)."""
    shown = {}
    for name, row in rows_by(doc, "data-step").items():
        shown[name] = dict(zip(STEP_COLUMNS, cells(row), strict=True))
        shown[name]["depth"] = next(c for c in (row.attrs["class"] or "").split() if c.startswith("depth-"))[6:]
    return shown


def head_shown(doc: Node) -> dict[str, str]:
    """The run page's head table: `status`, `owner`, `lease`, ..., `label KEY`."""
    table = doc.one("section", data_part="head").one("table")
    return {row.one("th").text(): row.one("td").text() for row in table.all("tr")}


def events_shown(doc: Node) -> list[tuple[str, str, str]]:
    """The run page's events, newest first: (event, step, detail)."""
    found = []
    for row in doc.one("section", data_part="events").all("tr"):
        if "data-event" in row.attrs:
            _, event, step, detail = cells(row)
            assert event == row.attrs["data-event"]
            found.append((event, step, detail))
    return found


def buttons(doc: Node) -> dict[str, bool]:
    """The run page's buttons, by action: whether each is enabled."""
    return {button.attrs["id"] or "": "disabled" not in button.attrs for button in doc.all("button", class_="action")}


def scripts(doc: Node) -> list[dict[str, str | None]]:
    return [node.attrs for node in doc.all("script")]


# -- driving the app ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def client(app: Any, base_url: str = BASE, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app, keeping its cookies as a browser does."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url, **options) as http:
        yield http


async def page(http: httpx.AsyncClient, path: str = "/", **params: str) -> Node:
    response = await http.get(path, params=params or None)  # params={} would drop the path's own query
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    return parse(response.text)


async def run_page(http: httpx.AsyncClient, flow: str, run_id: str, prefix: str = "") -> Node:
    return await page(http, f"{prefix}/run", flow=flow, id=run_id)


async def form_of(http: httpx.AsyncClient, action: str, flow: str, run_id: str, prefix: str = "") -> dict[str, str]:
    """The fields of a button's form, as the run's page has them (reading the page sets its CSRF cookie)."""
    doc = await run_page(http, flow, run_id, prefix)
    form = doc.one("form", action=f"{prefix}/run/{action}")
    assert form.attrs["method"] == "post"
    return {node.attrs["name"] or "": node.attrs["value"] or "" for node in form.all("input")}


def said_of(response: httpx.Response, flow: str, run_id: str, prefix: str = "") -> str:
    """What a button's 303 says it did (`said=` of its run page's address)."""
    assert response.status_code == 303, response.text
    location = urlsplit(response.headers["location"])
    assert location.path == f"{prefix}/run"
    query = parse_qs(location.query)
    assert (query["flow"], query["id"]) == ([flow], [run_id])
    return query["said"][0]


async def press(http: httpx.AsyncClient, action: str, flow: str, run_id: str, prefix: str = "") -> str:
    """Press a button of the run's page as a browser does (read the page, post its form); what it says it did."""
    fields = await form_of(http, action, flow, run_id, prefix)
    response = await http.post(f"{prefix}/run/{action}", data=fields)
    return said_of(response, flow, run_id, prefix)


async def stored_status(store: sp.BasicStore, flow: str, run_id: str) -> sp.RunStatus:
    stored = await store.load(flow, run_id)
    assert stored is not None
    return stored.record.status


async def stored_report(store: sp.BasicStore, flow: str, run_id: str) -> sp.RunReport:
    stored = await store.load(flow, run_id)
    assert stored is not None
    return sp.RunReport.model_validate_json(stored.report_json)


# -- flows ----------------------------------------------------------------------------------------------------


@dataclass
class Held:
    """What the `held` flow's step tells the test."""

    waiting: anyio.Event
    tries: list[int] = field(default_factory=list)  # the claim number (ctx.epoch) of each try of `wait`
    line: int = 0  # the line of the stopping point where its first try stops


def held_flow(name: str = "held") -> tuple[sp.Flow, Held]:
    """Flow `name`: `first` returns 1; then `wait`, whose first try reports progress 1/2, sets `waiting`, and waits
    until its run is asked to stop, to stop at its stopping point (`line`); a later try (a resume) returns 2."""
    flow = sp.Flow(name)
    held = Held(anyio.Event())

    @flow.step
    async def first() -> int:
        return 1

    @flow.step
    async def wait(ctx: sp.StepContext, first: int) -> int:
        held.tries.append(ctx.epoch)
        if len(held.tries) > 1:
            return first + 1
        ctx.progress(1, 2, "waiting to be stopped")
        held.waiting.set()
        with anyio.fail_after(HANG):
            # set by the run's task that receives the store's interrupts (no event tells it to the step)
            while not ctx.stop_requested:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        held.line = line_after()
        await ctx.checkpoint()
        raise AssertionError("the stopping point did not stop the step")

    return flow, held


def asleep_flow() -> tuple[sp.Flow, anyio.Event]:
    """Flow `asleep`: one step, `nap`, without stopping points: only a forced stop ends it (set: it started)."""
    flow = sp.Flow("asleep")
    started = anyio.Event()

    @flow.step
    async def nap() -> None:
        started.set()
        with anyio.fail_after(HANG):
            await anyio.sleep_forever()

    return flow, started


async def wait_for(event: anyio.Event) -> None:
    with anyio.fail_after(HANG):
        await event.wait()


async def orphan(store: sp.Store, run_id: str) -> None:
    """Store a run of `ab` claimed by an owner that gave it up without ending it: orphaned."""
    claim = await store.claim("ab", run_id, "ghost:1/dead", new=new_state(plan_of(a_then_b([])), run_id, {}))
    assert claim is not None
    assert claim.lease is not None
    await store.release(claim.lease)


# -- the runs list --------------------------------------------------------------------------------------------


async def test_the_runs_list_shows_each_run_with_its_owner_and_lease_and_filters_them(store: sp.Store) -> None:
    app = sp.dashboard(store)
    async with client(app) as http:
        empty = await page(http)
        assert runs_shown(empty) == {}
        assert empty.one("section", data_part="runs").one("td").text() == "no runs"
        assert empty.one(id="run-count").text() == "0"

        await a_then_b([]).run(store=store, run_id="done")
        await a_then_b([]).run(store=store, run_id="stopped", interrupts=interrupt_at("b"))
        await a_then_b([]).submit(store, run_id="waiting", queue="later")
        await orphan(store, "ghost")
        flow, held = held_flow()
        async with anyio.create_task_group() as tg:
            handle = await flow.start(tg, store=store, run_id="busy")
            await wait_for(held.waiting)

            doc = await page(http)
            shown = runs_shown(doc)
            busy = await store.load("held", "busy")
            assert busy is not None
            assert busy.record.owner is not None
            assert shown["busy"]["owner"] == busy.record.owner
            assert re.fullmatch(r"\S+:\d+/\w+", shown["busy"]["owner"])
            assert re.fullmatch(r"in \d+ s", shown["busy"]["lease"]), shown["busy"]
            assert {run_id: row["status"] for run_id, row in shown.items()} == {
                "done": "completed",
                "stopped": "interrupted",
                "waiting": "queued",
                "ghost": "orphaned",
                "busy": "running",
            }
            assert {run_id: (row["flow"], row["epoch"], row["queue"]) for run_id, row in shown.items()} == {
                "done": ("ab", "1", "-"),
                "stopped": ("ab", "1", "-"),
                "waiting": ("ab", "0", "later"),
                "ghost": ("ab", "1", "-"),
                "busy": ("held", "1", "-"),
            }
            for run_id in ("done", "stopped", "waiting", "ghost"):
                assert (shown[run_id]["owner"], shown[run_id]["lease"]) == ("-", "-")
            assert shown["waiting"]["finished"] == shown["busy"]["finished"] == "-"
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", shown["done"]["finished"])
            assert doc.one(id="run-count").text() == "5"
            link = rows_by(doc, "data-run")["busy"].one("a", class_="run-link")
            assert link.attrs["href"] == "/run?flow=held&id=busy"
            assert [option.attrs["value"] for option in doc.one("select", name="flow").all("option")] == [
                "",
                "ab",
                "held",
            ]

            assert set(runs_shown(await page(http, flow="held"))) == {"busy"}
            assert set(runs_shown(await page(http, status="running"))) == {"busy"}
            assert set(runs_shown(await page(http, status="queued"))) == {"waiting"}
            assert set(runs_shown(await page(http, flow="ab", status="running"))) == set()
            filtered = await page(http, flow="ab", status="orphaned")
            assert set(runs_shown(filtered)) == {"ghost"}
            selected = [option.attrs["value"] for option in filtered.all("option") if "selected" in option.attrs]
            assert selected == ["ab", "orphaned"]  # the filters stay as chosen
            assert set(runs_shown(await page(http, flow="", status=""))) == set(shown)  # "all"
            assert set(runs_shown(await page(http, flow="nothing"))) == set()

            handle.interrupt()
            assert isinstance(await handle.outcome(), sp.Interrupted)

        bad = await http.get("/", params={"status": "lost"})
        assert bad.status_code == 400
        assert "status &#x27;lost&#x27;: expected one of queued, running, orphaned" in bad.text
        bad_live = await http.get("/", params={"status": "lost", "part": "live"})
        assert bad_live.status_code == 400
        assert bad_live.headers["content-type"].startswith("text/plain")
        assert bad_live.text.startswith("status 'lost': expected one of ")


async def test_an_owner_that_died_shows_with_its_expired_lease() -> None:
    store = sp.MemoryStore(lease=0.05)
    claim = await store.claim("ab", "o1", "ghost:1/dead", new=new_state(plan_of(a_then_b([])), "o1", {}))
    assert claim is not None

    async def orphaned() -> bool:  # its lease expires on the store's clock
        return await stored_status(store, "ab", "o1") is sp.RunStatus.ORPHANED

    await until(orphaned)
    async with client(sp.dashboard(store)) as http:
        row = runs_shown(await page(http))["o1"]
        assert (row["status"], row["owner"], row["epoch"]) == ("orphaned", "ghost:1/dead", "1")
        assert re.fullmatch(r"expired \d+ s ago", row["lease"]), row
        doc = await run_page(http, "ab", "o1")
        head = head_shown(doc)
        assert (head["status"], head["owner"]) == ("orphaned", "ghost:1/dead")
        assert re.fullmatch(r"expired \d+ s ago", head["lease"])
        assert buttons(doc) == {"interrupt": True, "force": True, "resume": True}
        assert steps_shown(doc)["a"]["status"] == "pending"
        assert await press(http, "resume", "ab", "o1") == "resume"  # its owner is gone: a worker may take it
    stored = await store.load("ab", "o1")
    assert stored is not None
    assert (stored.record.status, stored.record.owner, stored.record.queue) == (sp.RunStatus.QUEUED, None, "default")


async def test_the_list_of_runs_is_newest_first_and_its_live_part_is_the_pages(store: sp.Store) -> None:
    for run_id in ("one", "two", "three"):
        await a_then_b([]).run(store=store, run_id=run_id)
    app = sp.dashboard(store)
    async with client(app) as http:
        response = await http.get("/")
        assert list(runs_shown(parse(response.text))) == ["three", "two", "one"]
        live = await http.get("/", params={"part": "live"})
        assert live.status_code == 200
        assert not live.text.lstrip().startswith("<!doctype")
        fragment = parse(live.text)
        assert [node.attrs.get("data-part") for node in fragment.elements()] == ["filters", "runs"]
        assert not fragment.all("html")
        assert not fragment.all("script")
        # What the page's script swaps in: the page's own live part, as it was.
        main = re.search(r'<main id="live"[^>]*>(.*)</main>', response.text, re.DOTALL)
        assert main is not None
        assert main.group(1) == live.text


# -- a run's page ---------------------------------------------------------------------------------------------


def failing_flow(tries: list[int]) -> sp.Flow:
    """Flow `fails`: `flaky` (retried: fails twice, then returns 1), `nested` (the flow `inner`, one step `deep`),
    `broken` (retried: always fails), `never` (after `broken`: never starts). The texts are hostile HTML."""
    inner = sp.Flow("inner")

    @inner.step
    async def deep() -> int:
        return 1

    flow = sp.Flow("fails")

    @flow.step(retry=sp.Retry(attempts=3, delay=0))
    async def flaky(ctx: sp.StepContext) -> int:
        tries.append(1)
        ctx.progress(len(tries), 3, f"try {len(tries)} {HOSTILE}")
        if len(tries) < 3:
            raise ValueError(f"flaky {len(tries)} {HOSTILE}")
        return 1

    flow.include(inner, name="nested", after="flaky")

    @flow.step(retry=sp.Retry(attempts=2, delay=0))
    async def broken(nested: int) -> int:
        raise RuntimeError(f"broken {HOSTILE}")

    @flow.step
    async def never(broken: int) -> int:
        return broken

    return flow


async def test_a_run_page_shows_its_steps_as_a_timeline_its_events_and_labels_escaped(store: sp.Store) -> None:
    run_id = f"run {HOSTILE}"
    with pytest.raises(sp.StepFailed):
        await failing_flow([]).run(store=store, run_id=run_id)
    assert isinstance(store, sp.LabelStore)
    await store.set_labels("fails", run_id, {"team": HOSTILE})
    app = sp.dashboard(store)
    async with client(app) as http:
        response = await http.get("/run", params={"flow": "fails", "id": run_id})
        assert response.status_code == 200
        assert "<script>alert" not in response.text
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&lt;b&gt;" in response.text
        doc = parse(response.text)  # every hostile text escaped: no element of its own
        assert scripts(doc) == [{"src": "/static/dashboard.js", "defer": None}]
        assert not doc.all("b")
        assert doc.one("title").text() == f"fails {run_id} · stoppoint"
        assert doc.one("h1").text() == f"Run {run_id} of flow fails"

        head = head_shown(doc)
        assert (head["status"], head["owner"], head["lease"], head["epoch"], head["queue"]) == (
            "failed",
            "-",
            "-",
            "1",
            "-",
        )
        assert head["label team"] == HOSTILE
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", head["finished"])
        assert buttons(doc) == {"interrupt": False, "force": False, "resume": True}

        steps = steps_shown(doc)
        assert list(steps) == ["flaky", "nested", "deep", "broken", "never"]
        assert {name: (step["status"], step["depth"], step["attempts"]) for name, step in steps.items()} == {
            "flaky": ("completed", "0", "3"),
            "nested": ("completed", "0", "1"),
            "deep": ("completed", "1", "1"),
            "broken": ("failed", "0", "2"),
            "never": ("not started", "0", ""),
        }
        assert steps["flaky"]["progress"] == f"3/3 try 3 {HOSTILE}"
        rows = rows_by(doc, "data-step")
        flaky_errors = rows["flaky"].one("details", class_="errors")
        assert flaky_errors.one("summary").text() == "2 failed attempts"
        assert [item.text() for item in flaky_errors.all("li")] == [
            f"ValueError: flaky 1 {HOSTILE}",
            f"ValueError: flaky 2 {HOSTILE}",
        ]
        assert rows["broken"].one("span", class_="error").text() == f"RuntimeError: broken {HOSTILE}"
        assert len(rows["broken"].one("details", class_="errors").all("li")) == 2
        assert rows["flaky"].one("progress").attrs == {"max": "3", "value": "3"}
        assert "depth-1" in (rows["deep"].attrs["class"] or "")
        for name in ("flaky", "nested", "deep", "broken"):
            assert len(rows[name].all("rect")) == 1, name  # a bar on the timeline
            assert re.fullmatch(r"\d+\.\d\d s", steps[name]["duration"])
        assert rows["never"].all("rect") == []
        assert steps["never"]["started"] == steps["never"]["finished"] == "-"

        events = events_shown(doc)
        assert events[0][:2] == ("flow.failed", "broken")
        assert re.fullmatch(rf"StepFailed: .*: RuntimeError: broken {re.escape(HOSTILE)} \(\d+\.\d\d s\)", events[0][2])
        assert events[-1] == ("flow.started", "", "")
        assert [event for event in events if event[0] == "step.retrying"] == [
            ("step.retrying", "broken", f"attempt 1 failed (RuntimeError: broken {HOSTILE}), next in 0.00 s"),
            ("step.retrying", "flaky", f"attempt 2 failed (ValueError: flaky 2 {HOSTILE}), next in 0.00 s"),
            ("step.retrying", "flaky", f"attempt 1 failed (ValueError: flaky 1 {HOSTILE}), next in 0.00 s"),
        ]
        assert ("step.completed", "inner.deep") in [event[:2] for event in events]  # a nested flow's step
        assert doc.one("section", data_part="events").one("span", class_="count").text() == str(len(events))

        # A crafted link cannot make the page say anything: `said=` takes codes only.
        crafted = await page(http, "/run", flow="fails", id=run_id, said=HOSTILE)
        assert crafted.all(id="said") == []

        # In the list: the hostile id is text, and its link carries it (encoded) to the run's page.
        listed = await page(http)
        row = rows_by(listed, "data-run")[run_id]
        link = row.one("a", class_="run-link")
        assert link.text() == run_id
        assert parse_qs(urlsplit(link.attrs["href"] or "").query) == {"flow": ["fails"], "id": [run_id]}
        assert not listed.all("b")


async def test_the_live_part_is_a_fragment_that_follows_a_running_run(
    store: sp.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stoppoint._persist, "PROGRESS_INTERVAL", 0.01)  # a running step's progress write
    monkeypatch.setattr(stoppoint._persist, "EVENTS_INTERVAL", 0.01)
    flow = sp.Flow("counting")
    go = [anyio.Event() for _ in range(3)]

    @flow.step
    async def count(ctx: sp.StepContext) -> int:
        for done in range(1, 4):
            ctx.progress(done, 3, f"item {done}")
            with anyio.fail_after(HANG):
                await go[done - 1].wait()
        return 3

    app = sp.dashboard(store)
    async with client(app) as http:
        live_params = {"flow": "counting", "id": "c1", "part": "live", "progress": "1"}

        async def live() -> Node:
            response = await http.get("/run", params=live_params)
            assert response.status_code == 200
            assert not response.text.lstrip().startswith("<!doctype")
            return parse(response.text)

        async def progress_is(expected: str) -> bool:
            return steps_shown(await live())["count"]["progress"] == expected

        async def first_progress_event_shown() -> bool:
            return ("step.progress", "count", "1/3 item 1") in events_shown(await live())

        async with anyio.create_task_group() as tg:
            handle = await flow.start(tg, store=store, run_id="c1")
            await until(first_progress_event_shown)  # the run's history, appended while it runs
            for done in range(1, 4):
                await until(functools.partial(progress_is, f"{done}/3 item {done}"))
                fragment = await live()
                assert head_shown(fragment)["status"] == "running"
                assert steps_shown(fragment)["count"]["status"] == "running"
                assert fragment.one("progress").attrs == {"max": "3", "value": str(done)}
                go[done - 1].set()
            assert isinstance(await handle.outcome(), sp.Completed)

        fragment = await live()
        assert [node.attrs.get("data-part") for node in fragment.elements()] == [
            "head",
            "actions",
            "steps",
            "interrupts",
            "attempts",
            "events",
            "flow-version",
        ]
        assert not fragment.all("html")
        assert not fragment.all("script")
        assert head_shown(fragment)["status"] == "completed"
        assert steps_shown(fragment)["count"]["progress"] == "3/3 item 3"
        progress = [detail for name, _, detail in events_shown(fragment) if name == "step.progress"]
        assert progress[-1] == "1/3 item 1"  # newest first
        assert progress[0] == "3/3 item 3"
        # The page's live part is this fragment (the script swaps its pieces in).
        response = await http.get("/run", params={"flow": "counting", "id": "c1", "progress": "1"})
        main = re.search(r'<main id="live"[^>]*>(.*)</main>', response.text, re.DOTALL)
        assert main is not None
        assert main.group(1) == (await http.get("/run", params=live_params)).text


async def test_a_run_page_needs_an_existing_run(store: sp.Store) -> None:
    await a_then_b([]).run(store=store, run_id="r1")
    app = sp.dashboard(store)
    async with client(app) as http:
        for params in ({}, {"flow": "ab"}, {"id": "r1"}, {"flow": "", "id": "r1"}):
            response = await http.get("/run", params=params)
            assert response.status_code == 400, params
            assert "expected ?flow=FLOW&amp;id=RUN_ID" in response.text
        missing = await http.get("/run", params={"flow": "ab", "id": "nope"})
        assert missing.status_code == 404
        assert parse(missing.text).one("h1").text() == "No such run"
        assert "no run &#x27;nope&#x27; of flow &#x27;ab&#x27;" in missing.text
        other_flow = await http.get("/run", params={"flow": "other", "id": "r1"})
        assert other_flow.status_code == 404
        live = await http.get("/run", params={"flow": "ab", "id": "nope", "part": "live"})
        assert live.status_code == 404
        assert live.headers["content-type"].startswith("text/plain")


# -- the buttons ----------------------------------------------------------------------------------------------


async def test_interrupt_stops_a_running_run_at_its_stopping_point(store: sp.Store) -> None:
    flow, held = held_flow()
    app = sp.dashboard(store)
    async with client(app) as http, anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r1")
        await wait_for(held.waiting)
        doc = await run_page(http, "held", "r1")
        assert head_shown(doc)["status"] == "running"
        assert buttons(doc) == {"interrupt": True, "force": True, "resume": False}

        response = await http.post("/run/interrupt", data=await form_of(http, "interrupt", "held", "r1"))
        assert said_of(response, "held", "r1") == "interrupt"
        said = await page(http, response.headers["location"])
        assert said.one(id="said").text() == SAID["interrupt"][1]
        outcome = await handle.outcome()

    assert isinstance(outcome, sp.Interrupted)
    assert not outcome.forced
    assert (outcome.signal.reason, outcome.signal.source, outcome.signal.force) == (INTERRUPT_REASON, "ui", False)
    async with client(app) as http:
        doc = await run_page(http, "held", "r1")
    assert head_shown(doc)["status"] == "interrupted"
    assert buttons(doc) == {"interrupt": False, "force": False, "resume": True}
    steps = steps_shown(doc)
    assert (steps["first"]["status"], steps["wait"]["status"]) == ("completed", "interrupted")
    assert steps["wait"]["note"] == f"stopped at test_ui.py:{held.line}"
    assert steps["wait"]["progress"] == "1/2 waiting to be stopped"
    interrupts = doc.one("section", data_part="interrupts")
    assert [cells(row)[1:] for row in interrupts.one("tbody").all("tr")] == [[INTERRUPT_REASON, "graceful", "ui"]]
    assert doc.all(id="said") == []  # said once, on the page the button leads to


async def test_force_cancels_the_steps_in_flight(store: sp.Store) -> None:
    flow, started = asleep_flow()
    app = sp.dashboard(store)
    async with client(app) as http, anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r1")
        await wait_for(started)
        assert await press(http, "force", "asleep", "r1") == "force"
        outcome = await handle.outcome()
        assert isinstance(outcome, sp.Interrupted)
        assert outcome.forced
        doc = await run_page(http, "asleep", "r1")
    assert head_shown(doc)["status"] == "interrupted"
    assert steps_shown(doc)["nap"]["status"] == "cancelled"
    interrupts = doc.one("section", data_part="interrupts")
    assert [cells(row)[1:] for row in interrupts.one("tbody").all("tr")] == [[INTERRUPT_REASON, "forced", "ui"]]


async def test_interrupt_marks_a_queued_or_orphaned_run_interrupted_at_once(store: sp.Store) -> None:
    await a_then_b([]).submit(store, run_id="queued")
    await orphan(store, "ghost")
    app = sp.dashboard(store)
    async with client(app) as http:
        for run_id in ("queued", "ghost"):
            assert buttons(await run_page(http, "ab", run_id)) == {
                "interrupt": True,
                "force": True,
                "resume": run_id == "ghost",
            }
            assert await press(http, "interrupt", "ab", run_id) == "marked"
            assert await stored_status(store, "ab", run_id) is sp.RunStatus.INTERRUPTED
            doc = await run_page(http, "ab", run_id)
            assert head_shown(doc)["status"] == "interrupted"
            assert buttons(doc) == {"interrupt": False, "force": False, "resume": True}
            report = await stored_report(store, "ab", run_id)
            assert [(signal.reason, signal.source) for signal in report.interrupts] == [(INTERRUPT_REASON, "ui")]
            # Nothing to stop any more.
            assert await press(http, "interrupt", "ab", run_id) == "nothing"
            assert await press(http, "force", "ab", run_id) == "nothing"
        page_said = await page(http, "/run", flow="ab", id="ghost", said="nothing")
        assert page_said.one(id="said").text() == SAID["nothing"][1]


async def test_resume_queues_an_interrupted_run_in_its_queue_and_a_worker_finishes_it(store: sp.Store) -> None:
    flow, held = held_flow()
    await flow.submit(store, run_id="r1", queue="slow")
    app = sp.dashboard(store)
    async with client(app) as http:
        async with anyio.create_task_group() as tg:
            worker = sp.Worker(store, flow, queues="slow")
            tg.start_soon(worker.run)
            await wait_for(held.waiting)
            assert await press(http, "interrupt", "held", "r1") == "interrupt"

            async def interrupted() -> bool:  # the worker stores the run's end
                return await stored_status(store, "held", "r1") is sp.RunStatus.INTERRUPTED

            await until(interrupted)
            worker.stop()

        assert await press(http, "resume", "held", "r1") == "resume"
        stored = await store.load("held", "r1")
        assert stored is not None
        assert (stored.record.status, stored.record.queue, stored.record.owner) == (sp.RunStatus.QUEUED, "slow", None)
        doc = await run_page(http, "held", "r1")
        assert (head_shown(doc)["status"], head_shown(doc)["queue"]) == ("queued", "slow")
        assert steps_shown(doc)["first"]["status"] == "completed"  # kept: not run again
        assert set(runs_shown(await page(http, status="queued"))) == {"r1"}

        async with anyio.create_task_group() as tg:
            worker = sp.Worker(store, flow, queues="slow")
            tg.start_soon(worker.run)

            async def completed() -> bool:
                return await stored_status(store, "held", "r1") is sp.RunStatus.COMPLETED

            await until(completed)
            worker.stop()

        assert held.tries == [1, 2]  # resumed by the second claim, from its completed step
        doc = await run_page(http, "held", "r1")
        head = head_shown(doc)
        assert (head["status"], head["epoch"], head["queue"], head["owner"]) == ("completed", "2", "slow", "-")
        steps = steps_shown(doc)
        assert (steps["first"]["status"], steps["wait"]["status"]) == ("completed", "completed")
        assert "(resumed)" in steps["first"]["step"]
        assert buttons(doc) == {"interrupt": False, "force": False, "resume": False}
        assert await press(http, "resume", "held", "r1") == "completed"
        assert await press(http, "interrupt", "held", "r1") == "nothing"


async def test_resume_of_a_failed_run_queues_it_in_the_default_queue(store: sp.Store) -> None:
    with pytest.raises(sp.StepFailed):
        await failing_flow([]).run(store=store, run_id="f1")
    app = sp.dashboard(store)
    async with client(app) as http:
        assert await press(http, "resume", "fails", "f1") == "resume"
        said = await page(http, "/run", flow="fails", id="f1", said="resume")
        assert said.one(id="said").text() == SAID["resume"][1]
    stored = await store.load("fails", "f1")
    assert stored is not None
    assert (stored.record.status, stored.record.queue) == (sp.RunStatus.QUEUED, "default")
    report = sp.RunReport.model_validate_json(stored.report_json)
    assert report.steps["flaky"].status is sp.StepStatus.COMPLETED  # its checkpoint kept


async def test_resume_says_what_it_could_not_do(store: sp.Store) -> None:
    await a_then_b([]).run(store=store, run_id="done")
    flow, held = held_flow()
    app = sp.dashboard(store)
    async with client(app) as http, anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="busy")
        await wait_for(held.waiting)
        assert await press(http, "resume", "held", "busy") == "owned"
        assert await stored_status(store, "held", "busy") is sp.RunStatus.RUNNING
        assert await press(http, "resume", "ab", "done") == "completed"
        assert await stored_status(store, "ab", "done") is sp.RunStatus.COMPLETED

        csrf = (await form_of(http, "resume", "ab", "done"))["csrf"]
        for action in ("interrupt", "force", "resume"):
            response = await http.post(f"/run/{action}", data={"flow": "ab", "id": "nope", "csrf": csrf})
            assert said_of(response, "ab", "nope") == "gone"
            gone = await http.get(response.headers["location"])
            assert gone.status_code == 404  # the page it leads to: no such run
        assert await store.load("ab", "nope") is None  # resume made nothing

        handle.interrupt()
        outcome = await handle.outcome()
        assert isinstance(outcome, sp.Interrupted)
        assert len(outcome.report.interrupts) == 1  # resume sent none


async def test_a_button_needs_the_run_and_a_known_action(store: sp.Store) -> None:
    await a_then_b([]).run(store=store, run_id="done")
    app = sp.dashboard(store)
    async with client(app) as http:
        fields = await form_of(http, "interrupt", "ab", "done")
        unknown = await http.post("/run/delete", data=fields)
        assert unknown.status_code == 404
        assert "expected one of interrupt, force, resume" in unknown.text
        for missing in ("flow", "id"):
            response = await http.post("/run/interrupt", data={k: v for k, v in fields.items() if k != missing})
            assert response.status_code == 400
            assert "the form must name the run" in response.text
        wrong_method = await http.get("/run/interrupt")  # a button is a POST: no such page
        assert wrong_method.status_code == 404
        assert "Content-Security-Policy" in wrong_method.headers
        elsewhere = await http.get("/nothing/here")
        assert elsewhere.status_code == 404
        assert "Content-Security-Policy" in elsewhere.headers
    assert await stored_status(store, "ab", "done") is sp.RunStatus.COMPLETED


# -- the guard ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "answered"),
    [
        ("http://127.0.0.1:8765", True),
        ("http://localhost:8765", True),
        ("http://[::1]:8765", True),
        ("http://127.0.0.2", True),
        ("http://LOCALHOST", True),
        ("http://app.localhost:8765", True),
        ("http://evil.example:8765", False),
        ("http://evil.example", False),
        ("http://127.0.0.1.evil.example:8765", False),
        ("http://localhost.evil.example", False),
        ("http://192.168.1.10:8765", False),
        ("http://[fe80::1]:8765", False),
    ],
)
async def test_without_a_token_only_requests_to_a_loopback_name_are_answered(base_url: str, answered: bool) -> None:
    store = sp.MemoryStore()
    await a_then_b([]).run(store=store, run_id="r1")
    app = sp.dashboard(store)
    async with client(app, base_url=base_url) as http:
        for path in ("/", "/run?flow=ab&id=r1", "/run?flow=ab&id=r1&part=live"):
            response = await http.get(path)
            assert response.status_code == (200 if answered else 403), path
        # Its script and style sheet are the same for everyone: served to the page that says why it was refused.
        assert (await http.get("/static/dashboard.css")).status_code == 200
        if not answered:
            refused = await http.get("/")
            assert "answers only requests to a loopback address" in refused.text
            assert "--token" in refused.text
            posted = await http.post("/run/interrupt", data={"flow": "ab", "id": "r1"})
            assert posted.status_code == 403


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["localhost", "LocalHost", "a.localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["", "example.com", "0.0.0.0", "::", "10.0.0.1", "localhost.example", "[::2]"]))


async def test_with_a_token_every_request_carries_it() -> None:
    store = sp.MemoryStore()
    await a_then_b([]).run(store=store, run_id="r1")
    app = sp.dashboard(store, token=TOKEN)
    async with client(app) as http:
        for path in ("/", "/run?flow=ab&id=r1", "/run?flow=ab&id=r1&part=live"):
            response = await http.get(path)
            assert response.status_code == 401, path
        assert "needs its token" in response.text
        refused = parse((await http.get("/")).text)
        assert refused.one("h1").text() == "Token required"
        assert (await http.get("/static/dashboard.js")).status_code == 200  # the refusal page's own script
        assert (await http.post("/run/interrupt", data={"flow": "ab", "id": "r1"})).status_code == 401
        for wrong in ({"authorization": "Bearer nope"}, {"authorization": TOKEN}, {"cookie": f"{TOKEN_COOKIE}=nope"}):
            assert (await http.get("/", headers=wrong)).status_code == 401, wrong
        assert (await http.get("/", params={"token": "nope"})).status_code == 401
        assert (await http.get("/", params={"token": TOKEN[:-1]})).status_code == 401

        for bearer in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN} "):
            assert (await http.get("/", headers={"authorization": bearer})).status_code == 200, bearer
        assert (await http.get("/", headers={"cookie": f"{TOKEN_COOKIE}={TOKEN}"})).status_code == 200
        assert not http.cookies  # none of these set a cookie

        # ?token=: kept in a cookie, and the same address without it.
        response = await http.get("/run", params={"flow": "ab", "token": TOKEN, "id": "r1"})
        assert response.status_code == 303
        assert response.headers["location"] == "/run?flow=ab&id=r1"
        set_cookie = response.headers["set-cookie"]
        assert set_cookie.startswith(f"{TOKEN_COOKIE}={TOKEN};")
        # lax: a link from another site (a chat, a ticket) opens the page; buttons keep the strict CSRF cookie
        assert {"HttpOnly", "Path=/", "SameSite=lax"} <= {part.strip() for part in set_cookie.split(";")}
        assert http.cookies[TOKEN_COOKIE] == TOKEN
        doc = await page(http, response.headers["location"])
        assert head_shown(doc)["status"] == "completed"
        assert TOKEN not in str(doc.all("a"))
        assert TOKEN not in (await http.get("/")).text

    # With a token, a name other than the loopback's is answered: the token, not the name, guards it.
    async with client(app, base_url="http://dashboard.example:8765") as http:
        assert (await http.get("/", headers={"authorization": f"Bearer {TOKEN}"})).status_code == 200
        assert (await http.get("/")).status_code == 401


async def test_a_button_needs_its_pages_csrf_token_and_a_request_from_its_own_site() -> None:
    store = sp.MemoryStore()
    flow, held = held_flow()
    app = sp.dashboard(store)
    async with client(app) as http, anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r1")
        await wait_for(held.waiting)
        fields = await form_of(http, "interrupt", "held", "r1")
        assert http.cookies[CSRF_COOKIE] == fields["csrf"]
        assert len(fields["csrf"]) >= 32
        without = {key: value for key, value in fields.items() if key != "csrf"}
        refused: list[tuple[Any, dict[str, str]]] = [
            (without, {}),
            ({**fields, "csrf": ""}, {}),
            ({**fields, "csrf": fields["csrf"][::-1]}, {}),
            (fields, {"origin": "http://evil.example"}),
            (fields, {"origin": "http://127.0.0.1:9999"}),
            (without, {"origin": "null"}),
            (fields, {"sec-fetch-site": "cross-site"}),
            (fields, {"sec-fetch-site": "same-site"}),
            (fields, {"origin": "http://evil.example", "sec-fetch-site": "same-origin"}),
            (fields, {"origin": "null"}),  # a sandboxed frame, from a browser that does not say where it is
            (fields, {"origin": "null", "sec-fetch-site": "cross-site"}),
        ]
        for data, headers in refused:
            response = await http.post("/run/interrupt", data=data, headers=headers)
            assert response.status_code == 403, (data, headers)
        # A cookie set by a page on another port of this host (cookies do not tell ports apart), with a form
        # field of the same value: not a value this app signed.
        forged = "x" * 43
        async with client(app) as other:
            planted = {"cookie": f"{CSRF_COOKIE}={forged}"}
            response = await other.post("/run/interrupt", data={**fields, "csrf": forged}, headers=planted)
            assert response.status_code == 403
            # its page replaces it with one it signed
            again = await other.get("/run", params={"flow": "held", "id": "r1"}, headers=planted)
            replaced = again.headers["set-cookie"]
            assert replaced.startswith(f"{CSRF_COOKIE}=")
            assert forged not in replaced
        json_body = await http.post("/run/interrupt", json=fields)  # not a form: no field to check
        assert json_body.status_code == 403
        async with client(app) as other:  # the form's field without the page's cookie: another browser
            assert (await other.post("/run/interrupt", data=fields)).status_code == 403
        assert await stored_status(store, "held", "r1") is sp.RunStatus.RUNNING

        # A browser's own request: its origin, same-origin.
        headers = {"origin": BASE, "sec-fetch-site": "same-origin"}
        response = await http.post("/run/interrupt", data=fields, headers=headers)
        assert said_of(response, "held", "r1") == "interrupt"
        outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    # Only that one reached the run: each refused request stored nothing.
    assert [signal.source for signal in outcome.report.interrupts] == ["ui"]


async def test_a_bearer_request_needs_no_csrf_field_but_a_cookie_one_does() -> None:
    store = sp.MemoryStore()
    flow, held = held_flow()
    app = sp.dashboard(store, token=TOKEN)
    bearer = {"authorization": f"Bearer {TOKEN}"}
    fields = {"flow": "held", "id": "r1"}
    async with client(app) as http, anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r1")
        await wait_for(held.waiting)
        cookie = {"cookie": f"{TOKEN_COOKIE}={TOKEN}"}
        assert (await http.post("/run/interrupt", data=fields, headers=cookie)).status_code == 403
        refused = await http.post("/run/interrupt", data=fields, headers={**bearer, "origin": "http://evil.example"})
        assert refused.status_code == 403
        wrong = await http.post("/run/interrupt", data=fields, headers={"authorization": "Bearer x"})
        assert wrong.status_code == 401
        response = await http.post("/run/interrupt", data=fields, headers=bearer)
        assert said_of(response, "held", "r1") == "interrupt"
        outcome = await handle.outcome()
    assert isinstance(outcome, sp.Interrupted)
    assert len(outcome.report.interrupts) == 1


async def test_every_response_carries_the_security_headers() -> None:
    store = sp.MemoryStore()
    await a_then_b([]).run(store=store, run_id="r1")
    open_app, token_app = sp.dashboard(store), sp.dashboard(store, token=TOKEN)
    async with client(open_app) as http:
        csrf = (await form_of(http, "interrupt", "ab", "r1"))["csrf"]
        responses = [
            await http.get("/"),
            await http.get("/", params={"part": "live"}),
            await http.get("/run", params={"flow": "ab", "id": "r1"}),
            await http.get("/run", params={"flow": "ab", "id": "nope"}),
            await http.get("/", params={"status": "lost"}),
            await http.get("/static/dashboard.css"),
            await http.get("/static/nope.js"),
            await http.post("/run/interrupt", data={"flow": "ab", "id": "r1"}),
            await http.post("/run/interrupt", data={"flow": "ab", "id": "r1", "csrf": csrf}),
            await http.get("/", headers={"host": "evil.example"}),
        ]
    async with client(token_app) as http:
        responses += [await http.get("/"), await http.get("/", params={"token": TOKEN})]
    assert sorted({response.status_code for response in responses}) == [200, 303, 400, 401, 403, 404]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name].startswith(value), (response.request.url, name)
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        # no address (a `?token=` one) goes to another site
        assert response.headers["referrer-policy"] in ("no-referrer", "same-origin")


async def test_static_files_are_served_with_their_types() -> None:
    app = sp.dashboard(sp.MemoryStore())
    static = resources.files("stoppoint").joinpath("_ui_static")
    async with client(app) as http:
        for name, kind in (("dashboard.css", "text/css"), ("dashboard.js", "text/javascript")):
            response = await http.get(f"/static/{name}")
            assert response.status_code == 200
            assert response.headers["content-type"].partition(";")[0] == kind
            assert response.content == static.joinpath(name).read_bytes()
        for path in ("/static/nope.css", "/static/..%2f_ui.py", "/static/__init__.py"):
            assert (await http.get(path)).status_code == 404, path


async def test_a_basic_store_shows_its_runs_without_buttons() -> None:
    store = BasicOnly()
    assert not isinstance(store, sp.Store)
    await a_then_b([]).run(store=store, run_id="r1")
    app = sp.dashboard(store, name="an old store")
    async with client(app) as http:
        listed = await page(http)
        assert runs_shown(listed)["r1"]["status"] == "completed"
        assert listed.one("span", class_="store").text() == "an old store"
        doc = await run_page(http, "ab", "r1")
        assert doc.all("form") == []
        assert doc.all("button") == []
        assert "keeps no leases" in doc.one("section", data_part="actions").text()
        assert doc.one("section", data_part="events").one("p").text() == "This store keeps no history."
        assert steps_shown(doc)["b"]["status"] == "completed"
        assert head_shown(doc)["status"] == "completed"
        csrf = http.cookies[CSRF_COOKIE]
        for action in ("interrupt", "force", "resume"):
            response = await http.post(f"/run/{action}", data={"flow": "ab", "id": "r1", "csrf": csrf})
            assert response.status_code == 409
            assert "cannot interrupt nor queue runs" in response.text


class BrokenStore(sp.MemoryStore):
    """A MemoryStore whose named methods raise StoreError (with hostile HTML in the message)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: set[str] = set()

    def _check(self, name: str) -> None:
        if name in self.broken:
            raise sp.StoreError(f"{name}: the disk is gone {HOSTILE}")

    async def list_runs(self, flow: str | None = None) -> list[sp.RunRecord]:
        self._check("list_runs")
        return await super().list_runs(flow)

    async def load(self, flow: str, run_id: str) -> sp.StoredRun | None:
        self._check("load")
        return await super().load(flow, run_id)

    async def events(self, flow: str, run_id: str) -> sp.StoredEvents:
        self._check("events")
        return await super().events(flow, run_id)

    async def labels(self, flow: str, run_id: str) -> dict[str, str]:
        self._check("labels")
        return await super().labels(flow, run_id)

    async def interrupt(self, *args: Any, **kwargs: Any) -> bool:
        self._check("interrupt")
        return await super().interrupt(*args, **kwargs)

    async def submit(self, *args: Any, **kwargs: Any) -> bool:
        self._check("submit")
        return await super().submit(*args, **kwargs)


async def test_a_store_that_cannot_be_read_or_written_gives_503() -> None:
    store = BrokenStore()
    await a_then_b([]).run(store=store, run_id="r1")
    app = sp.dashboard(store)
    async with client(app) as http:
        fields = await form_of(http, "interrupt", "ab", "r1")
        reads = {"list_runs": "/", "load": "/run", "events": "/run", "labels": "/run"}
        for method, path in reads.items():
            store.broken = {method}
            for part in ({}, {"part": "live"}):
                response = await http.get(path, params={"flow": "ab", "id": "r1", **part})
                assert response.status_code == 503, method
                assert f"{method}: the disk is gone" in response.text
            doc = parse((await http.get(path, params={"flow": "ab", "id": "r1"})).text)
            assert doc.one("h1").text() == "The store cannot be read"
            assert doc.one("p", class_="error").text() == f"{method}: the disk is gone {HOSTILE}"
        for method, action in (("interrupt", "interrupt"), ("interrupt", "force"), ("submit", "resume")):
            store.broken = {method}
            response = await http.post(f"/run/{action}", data=fields)
            assert response.status_code == 503, action
            assert parse(response.text).one("h1").text() == "The store cannot be written"
        store.broken = set()
        assert (await http.get("/")).status_code == 200


async def test_a_stored_report_that_does_not_validate_gives_503() -> None:
    class Tampered(sp.MemoryStore):
        async def load(self, flow: str, run_id: str) -> sp.StoredRun | None:
            stored = await super().load(flow, run_id)
            return None if stored is None else stored.model_copy(update={"report_json": '{"steps": 1}'})

    store = Tampered()
    await a_then_b([]).run(store=store, run_id="r1")
    async with client(sp.dashboard(store)) as http:
        response = await http.get("/run", params={"flow": "ab", "id": "r1"})
    assert response.status_code == 503
    assert "the stored report does not validate" in response.text


def test_dashboard_refuses_what_is_not_a_store_or_a_token() -> None:
    store = sp.MemoryStore()
    for bad_store in (None, object(), "runs.db", sp.MemoryStore, sp.SQLiteStore):
        with pytest.raises(TypeError, match=r"dashboard\(store\): expected a store"):
            sp.dashboard(bad_store)  # type: ignore[arg-type]
    for bad_token in ("", b"token-token-token", 12345678901234567):
        with pytest.raises(TypeError, match=r"dashboard\(token\): expected a non-empty str or None"):
            sp.dashboard(store, token=bad_token)  # type: ignore[arg-type]
    for unsendable in ("a token with spaces", "jeton-très-secret-0123", "token;path=/x-0123456", "tab\there-0123456"):
        with pytest.raises(ValueError, match=r"dashboard\(token\): only printable ASCII characters"):
            sp.dashboard(store, token=unsendable)
    for bad_name in (123, b"name"):
        with pytest.raises(TypeError, match=r"dashboard\(name\): expected a str or None"):
            sp.dashboard(store, name=bad_name)  # type: ignore[arg-type]
    assert isinstance(sp.dashboard(BasicOnly()), Starlette)


# -- mounted under a prefix -----------------------------------------------------------------------------------


async def test_mounted_under_a_prefix_its_links_redirects_and_cookies_start_with_it(store: sp.Store) -> None:
    await a_then_b([]).run(store=store, run_id="done")
    await a_then_b([]).submit(store, run_id="queued")
    app = Starlette(routes=[Mount("/ops", app=sp.dashboard(store, token=TOKEN))])
    async with client(app) as http:
        response = await http.get("/ops/", params={"token": TOKEN, "status": "queued"})
        assert response.status_code == 303
        assert response.headers["location"] == "/ops/?status=queued"
        assert "Path=/ops" in response.headers["set-cookie"]
        listed = await page(http, "/ops/")
        assert listed.one("link").attrs["href"] == "/ops/static/dashboard.css"
        assert scripts(listed) == [{"src": "/ops/static/dashboard.js", "defer": None}]
        assert listed.one("a", class_="brand").attrs["href"] == "/ops/"
        assert listed.one("form", class_="filters").attrs["action"] == "/ops/"
        links = {row.one("a").text(): row.one("a").attrs["href"] for row in rows_by(listed, "data-run").values()}
        assert links == {"done": "/ops/run?flow=ab&id=done", "queued": "/ops/run?flow=ab&id=queued"}
        assert (await http.get("/ops/static/dashboard.css")).status_code == 200

        doc = await run_page(http, "ab", "queued", prefix="/ops")
        actions = [form.attrs["action"] for form in doc.all("form", method="post")]
        assert actions == ["/ops/run/interrupt", "/ops/run/force", "/ops/run/resume"]
        assert [cookie.path for cookie in http.cookies.jar if cookie.name == CSRF_COOKIE] == ["/ops"]
        assert await press(http, "interrupt", "ab", "queued", prefix="/ops") == "marked"
        missing = await http.get("/ops/run", params={"flow": "ab", "id": "nope"})
        assert missing.status_code == 404
        assert parse(missing.text).one("a", class_="brand").attrs["href"] == "/ops/"
    async with client(app) as http:
        refused = await http.get("/ops/")
        assert refused.status_code == 401
        assert parse(refused.text).one("link").attrs["href"] == "/ops/static/dashboard.css"


# -- attempts, progress events, what is not there ---------------------------------------------------------------


async def test_a_resumed_run_lists_its_attempts_and_its_progress_events_on_demand(store: sp.Store) -> None:
    """The steps table is the latest attempt's (its report); the attempts come from the history. Progress events are
    counted, and listed on demand (they would crowd out the others)."""
    flow, held = held_flow()
    app = sp.dashboard(store)
    async with client(app) as http:
        async with anyio.create_task_group() as tg:
            handle = await flow.start(tg, store=store, run_id="r1")
            await wait_for(held.waiting)
            assert await press(http, "interrupt", "held", "r1") == "interrupt"
            assert isinstance(await handle.outcome(), sp.Interrupted)
        doc = await run_page(http, "held", "r1")
        assert not doc.one("section", data_part="attempts").all("tr")  # one attempt: nothing to add
        assert isinstance(await flow.run(store=store, run_id="r1"), sp.Completed)

        doc = await run_page(http, "held", "r1")
        attempts = doc.one("section", data_part="attempts").one("tbody").all("tr")
        assert [cells(row)[0] for row in attempts] == ["1", "2"]
        assert [cells(row)[3] for row in attempts] == ["interrupted", "completed"]
        assert re.fullmatch(rf"{INTERRUPT_REASON}; \d+\.\d\d s", cells(attempts[0])[4])
        assert steps_shown(doc)["wait"]["status"] == "completed"
        assert not doc.one("tr", data_step="first").all("rect")  # resumed: no bar on this attempt's axis
        assert doc.one("tr", data_step="wait").all("rect")
        events = [name for name, _, _ in events_shown(doc)]
        assert "step.progress" not in events
        assert events.count("flow.started") == 2
        toggle = doc.one("a", id="progress-events")
        assert toggle.text() == "show 1 progress events"
        listed = await page(http, "/run", flow="held", id="r1", progress="1")
        assert ("step.progress", "wait", "1/2 waiting to be stopped") in events_shown(listed)
        assert listed.one("a", id="progress-events").text() == "hide the progress events"


async def test_paths_it_does_not_have_are_guarded_too() -> None:
    app = sp.dashboard(sp.MemoryStore(), token=TOKEN)
    async with client(app) as http:
        assert (await http.get("/nothing")).status_code == 401  # not told what is there without the token
        found = await http.get("/nothing", headers={"authorization": f"Bearer {TOKEN}"})
        assert found.status_code == 404
        assert parse(found.text).one("p", class_="error").text() == "no page '/nothing' here"
    async with client(sp.dashboard(sp.MemoryStore()), base_url="http://evil.example:8765") as http:
        assert (await http.get("/nothing")).status_code == 403


class NaiveTimes(sp.MemoryStore):
    """A third-party store whose records carry naive datetimes (UTC without saying so)."""

    async def list_runs(self, flow: str | None = None) -> list[sp.RunRecord]:
        return [_naive(record) for record in await super().list_runs(flow)]

    async def load(self, flow: str, run_id: str) -> sp.StoredRun | None:
        stored = await super().load(flow, run_id)
        return None if stored is None else stored.model_copy(update={"record": _naive(stored.record)})


def _naive(record: sp.RunRecord) -> sp.RunRecord:
    fields = ("started_at", "updated_at", "finished_at", "lease_expires_at")
    return record.model_copy(
        update={name: at.replace(tzinfo=None) for name in fields if (at := getattr(record, name)) is not None}
    )


async def test_naive_times_of_a_third_party_store_are_taken_as_utc() -> None:
    store = NaiveTimes()
    await a_then_b([]).run(store=store, run_id="done")
    claim = await store.claim("ab", "held", "ghost:1/live", new=new_state(plan_of(a_then_b([])), "held", {}))
    assert claim is not None
    async with client(sp.dashboard(store)) as http:
        shown = runs_shown(await page(http))
        assert re.fullmatch(r"in \d+ s", shown["held"]["lease"])
        assert list(shown) == ["held", "done"]  # newest first
        assert head_shown(await run_page(http, "ab", "done"))["status"] == "completed"


# -- what an adversarial review found -------------------------------------------------------------------------


async def test_without_a_token_a_request_through_a_proxy_is_refused() -> None:
    """A reverse proxy on this machine calls the dashboard by a loopback name for whoever called the proxy."""
    store = sp.MemoryStore()
    await a_then_b([]).run(store=store, run_id="r1")
    async with client(sp.dashboard(store)) as http:
        assert (await http.get("/")).status_code == 200
        for header in ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP"):
            response = await http.get("/", headers={header: "203.0.113.5"})
            assert response.status_code == 403, header
            assert "through a proxy" in response.text
            live = await http.get("/", params={"part": "live"}, headers={header: "203.0.113.5"})
            assert live.status_code == 403
            assert live.headers["content-type"].startswith("text/plain")  # a poll's badge shows it as text
    async with client(sp.dashboard(store, token=TOKEN)) as http:  # with a token, the token decides
        bearer = {"authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "203.0.113.5"}
        assert (await http.get("/", headers=bearer)).status_code == 200


async def test_the_token_redirect_stays_on_this_site() -> None:
    async with client(sp.dashboard(sp.MemoryStore(), token=TOKEN)) as http:
        response = await http.get(f"{BASE}//evil.example/", params={"token": TOKEN})  # path //evil.example/
        assert response.status_code == 303
        assert response.headers["location"] == "/evil.example/"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8765@evil.example", "[::1]evil.example", "[::1]:x@evil.example", "127.0.0.1:x", "localhost:8765:1"],
)
async def test_a_malformed_host_header_is_not_a_loopback_name(host: str) -> None:
    async with client(sp.dashboard(sp.MemoryStore())) as http:
        assert (await http.get("/", headers={"host": host})).status_code == 403


async def test_every_method_meets_the_guard() -> None:
    async with client(sp.dashboard(sp.MemoryStore()), base_url="http://evil.example:8765") as http:
        for method in ("OPTIONS", "TRACE", "PUT", "PATCH", "DELETE"):
            response = await http.request(method, "/")
            assert response.status_code == 403, method
            assert "Content-Security-Policy" in response.headers


async def test_a_root_path_from_the_request_is_escaped() -> None:
    store = sp.MemoryStore()
    await a_then_b([]).run(store=store, run_id="r1")
    hostile = '/x"><img src=x onerror=alert(1)>'
    outer = Starlette(routes=[Mount("/{tenant}", app=sp.dashboard(store))])
    async with client(outer) as http:
        response = await http.get(f"{hostile}/run", params={"flow": "ab", "id": "r1"})
        assert response.status_code == 200
        doc = parse(response.text)
        assert not doc.all("img")
        assert "onerror=alert(1)>" not in response.text


async def test_with_a_token_every_process_signs_the_csrf_values_alike() -> None:
    """`uvicorn --workers N`: a button's POST may reach another process than the one that served its page."""
    store = sp.MemoryStore()
    flow, held = held_flow()
    bearer = {"authorization": f"Bearer {TOKEN}"}
    one, two = sp.dashboard(store, token=TOKEN), sp.dashboard(store, token=TOKEN)
    async with client(one, headers=bearer) as first, client(two) as second, anyio.create_task_group() as tg:
        handle = await flow.start(tg, store=store, run_id="r1")
        await wait_for(held.waiting)
        fields = await form_of(first, "interrupt", "held", "r1")
        cookies = {"cookie": f"{TOKEN_COOKIE}={TOKEN}; {CSRF_COOKIE}={first.cookies[CSRF_COOKIE]}"}
        response = await second.post("/run/interrupt", data=fields, headers=cookies)
        assert said_of(response, "held", "r1") == "interrupt"
        assert isinstance(await handle.outcome(), sp.Interrupted)
    # Without a token (loopback, one process), each app has a key of its own.
    async with client(sp.dashboard(store)) as first, client(sp.dashboard(store)) as second:
        fields = await form_of(first, "resume", "held", "r1")
        cookies = {"cookie": f"{CSRF_COOKIE}={first.cookies[CSRF_COOKIE]}"}
        assert (await second.post("/run/resume", data=fields, headers=cookies)).status_code == 403


def test_a_step_started_after_the_dashboards_clock_still_gets_a_bar() -> None:
    """A worker whose clock is ahead of the dashboard's (another host): no negative width, which browsers reject."""
    from datetime import UTC, datetime, timedelta

    from stoppoint._ui_html import RunView, run_live

    now = datetime.now(UTC)
    ahead = now + timedelta(seconds=30)
    report = sp.RunReport(
        run_id="r1",
        flow="ab",
        started_at=ahead,
        steps={"a": sp.StepReport(name="a", status=sp.StepStatus.RUNNING, started_at=ahead)},
    )
    record = sp.RunRecord(
        flow="ab", run_id="r1", flow_version="1", status=sp.RunStatus.RUNNING, started_at=ahead, updated_at=ahead
    )
    view = RunView("", record, report, [], 0, {}, True, "c.s", None, now, "store")
    rect = parse(run_live(view)).one("tr", data_step="a").one("rect")
    x, width = float(rect.attrs["x"] or ""), float(rect.attrs["width"] or "")
    assert 0 <= x <= 996
    assert width > 0
    assert x + width <= 1000
