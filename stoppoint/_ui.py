"""The dashboard: `sp.dashboard(store)`, a Starlette app over any store (`stoppoint ui` serves it).

It only reads the store (`list_runs`, `load`, `events`, `labels`) and writes through the two calls made for
other processes: `interrupt` (the interrupt and force buttons) and `submit` (resume: the run is queued for a
worker). So it never holds a run's lease nor waits on one, and it works on every process's runs.

It is a control surface, so every request passes the guard first (`_ui_guard`: token or loopback, CSRF,
security headers); the pages are rendered by `_ui_html`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from ._errors import RunOwned, StoreError
from ._events import Event
from ._outcome import RunReport
from ._store import BasicStore, EventStore, LabelStore, RunRecord, RunState, RunStatus, Store
from ._ui_guard import (
    CSRF_COOKIE,
    METHODS,
    Csrf,
    Guard,
    base_of,
    cookie_name,
    cookie_path,
    error_response,
    sendable,
    with_headers,
)
from ._ui_html import ACTIONS, SHOWN_RUNS, RunsView, RunView, run_live, run_page, runs_live, runs_page

__all__ = ["INTERRUPT_REASON", "dashboard"]

INTERRUPT_REASON = "interrupted from the dashboard"


def dashboard(store: BasicStore, *, token: str | None = None, name: str | None = None) -> Starlette:
    """The web dashboard over `store`, as an ASGI app (Starlette): serve it with any ASGI server, or mount it
    in your own app. `stoppoint ui` serves it with uvicorn.

    Args:
        store: Any store, opened (`async with store:`) for as long as the app serves. With a `BasicStore`
            the pages show runs but have no buttons (it takes no interrupts).
        token: When given, every request must carry it: the header `Authorization: Bearer TOKEN`, or the cookie
            that opening a page once as `?token=TOKEN` sets. Without one, only requests made on this machine to a
            loopback name are answered: give one whenever the app can be reached otherwise (a reverse proxy
            included). See "The dashboard" in the "Observing runs" guide.
        name: How the pages name the store (default: its repr).

    Raises:
        TypeError: `store` is not a store, `token` not a non-empty str, or `name` not a str.
        ValueError: `token` holds a character a header or cookie cannot carry (a space, a non-ASCII one).
    """
    if isinstance(store, type) or not isinstance(store, BasicStore):
        raise TypeError(f"dashboard(store): expected a store (such as SQLiteStore(path)), got {store!r}")
    if token is not None and (not isinstance(token, str) or not token):
        raise TypeError(f"dashboard(token): expected a non-empty str or None, got {token!r}")
    if token is not None and not sendable(token):
        raise ValueError(
            "dashboard(token): only printable ASCII characters, no space nor ';' (a header and a cookie carry it)"
        )
    if name is not None and not isinstance(name, str):
        raise TypeError(f"dashboard(name): expected a str or None, got {name!r}")
    csrf = Csrf(token)
    app = _Dashboard(store, name if name is not None else repr(store), csrf)
    guard = Guard(token, csrf)
    routes = [
        Route("/", guard(app.runs), methods=["GET"]),
        Route("/run", guard(app.run), methods=["GET"]),
        Route("/run/{action}", guard(app.act), methods=["POST"]),
        # its own script and style sheet, the same for everyone: served to a page that shows why it was refused
        Route("/static/{file}", with_headers(app.static), methods=["GET"]),
        # anything else: guarded too (what is not there is told only to those who may ask)
        Route("/{path:path}", guard(app.nothing), methods=METHODS),
    ]
    return Starlette(routes=routes)


def _aware(record: RunRecord) -> RunRecord:
    """`record` with its times in UTC: a third-party store may give naive ones (taken as UTC)."""
    fields = ("started_at", "updated_at", "finished_at", "lease_expires_at")
    naive = {
        name: at.replace(tzinfo=UTC)
        for name in fields
        if (at := getattr(record, name)) is not None and at.tzinfo is None
    }
    return record.model_copy(update=naive) if naive else record


# -- the pages -----------------------------------------------------------------------------------------------


class _Dashboard:
    """The endpoints, over one store."""

    def __init__(self, store: BasicStore, name: str, csrf: Csrf) -> None:
        self._store = store
        self._name = name
        self._csrf = csrf
        self._static = {
            name: (resources.files("stoppoint").joinpath("_ui_static", name).read_bytes(), kind)
            for name, kind in (("dashboard.css", "text/css"), ("dashboard.js", "text/javascript"))
        }

    async def runs(self, request: Request) -> Response:
        """The runs list, filtered by `?flow=` and `?status=`."""
        base = base_of(request)
        live = request.query_params.get("part") == "live"
        flow = request.query_params.get("flow") or None
        status_text = request.query_params.get("status") or None
        try:
            status = RunStatus(status_text) if status_text is not None else None
        except ValueError:
            choices = ", ".join(status.value for status in RunStatus)
            return error_response(
                base, 400, "No such status", f"status {status_text!r}: expected one of {choices}", live=live
            )
        try:
            records = [_aware(record) for record in await self._store.list_runs()]
        except StoreError as exc:
            return error_response(base, 503, "The store cannot be read", str(exc), live=live)
        flows = sorted({record.flow for record in records})
        matching = [
            record
            for record in records
            if (flow is None or record.flow == flow) and (status is None or record.status is status)
        ]
        matching.sort(key=lambda record: record.updated_at, reverse=True)
        view = RunsView(base, matching[:SHOWN_RUNS], len(matching), flows, flow, status, datetime.now(UTC), self._name)
        return HTMLResponse(runs_live(view) if live else runs_page(view))

    async def run(self, request: Request) -> Response:
        """One run's page: `?flow=F&id=RUN_ID`."""
        base = base_of(request)
        live = request.query_params.get("part") == "live"
        flow, run_id = request.query_params.get("flow"), request.query_params.get("id")
        if not flow or not run_id:
            return error_response(base, 400, "Which run?", "expected ?flow=FLOW&id=RUN_ID", live=live)
        try:
            view = await self._run_view(request, flow, run_id)
        except StoreError as exc:
            return error_response(base, 503, "The store cannot be read", str(exc), live=live)
        if view is None:
            return error_response(
                base, 404, "No such run", f"no run {run_id!r} of flow {flow!r} in {self._name}", live=live
            )
        response = HTMLResponse(run_live(view) if live else run_page(view))
        if request.cookies.get(cookie_name(CSRF_COOKIE, request)) != view.csrf:
            response.set_cookie(
                cookie_name(CSRF_COOKIE, request),
                view.csrf,
                httponly=True,
                samesite="strict",
                path=cookie_path(request),
            )
        return response

    async def _run_view(self, request: Request, flow: str, run_id: str) -> RunView | None:
        store = self._store
        stored = await store.load(flow, run_id)
        if stored is None:
            return None
        try:
            report = RunReport.model_validate_json(stored.report_json)
        except ValueError as exc:
            raise StoreError(f"flow {flow!r}, run {run_id!r}: the stored report does not validate: {exc}") from exc
        events: list[Event] | None = None
        dropped = 0
        if isinstance(store, EventStore):
            history = await store.events(flow, run_id)
            events, dropped = list(history), history.dropped
        labels = await store.labels(flow, run_id) if isinstance(store, LabelStore) else {}
        csrf = request.cookies.get(cookie_name(CSRF_COOKIE, request))
        if csrf is None or not self._csrf.valid(csrf):  # absent, or not one this app made (since it started)
            csrf = self._csrf.issue()
        return RunView(
            base=base_of(request),
            record=_aware(stored.record),
            report=report,
            events=events,
            dropped=dropped,
            labels=labels,
            can_control=isinstance(store, Store),
            csrf=csrf,
            said=request.query_params.get("said"),
            progress_events=request.query_params.get("progress") == "1",
            now=datetime.now(UTC),
            store=self._name,
        )

    async def act(self, request: Request) -> Response:
        """A button: interrupt, force or resume the run the form names; back to its page, saying what it did."""
        base = base_of(request)
        action = request.path_params["action"]
        form: dict[str, str] = request.state.form or {}
        flow, run_id = form.get("flow"), form.get("id")
        if action not in ACTIONS:
            return error_response(base, 404, "No such action", f"{action!r}: expected one of {', '.join(ACTIONS)}")
        if not flow or not run_id:
            return error_response(base, 400, "Which run?", "the form must name the run's flow and id")
        store = self._store
        if not isinstance(store, Store):
            return error_response(
                base, 409, "Not possible", f"{self._name} keeps no leases: it cannot interrupt nor queue runs"
            )
        try:
            said = await (self._resume(store, flow, run_id) if action == "resume" else
                          self._interrupt(store, flow, run_id, force=action == "force"))  # fmt: skip
        except StoreError as exc:
            return error_response(base, 503, "The store cannot be written", str(exc))
        query = urlencode({"flow": flow, "id": run_id, "said": said})
        return RedirectResponse(f"{base}/run?{query}", status_code=303)

    async def _interrupt(self, store: Store, flow: str, run_id: str, *, force: bool) -> str:
        # What the run was before the request says what the request did: read after, a run its owner stopped
        # meanwhile would look like one nobody held
        before = await store.load(flow, run_id)
        if not await store.interrupt(flow, run_id, INTERRUPT_REASON, force=force, source="ui"):
            return "nothing" if before is not None else "gone"
        if before is None or before.record.status in (RunStatus.QUEUED, RunStatus.ORPHANED):
            return "marked"
        return "force" if force else "interrupt"

    async def _resume(self, store: Store, flow: str, run_id: str) -> str:
        stored = await store.load(flow, run_id)
        if stored is None:
            return "gone"
        record = stored.record
        # A stored run keeps its own head: submit() reads `new` only for a run it does not find.
        state = RunState(
            flow_version=record.flow_version,
            status=RunStatus.QUEUED,
            started_at=record.started_at,
            finished_at=None,
            checkpoint_json=stored.checkpoint_json,
            report_json=stored.report_json,
        )
        try:
            queued = await store.submit(flow, run_id, state, queue=record.queue or "default")
        except RunOwned:
            return "owned"
        return "resume" if queued else "completed"

    async def nothing(self, request: Request) -> Response:
        """A path or method the dashboard does not have."""
        return error_response(base_of(request), 404, "Not found", f"no page {request.url.path!r} here")

    async def static(self, request: Request) -> Response:
        """The page's script and style sheet."""
        found = self._static.get(request.path_params["file"])
        if found is None:
            return PlainTextResponse("not found", status_code=404)
        content, kind = found
        return Response(content, media_type=kind)
