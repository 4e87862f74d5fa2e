"""Child process for tests/test_hardening_cli.py: a web server with `interrupt_on_signals()` in its lifespan.

Usage: python server_child.py BACKEND CHAIN, with BACKEND "asyncio" or "trio" and CHAIN "chain" or "nochain".

The server is simulated the way uvicorn behaves: before serving it installs its own SIGINT and SIGTERM handler,
which sets `should_exit`; its main loop ticks until that flag is set, then it shuts down, and the lifespan's
shutdown half runs. The lifespan enters `interrupt_on_signals(interrupter, chain=...)` and starts a flow run in
the background whose step loops over stopping points. Without `chain` the server's handler never runs, and this
server would never exit: here it then also stops serving once the run has ended, so the test can see that.

Protocol on stdout (one line each, flushed): `READY` once the step runs; last a JSON line with what happened.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from types import FrameType

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

import stoppoint as sp

HANG_GUARD = 30  # seconds; only reached when something hangs


def emit(line: str) -> None:
    print(line, flush=True)


class Server:
    """uvicorn's part in this: a signal handler of its own that asks the main loop to exit."""

    def __init__(self) -> None:
        self.should_exit = False
        self.handled: list[int] = []

    def handle_exit(self, signum: int, frame: FrameType | None) -> None:
        self.handled.append(signum)
        self.should_exit = True


async def main(chain: bool) -> None:
    server = Server()
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

                tg.start_soon(background)
                yield
                with anyio.fail_after(HANG_GUARD):  # shutdown: the run stops at its stopping point
                    await run_ended.wait()
        result["restored"] = all(signal.getsignal(sig) == server.handle_exit for sig in (signal.SIGINT, signal.SIGTERM))

    async with anyio.create_task_group() as tg, lifespan(tg):
        with anyio.fail_after(HANG_GUARD):
            # The server's main loop: like uvicorn's, it ticks until should_exit, a flag its signal handler
            # sets (a handler cannot set an anyio.Event: it runs between two bytecodes of the loop).
            while not server.should_exit and not (run_ended.is_set() and not chain):  # noqa: ASYNC110
                await anyio.sleep(0.01)
    result["server_handled"] = server.handled
    result["server_exited_by_its_handler"] = server.should_exit
    emit(json.dumps(result))


if __name__ == "__main__":
    anyio.run(main, sys.argv[2] == "chain", backend=sys.argv[1])
