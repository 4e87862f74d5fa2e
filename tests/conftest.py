import inspect
from collections.abc import Iterator

import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

import stoppoint as sp


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


Channel = tuple[sp.Interrupter, MemoryObjectReceiveStream[sp.InterruptSignal]]


@pytest.fixture
def channel() -> Iterator[Channel]:
    """An interrupt channel, closed after the test (anyio warns about unclosed streams)."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        yield interrupter, receiver


def line_after() -> int:
    """The line number after the caller's line (where the stopping point under test is)."""
    frame = inspect.currentframe()
    assert frame is not None
    assert frame.f_back is not None
    return frame.f_back.f_lineno + 1
