"""Child process for tests/test_sources.py: a flow under `interrupt_on_signals()` stopped by real SIGINTs.

Usage: python signal_child.py BACKEND MODE, with BACKEND "asyncio" or "trio" and MODE:

* "graceful": the step loops over stopping points, so the first SIGINT stops it;
* "forced": the step blocks with no stopping point, so only the second SIGINT (force) ends it.

Protocol on stdout (one line each, flushed): `READY` once the step runs; `SIGNAL <source>
force=<bool>` for every interrupt, once the run has received it (the parent waits for this line
before sending the next SIGINT); last a JSON line with the outcome.
"""

from __future__ import annotations

import json
import signal
import sys
from types import FrameType

import anyio
import anyio.lowlevel

import stoppoint as sp


def custom_handler(signum: int, frame: FrameType | None) -> None:
    """The handler in place before the block: it must be back afterwards, and never run meanwhile."""
    emit(f"CUSTOM {signum}")


def emit(line: str) -> None:
    print(line, flush=True)


async def main(mode: str) -> None:
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver, receiver.clone() as watched:
        flow = sp.Flow("child")

        @flow.step
        async def work(ctx: sp.StepContext) -> None:
            emit("READY")
            if mode == "graceful":
                while True:
                    await ctx.checkpoint()
                    await anyio.lowlevel.checkpoint()
            else:
                await anyio.sleep_forever()  # no stopping point: only a forced interrupt ends it

        async def watch() -> None:
            # A signal reaches every clone in the same synchronous delivery, the run's included:
            # once this line is out, the run has recorded the signal.
            async for item in watched:
                emit(f"SIGNAL {item.source} force={item.force}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with sp.interrupt_on_signals(interrupter, signals=(signal.SIGINT,)) as on_signals:
                outcome = await flow.run(interrupts=receiver)
            restored = signal.getsignal(signal.SIGINT) is custom_handler
            interrupter.close()  # the watcher prints what its buffer still holds, then sees the end

    assert isinstance(outcome, sp.Interrupted), outcome
    emit(
        json.dumps(
            {
                "outcome": type(outcome).__name__,
                "forced": outcome.forced,
                "source": outcome.signal.source,
                "force": outcome.signal.force,
                "reason": outcome.signal.reason,
                "steps": {name: step.status.value for name, step in outcome.report.steps.items()},
                "interrupts": [[s.source, s.force] for s in outcome.report.interrupts],
                "received": on_signals.received,
                "restored": restored,
            }
        )
    )


if __name__ == "__main__":
    backend, mode = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGINT, custom_handler)  # before the loop: neither backend replaces it then
    anyio.run(main, mode, backend=backend)
