"""Child process for tests/test_hardening_cli.py: a web server with `interrupt_on_signals()` in its lifespan.

Usage: python server_child.py BACKEND CHAIN, with BACKEND "asyncio" or "trio" and CHAIN "chain" or "nochain".

The server is simulated the way uvicorn behaves: before serving it installs its own SIGINT and SIGTERM handler,
which sets `should_exit` (and wakes its main loop); its main loop serves until then, then it shuts down, and the
lifespan's shutdown half runs. The lifespan enters `interrupt_on_signals(interrupter, chain=...)` and starts a flow
run in the background whose step loops over stopping points. Without `chain` the server's handler never runs, and
this server would never exit: here it then also stops serving once the run has ended, so the test can see that.

Protocol on stdout (one line each, flushed): `READY` once the step runs; last a JSON line with what happened.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from types import FrameType

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

import stoppoint as sp

HANG_GUARD = 30  # seconds; only reached when something hangs


def emit(line: str) -> None:
    print(line, flush=True)


def call_soon_from_a_handler(backend: str) -> Callable[[Callable[[], object]], object]:
    """How a signal handler hands a call to the running loop (it runs between two bytecodes of the loop's
    thread: it cannot set an anyio.Event itself)."""
    if backend == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    import asyncio

    return asyncio.get_running_loop().call_soon_threadsafe


class Server:
    """uvicorn's part in this: a signal handler of its own that asks the main loop to exit."""

    def __init__(self, backend: str) -> None:
        self.should_exit = False
        self.handled: list[int] = []
        self.stop_serving = anyio.Event()  # the main loop waits for it (uvicorn's ticks and reads should_exit)
        self.call_soon = call_soon_from_a_handler(backend)

    def handle_exit(self, signum: int, frame: FrameType | None) -> None:
        self.handled.append(signum)
        self.should_exit = True
        self.call_soon(self.stop_serving.set)


async def main(backend: str, chain: bool) -> None:
    server = Server(backend)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    flow = sp.Flow("background")

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        emit("READY")
        while True:
            await ctx.checkpoint()
            await anyio.lowlevel.checkpoint()

    result: dict[str, object] = {}
    run_ended = anyio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(tg: TaskGroup) -> AsyncIterator[None]:
        interrupter, receiver = sp.interrupt_channel()
        with interrupter, receiver:
            async with sp.interrupt_on_signals(interrupter, chain=chain):

                async def background() -> None:
                    outcome = await flow.run(interrupts=receiver)
                    assert isinstance(outcome, sp.Interrupted), outcome
                    result["outcome"] = type(outcome).__name__
                    result["source"] = outcome.signal.source
                    result["force"] = outcome.signal.force
                    run_ended.set()
                    if not chain:  # this server's handler never runs: stop serving, so the test sees it
                        server.stop_serving.set()

                tg.start_soon(background)
                yield
                with anyio.fail_after(HANG_GUARD):  # shutdown: the run stops at its stopping point
                    await run_ended.wait()
        result["restored"] = all(signal.getsignal(sig) == server.handle_exit for sig in (signal.SIGINT, signal.SIGTERM))

    async with anyio.create_task_group() as tg, lifespan(tg):
        with anyio.fail_after(HANG_GUARD):  # the server's main loop: it serves until asked to exit
            await server.stop_serving.wait()
    result["server_handled"] = server.handled
    result["server_exited_by_its_handler"] = server.should_exit
    emit(json.dumps(result))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2] == "chain", backend=sys.argv[1])
