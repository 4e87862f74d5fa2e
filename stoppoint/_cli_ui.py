"""`stoppoint ui`: serve the dashboard (`_ui`) over a store, with uvicorn, until Ctrl-C or SIGTERM.

    stoppoint ui [--store STORE] [--schema NAME] [--host 127.0.0.1] [--port 8765] [--token TOKEN]

It binds to the loopback by default. It is a control surface (its buttons interrupt runs), so another address
needs a token (`--token`, or the environment's STOPPOINT_UI_TOKEN, which keeps it out of `ps`), which every
request must then carry. The socket is bound before the server starts, so that a port in use is a usage
error, and `--port 0` picks a free one (the first line printed says which).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
from collections.abc import Iterator
from typing import Any

import anyio

from ._cli_signals import CommandSignals
from ._cli_store import _fail, _store, add_store_options, store_name, store_words
from ._signal import interrupt_channel

__all__ = ["TOKEN_ENV", "add_command", "cmd_ui"]

TOKEN_ENV = "STOPPOINT_UI_TOKEN"
MIN_TOKEN = 16  # characters: a token guards a control surface; `secrets.token_urlsafe()` gives 43


async def cmd_ui(args: argparse.Namespace, signals: CommandSignals) -> int:
    try:  # first: the guard's checks below are the dashboard's own, and need its extra too
        import uvicorn

        from ._ui import dashboard
        from ._ui_guard import is_loopback, sendable
    except ImportError as exc:
        missing = (exc.name or "a module").partition(".")[0]  # the package, not the submodule that failed
        _fail(f'stoppoint ui needs the "ui" extra ({missing} is missing): pip install "stoppoint[ui]"')
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and not sendable(token):
        _fail("--token: only printable ASCII characters, no space nor ';' (a header and a cookie carry it)")
    if token is not None and len(token) < MIN_TOKEN:
        _fail(
            f"--token: at least {MIN_TOKEN} characters (it guards the buttons that stop runs); "
            'make one with: python -c "import secrets; print(secrets.token_urlsafe())"'
        )
    if token is None and not is_loopback(args.host):
        _fail(
            f"--host {args.host}: not a loopback address; the dashboard can stop runs, so serving it to other "
            f"machines needs --token TOKEN (or {TOKEN_ENV}), which every request must carry"
        )
    with _listening(args.host, args.port) as sock:
        async with _store(args.store, schema=args.schema) as store:
            app = dashboard(store, token=token, name=store_name(store))
            server = _server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            again = shlex.join(["stoppoint", "ui", *store_words(args.store, args.schema)])
            interrupter, receiver = interrupt_channel()
            with interrupter, receiver, signals.running(interrupter, resume=again):
                # Said once signals stop the server (not before: a SIGTERM right after the line would exit 130)
                print(f"stoppoint ui: serving {store_name(store)} at http://{shown}:{port}/", flush=True)
                if token is not None:
                    print("stoppoint ui: open it once with ?token=TOKEN (a cookie keeps it)", flush=True)
                async with anyio.create_task_group() as tg:

                    async def obey() -> None:
                        """The first signal ends the open requests and stops; a second (forced) stops at once."""
                        async for signal in receiver:
                            server.should_exit = True
                            if signal.force:
                                server.force_exit = True

                    tg.start_soon(obey)
                    await server.serve(sockets=[sock])
                    tg.cancel_scope.cancel()
            signals.ended(0)
    return 0


@contextlib.contextmanager
def _listening(host: str, port: int) -> Iterator[socket.socket]:
    if not 0 <= port <= 65535:
        _fail(f"--port {port}: expected 0 to 65535 (0: any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        why = exc.strerror or str(exc)  # not os.strerror(errno): a gaierror's errno is negative ("Unknown error -2")
        _fail(f"--host {host} --port {port}: cannot listen there: {why}")
    with sock:
        yield sock


def _server(config: Any) -> Any:
    """A uvicorn server without its own signal handlers: the command's own SIGINT and SIGTERM (`_cli_signals`),
    and stop it through `should_exit`. The class is made here: uvicorn is an optional extra."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


def add_command(commands: Any, store_help: str) -> dict[str, Any]:
    """Add `ui` to the command's subparsers; its function by name."""
    ui = commands.add_parser(
        "ui",
        help="serve a web dashboard of the stored runs (needs stoppoint[ui]); it makes the store if there is none",
    )
    add_store_options(ui, store_help)
    ui.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=8765, help="the port (default: 8765; 0: any free one)")
    ui.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"a secret every request must carry (needed off the loopback; default: ${TOKEN_ENV})",
    )
    return {"ui": cmd_ui}
