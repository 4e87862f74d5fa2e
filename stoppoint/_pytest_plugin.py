"""The pytest plugin stoppoint installs (entry point `pytest11`): fixtures for testing flows.

Plain (synchronous) fixtures, so they work the same under anyio's pytest plugin and pytest-asyncio,
on asyncio and trio alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from ._signal import Interrupter, InterruptSignal, interrupt_channel

__all__ = ["interrupt_receiver", "interrupter", "stoppoint_channel"]


@pytest.fixture
def stoppoint_channel() -> Iterator[tuple[Interrupter, MemoryObjectReceiveStream[InterruptSignal]]]:
    """An interrupt channel, `(interrupter, receiver)`, closed after the test."""
    interrupter, receiver = interrupt_channel()
    with interrupter, receiver:
        yield interrupter, receiver


@pytest.fixture
def interrupter(stoppoint_channel: tuple[Interrupter, MemoryObjectReceiveStream[InterruptSignal]]) -> Interrupter:
    """The interrupter of `stoppoint_channel`: `interrupter.interrupt()` stops the run listening on
    `interrupt_receiver`."""
    return stoppoint_channel[0]


@pytest.fixture
def interrupt_receiver(
    stoppoint_channel: tuple[Interrupter, MemoryObjectReceiveStream[InterruptSignal]],
) -> MemoryObjectReceiveStream[InterruptSignal]:
    """The receiver of `stoppoint_channel`, to pass as `flow.run(interrupts=...)`."""
    return stoppoint_channel[1]
