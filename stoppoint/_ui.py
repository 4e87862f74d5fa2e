"""The dashboard: `sp.dashboard(store)`, a Starlette app over any store (`stoppoint ui` serves it).

It only reads the store (`list_runs`, `load`, `events`, `labels`) and writes through the two calls made for
other processes: `interrupt` (the interrupt and force buttons) and `submit` (resume: the run is queued for a
worker). So it never holds a run's lease nor waits on one, and it works on every process's runs.

It is a control surface, so every request passes `_Guard` first:

* **token**: with one, every request carries it (`Authorization: Bearer`, the cookie `?token=` sets once, or
  `?token=` itself); without one, only requests addressed to a loopback name are answered, which stops a
  page served elsewhere from reaching it through DNS rebinding;
* **CSRF**: a POST carries the value of its page's CSRF cookie in a form field (double submit), a value this app
  signed (a page on another port of the host can set cookies here, but cannot sign), and is refused when the
  browser says it comes from another site (`Origin`, `Sec-Fetch-Site`); one authorised by its `Authorization`
  header, which no other site can make a browser send, needs no form field;
* **cookies** are named after the port (`stoppoint_token_8765`): cookies do not tell ports apart, and two
  dashboards of one host must not overwrite each other's;
* **headers**: a Content-Security-Policy allowing only this app's own script and style, no framing, no
  referrer to other sites (a token may be in the address), no caching.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from ._errors import RunOwned, StoreError
from ._events import Event
from ._outcome import RunReport
from ._store import BasicStore, EventStore, LabelStore, RunRecord, RunState, RunStatus, Store
from ._ui_html import ACTIONS, SHOWN_RUNS, RunsView, RunView, error_page, run_live, run_page, runs_live, runs_page

__all__ = ["CSRF_COOKIE", "INTERRUPT_REASON", "TOKEN_COOKIE", "cookie_name", "dashboard", "is_loopback"]

TOKEN_COOKIE = "stoppoint_token"  # followed by `_PORT`
CSRF_COOKIE = "stoppoint_csrf"  # followed by `_PORT`
INTERRUPT_REASON = "interrupted from the dashboard"
# every method a client may try: Starlette answers a method no route lists with its own 405, unguarded, bare
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
_MAX_FORM = 16 * 1024  # a button's form is three short fields
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # the token may be in an address (`?token=`, once): it never goes to another site; this app's own forms keep
    # their Origin header, which the CSRF check reads
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def dashboard(store: BasicStore, *, token: str | None = None, name: str | None = None) -> Starlette:
    """The web dashboard over `store`, as an ASGI app (Starlette): serve it with any ASGI server, or mount it
    in your own app. `stoppoint ui` serves it with uvicorn.

    Args:
        store: Any store, opened (`async with store:`) for as long as the app serves. With a `BasicStore`
            the pages show runs but have no buttons (it takes no interrupts).
        token: When given, every request must carry it (see the module's docstring); give one whenever the
            app can be reached from anything but this machine's loopback.
        name: How the pages name the store (default: its repr).

    Raises:
        TypeError: `store` is not a store, `token` not a non-empty str, or `name` not a str.
        ValueError: `token` holds a character a header or cookie cannot carry (a space, a non-ASCII one).
    """
    if isinstance(store, type) or not isinstance(store, BasicStore):
        raise TypeError(f"dashboard(store): expected a store (such as SQLiteStore(path)), got {store!r}")
    if token is not None and (not isinstance(token, str) or not token):
        raise TypeError(f"dashboard(token): expected a non-empty str or None, got {token!r}")
    if token is not None and not _sendable(token):
        raise ValueError("dashboard(token): only printable ASCII characters, no space (an HTTP header carries it)")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"dashboard(name): expected a str or None, got {name!r}")
    csrf = _Csrf(token)
    app = _Dashboard(store, name if name is not None else repr(store), csrf)
    guard = _Guard(token, csrf)
    routes = [
        Route("/", guard(app.runs), methods=["GET"]),
        Route("/run", guard(app.run), methods=["GET"]),
        Route("/run/{action}", guard(app.act), methods=["POST"]),
        # its own script and style sheet, the same for everyone: served to a page that shows why it was refused
        Route("/static/{file}", _with_headers(app.static), methods=["GET"]),
        # anything else: guarded too (what is not there is told only to those who may ask)
        Route("/{path:path}", guard(app.nothing), methods=_METHODS),
    ]
    return Starlette(routes=routes)


def _sendable(token: str) -> bool:
    return token.isascii() and token.isprintable() and " " not in token and ";" not in token


def cookie_name(kind: str, request: Request) -> str:
    """`stoppoint_KIND_PORT`: this dashboard's cookie of that kind (`TOKEN_COOKIE`, `CSRF_COOKIE`)."""
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    return f"{kind}_{port}"


class _Csrf:
    """CSRF values this app made: a random part and its HMAC under a key of this app's (made at start)."""

    def __init__(self, token: str | None = None) -> None:
        # with a token, a key derived from it: every process serving the dashboard (uvicorn --workers N) signs
        # alike; without one (loopback only, one process), a random key
        self._key = (
            hmac.new(token.encode(), b"stoppoint csrf key", hashlib.sha256).digest()
            if token is not None
            else secrets.token_bytes(32)
        )

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> str:
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._sign(nonce)}"

    def valid(self, value: str | None) -> bool:
        if not value or not value.isascii():
            return False
        nonce, _, signature = value.partition(".")
        return hmac.compare_digest(signature.encode(), self._sign(nonce).encode())


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address, without port) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the guard -----------------------------------------------------------------------------------------------

