"""Calls into a worker thread that a native asyncio cancellation of the caller cannot leave running behind it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Job"]

T = TypeVar("T")


class Job(Generic[T]):
    """One call into a worker thread: `run()` there, and, if its caller's wait is cut off, `settled()`
    in the event loop, which makes sure the call never starts or has ended."""

    __slots__ = ("args", "ended", "fn", "lock", "started", "waiter")

    def __init__(self, fn: Callable[..., T], *args: Any) -> None:
        self.fn = fn
        self.args = args
        self.lock = threading.Lock()
        self.started = False  # False for ever once settled() found it not started
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None

    def run(self) -> T | None:
        with self.lock:
            if self.started:  # (settled() dropped it: it must not start now)
                return None
            self.started = True
        try:
            return self.fn(*self.args)
        finally:
            with self.lock:
                self.ended = True
                waiter = self.waiter
            if waiter is not None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                    waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    async def settled(self) -> None:
        """Wait (through further native cancellations) until the call has ended, or drop it if it has
        not started."""
        with self.lock:
            if not self.started:
                self.started = True  # run() returns at once if a worker thread still calls it
                return
            if self.ended:
                return
            self.waiter = waiter = asyncio.get_running_loop().create_future()
        while not waiter.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
