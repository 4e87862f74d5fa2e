"""EventStream: a run's events as an async iterator (`FlowRun.events()`), which never holds the run up."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import anyio

from ._events import RunEvent

__all__ = ["EventStream"]

_ENDS = frozenset({"flow.completed", "flow.interrupted", "flow.failed"})


class EventStream:
    """The events of one run, from its start, as `async for event in handle.events()` yields them.

    It ends after the run's end event (`flow.completed`, `flow.interrupted` or `flow.failed`).
    The run hands events over without waiting: a consumer that falls behind by more than
    `max_buffer` events loses the oldest ones (`dropped` counts them), never stalls the run.
    `close()` stops listening early.
    """

    __slots__ = ("_buffer", "_closed", "_detach", "_dropped", "_wakeup")

    def __init__(self, past: Iterable[RunEvent], max_buffer: int) -> None:
        self._buffer: deque[RunEvent] = deque(maxlen=max_buffer)
        self._dropped = 0
        self._closed = False
        self._wakeup = anyio.Event()
        self._detach: Callable[[], None] | None = None
        for event in past:
            self._put(event)

    @property
    def dropped(self) -> int:
        """How many events were lost because the consumer fell `max_buffer` events behind."""
        return self._dropped

    def _put(self, event: RunEvent) -> None:
        """Called by the run with each event (synchronously: it must not block)."""
        if self._closed:
            return
        if len(self._buffer) == self._buffer.maxlen:
            self._dropped += 1
        self._buffer.append(event)
        if event.event in _ENDS:
            self._end()
        self._wakeup.set()

    def _end(self) -> None:
        self._closed = True
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()
        self._wakeup.set()

    def close(self) -> None:
        """Stop listening: the events already buffered are still yielded, then the stream ends."""
        self._end()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> RunEvent:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            if self._wakeup.is_set():  # (not while another task waits on it)
                self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self._buffer.popleft()