Endpoint = Callable[[Request], Awaitable[Response]]


class _Guard:
    """Wraps each endpoint: the token (or the loopback rule), CSRF for POST, the security headers."""

    def __init__(self, token: str | None, csrf: _Csrf) -> None:
        self._token = token.encode() if token is not None else None
        self._csrf = csrf

    def __call__(self, endpoint: Endpoint) -> Endpoint:
        async def guarded(request: Request) -> Response:
            refused = self._refusal(request)
            if refused is None and request.method == "POST":
                request.state.form = await _form(request)  # read once: the endpoint reads it there
                refused = self._csrf_refusal(request)
            if refused is not None:
                response = refused
            elif request.method == "GET" and self._matches(request.query_params.get("token")):
                response = self._keep_token(request)
            else:
                response = await endpoint(request)
            response.headers.update(_HEADERS)
            return response

        return guarded

    def _matches(self, given: str | None) -> bool:
        return self._token is not None and given is not None and hmac.compare_digest(given.encode(), self._token)

    def _bearer(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self._matches(given.strip())

    def _refusal(self, request: Request) -> Response | None:
        base = request.scope.get("root_path", "")
        live = request.query_params.get("part") == "live"  # a page's poll: its badge shows the text
        if self._token is None:
            host = _host_name(request.headers.get("host", ""))
            # A reverse proxy on this machine addresses it by a loopback name for whoever called the proxy:
            # a request that says it was forwarded is not from this machine
            proxied = any(name in request.headers for name in _PROXY_HEADERS)
            if proxied or not is_loopback(host):
                return _error(
                    base, 403, "Not a loopback address",
                    f"This dashboard has no token, so it answers only requests to a loopback address, made on this "
                    f"machine: not to {host!r}{' through a proxy' if proxied else ''}. Serve it with --token to "
                    "reach it otherwise.",
                    live=live,
                )  # fmt: skip
            return None
        if (
            self._bearer(request)
            or self._matches(request.cookies.get(cookie_name(TOKEN_COOKIE, request)))
            or self._matches(request.query_params.get("token"))
        ):
            return None
        return _error(
            base, 401, "Token required",
            "This dashboard needs its token: open it once with ?token=TOKEN in the address (a cookie keeps it), "
            "or send the header Authorization: Bearer TOKEN.",
            live=live,
        )  # fmt: skip

    def _keep_token(self, request: Request) -> Response:
        """A request authorised by `?token=`: keep the token in a cookie, and go to the same address without
        it, so that it does not stay in the address bar, nor reach the page's links."""
        query = [(key, value) for key, value in request.query_params.multi_items() if key != "token"]
        target = "/" + request.url.path.lstrip("/") + (f"?{urlencode(query)}" if query else "")  # not //host
        response = RedirectResponse(target, status_code=303)
        assert self._token is not None
        response.set_cookie(
            cookie_name(TOKEN_COOKIE, request),
            self._token.decode(),
            httponly=True,
            samesite="lax",  # GETs change nothing; a link from another site must not meet "Token required"
            path=_cookie_path(request),
        )
        return response

    def _csrf_refusal(self, request: Request) -> Response | None:
        base = request.scope.get("root_path", "")
        origin = request.headers.get("origin")
        site = request.headers.get("sec-fetch-site")
        # `Origin: null` (a form of a page whose Referrer-Policy is no-referrer, a sandboxed frame) says nothing of
        # where a request comes from: taken only when the browser says that it comes from this very origin
        if origin == "null" and site == "same-origin":
            origin = None
        if (origin is not None and _host_of(origin) != request.headers.get("host", "").lower()) or site in (
            "cross-site",
            "same-site",
        ):
            return _error(base, 403, "Refused", "A button of another site cannot act here.")
        if self._bearer(request):
            return None
        form: dict[str, str] | None = request.state.form
        expected = request.cookies.get(cookie_name(CSRF_COOKIE, request))
        given = form.get("csrf") if form is not None else None
        if (
            not self._csrf.valid(expected)
            or given is None
            or not hmac.compare_digest(given.encode("utf-8", "replace"), (expected or "").encode())
        ):
            return _error(
                base, 403, "Refused",
                "The form's CSRF token does not match this browser's cookie: reload the page and press again.",
            )  # fmt: skip
        return None


def _aware(record: RunRecord) -> RunRecord:
    """`record` with its times in UTC: a third-party store may give naive ones (taken as UTC)."""
    fields = ("started_at", "updated_at", "finished_at", "lease_expires_at")
    naive = {
        name: at.replace(tzinfo=UTC)
        for name in fields
        if (at := getattr(record, name)) is not None and at.tzinfo is None
    }
    return record.model_copy(update=naive) if naive else record


def _with_headers(endpoint: Endpoint) -> Endpoint:
    async def answered(request: Request) -> Response:
        response = await endpoint(request)
        response.headers.update(_HEADERS)
        return response

    return answered


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port (`[::1]:8765` -> `::1`)."""
    if host_header.startswith("["):
        name, _, rest = host_header[1:].partition("]")
        return name if rest == "" or (rest[:1] == ":" and rest[1:].isdigit()) else host_header
    name, _, port = host_header.rpartition(":")
    if host_header.count(":") == 1:
        return name if port.isdigit() else host_header
    return host_header


def _host_of(origin: str) -> str:
    """`host:port` of an Origin header (`http://127.0.0.1:8765` -> `127.0.0.1:8765`)."""
    return origin.partition("://")[2].rstrip("/").lower()


def _cookie_path(request: Request) -> str:
    return str(request.scope.get("root_path", "")) or "/"


async def _form(request: Request) -> dict[str, str] | None:
    """A urlencoded form's fields (the first value of each), None if the body is not one. Parsed here: Starlette's
    `request.form()` needs python-multipart, a dependency for three short fields."""
    if request.headers.get("content-type", "").partition(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            return None
    try:
        fields = parse_qs(body.decode("ascii"), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        return None
    return {key: values[0] for key, values in fields.items()}


def _error(base: str, status: int, title: str, message: str, *, live: bool = False) -> Response:
    if live:
        return PlainTextResponse(message, status_code=status)
    return HTMLResponse(error_page(base, status, title, message), status_code=status)


# -- the pages -----------------------------------------------------------------------------------------------


class _Dashboard:
    """The endpoints, over one store."""

    def __init__(self, store: BasicStore, name: str, csrf: _Csrf) -> None:
        self._store = store
        self._name = name
        self._csrf = csrf
        self._static = {
            name: (resources.files("stoppoint").joinpath("_ui_static", name).read_bytes(), kind)
            for name, kind in (("dashboard.css", "text/css"), ("dashboard.js", "text/javascript"))
        }

    async def runs(self, request: Request) -> Response:
        """The runs list, filtered by `?flow=` and `?status=`."""
        base = request.scope.get("root_path", "")
        live = request.query_params.get("part") == "live"
        flow = request.query_params.get("flow") or None
        status_text = request.query_params.get("status") or None
        try:
            status = RunStatus(status_text) if status_text is not None else None
        except ValueError:
            choices = ", ".join(status.value for status in RunStatus)
            return _error(base, 400, "No such status", f"status {status_text!r}: expected one of {choices}", live=live)
        try:
            records = [_aware(record) for record in await self._store.list_runs()]
        except StoreError as exc:
            return _error(base, 503, "The store cannot be read", str(exc), live=live)
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
        base = request.scope.get("root_path", "")
        live = request.query_params.get("part") == "live"
        flow, run_id = request.query_params.get("flow"), request.query_params.get("id")
        if not flow or not run_id:
            return _error(base, 400, "Which run?", "expected ?flow=FLOW&id=RUN_ID", live=live)
        try:
            view = await self._run_view(request, flow, run_id)
        except StoreError as exc:
            return _error(base, 503, "The store cannot be read", str(exc), live=live)
        if view is None:
            return _error(base, 404, "No such run", f"no run {run_id!r} of flow {flow!r} in {self._name}", live=live)
        response = HTMLResponse(run_live(view) if live else run_page(view))
        if request.cookies.get(cookie_name(CSRF_COOKIE, request)) != view.csrf:
            response.set_cookie(
                cookie_name(CSRF_COOKIE, request),
                view.csrf,
                httponly=True,
                samesite="strict",
                path=_cookie_path(request),
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
            base=request.scope.get("root_path", ""),
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
        base = request.scope.get("root_path", "")
        action = request.path_params["action"]
        form: dict[str, str] = request.state.form or {}
        flow, run_id = form.get("flow"), form.get("id")
        if action not in ACTIONS:
            return _error(base, 404, "No such action", f"{action!r}: expected one of {', '.join(ACTIONS)}")
        if not flow or not run_id:
            return _error(base, 400, "Which run?", "the form must name the run's flow and id")
        store = self._store
        if not isinstance(store, Store):
            return _error(
                base, 409, "Not possible", f"{self._name} keeps no leases: it cannot interrupt nor queue runs"
            )
        try:
            said = await (self._resume(store, flow, run_id) if action == "resume" else
                          self._interrupt(store, flow, run_id, force=action == "force"))  # fmt: skip
        except StoreError as exc:
            return _error(base, 503, "The store cannot be written", str(exc))
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
        return _error(request.scope.get("root_path", ""), 404, "Not found", f"no page {request.url.path!r} here")

    async def static(self, request: Request) -> Response:
        """The page's script and style sheet."""
        found = self._static.get(request.path_params["file"])
        if found is None:
            return PlainTextResponse("not found", status_code=404)
        content, kind = found
        return Response(content, media_type=kind)
