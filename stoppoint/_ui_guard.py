"""The dashboard's guard (`_ui`): what every request passes before a page or a button answers it.

* **token**: with one, every request carries it (`Authorization: Bearer`, the cookie `?token=` sets once, or
  `?token=` itself); without one, only requests addressed to a loopback name are answered, and none that says
  it was forwarded by a proxy, which stops a page served elsewhere from reaching it through DNS rebinding;
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
from urllib.parse import parse_qs, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from ._ui_html import error_page

__all__ = [
    "CSRF_COOKIE",
    "METHODS",
    "TOKEN_COOKIE",
    "Csrf",
    "Endpoint",
    "Guard",
    "base_of",
    "cookie_name",
    "cookie_path",
    "error_response",
    "is_loopback",
    "sendable",
    "with_headers",
]

TOKEN_COOKIE = "stoppoint_token"  # followed by `_PORT`
CSRF_COOKIE = "stoppoint_csrf"  # followed by `_PORT`
# every method a client may try: Starlette answers a method no route lists with its own 405, unguarded, bare
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
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


def sendable(token: str) -> bool:
    """Whether a header (`Authorization: Bearer`) and a cookie can carry `token` as it is."""
    return token.isascii() and token.isprintable() and " " not in token and ";" not in token


def cookie_name(kind: str, request: Request) -> str:
    """`stoppoint_KIND_PORT`: this dashboard's cookie of that kind (`TOKEN_COOKIE`, `CSRF_COOKIE`)."""
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    return f"{kind}_{port}"


class Csrf:
    """CSRF values this app made: a random part and its HMAC under the app's key (derived from the token, or
    random), so that a value planted in a cookie by another page of the host is not taken."""

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


class Guard:
    """Wraps each endpoint: the token (or the loopback rule), CSRF for POST, the security headers."""

    def __init__(self, token: str | None, csrf: Csrf) -> None:
        self._token = token.encode() if token is not None else None
        self._csrf = csrf

    def __call__(self, endpoint: Endpoint) -> Endpoint:
        async def guarded(request: Request) -> Response:
            refused = self._refusal(request)
            if refused is None and request.method == "POST":
                request.state.form = await form_fields(request)  # read once: the endpoint reads it there
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
        base = base_of(request)
        live = request.query_params.get("part") == "live"  # a page's poll: its badge shows the text
        if self._token is None:
            host = _host_name(request.headers.get("host", ""))
            # A reverse proxy on this machine addresses it by a loopback name for whoever called the proxy:
            # a request that says it was forwarded is not from this machine
            proxied = any(name in request.headers for name in _PROXY_HEADERS)
            if proxied or not is_loopback(host):
                return error_response(
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
        return error_response(
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
            path=cookie_path(request),
        )
        return response

    def _csrf_refusal(self, request: Request) -> Response | None:
        base = base_of(request)
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
            return error_response(base, 403, "Refused", "A button of another site cannot act here.")
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
            return error_response(
                base, 403, "Refused",
                "The form's CSRF token does not match this browser's cookie: reload the page and press again.",
            )  # fmt: skip
        return None


def with_headers(endpoint: Endpoint) -> Endpoint:
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


def base_of(request: Request) -> str:
    """Where the dashboard is mounted (its root path, `""` at the root): its links start with it."""
    return str(request.scope.get("root_path", ""))


def cookie_path(request: Request) -> str:
    return base_of(request) or "/"


async def form_fields(request: Request) -> dict[str, str] | None:
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


def error_response(base: str, status: int, title: str, message: str, *, live: bool = False) -> Response:
    if live:
        return PlainTextResponse(message, status_code=status)
    return HTMLResponse(error_page(base, status, title, message), status_code=status)
