"""InterruptSignal, Interrupter and interrupt_channel (API.md §1)."""

from datetime import UTC, datetime

import anyio
import pydantic
import pytest

import stoppoint as sp


def test_signal_defaults_and_frozen() -> None:
    before = datetime.now(UTC)
    signal = sp.InterruptSignal()
    assert signal.reason == "interrupted"
    assert signal.force is False
    assert signal.source is None
    assert before <= signal.sent_at <= datetime.now(UTC)
    assert signal.sent_at.tzinfo is not None
    with pytest.raises(pydantic.ValidationError):
        signal.reason = "changed"  # type: ignore[misc]


def test_signal_rejects_naive_datetime() -> None:
    with pytest.raises(pydantic.ValidationError, match="timezone"):
        sp.InterruptSignal(sent_at=datetime(2026, 1, 1))


def test_channel_rejects_bad_buffer_size() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_buffer_size must be an int >= 1"):
            sp.interrupt_channel(bad)  # type: ignore[arg-type]


def test_receiver_is_an_anyio_memory_stream() -> None:
    interrupter, receiver = sp.interrupt_channel()
    with receiver:
        assert isinstance(receiver, anyio.streams.memory.MemoryObjectReceiveStream)
        assert interrupter.interrupt("first", source="test") is True
        signal = receiver.receive_nowait()
        assert (signal.reason, signal.source) == ("first", "test")
        clone = receiver.clone()
        assert type(clone) is type(receiver)
        clone.close()
        interrupter.close()
        with pytest.raises(anyio.EndOfStream):
            receiver.receive_nowait()


def test_interrupt_never_blocks_or_raises_when_full_or_closed() -> None:
    interrupter, receiver = sp.interrupt_channel(max_buffer_size=2)
    assert interrupter.interrupt("a") is True
    assert interrupter.interrupt("b") is True
    assert interrupter.interrupt("c") is False  # buffer full: dropped, not blocked
    assert [receiver.receive_nowait().reason for _ in range(2)] == ["a", "b"]
    receiver.close()
    assert interrupter.interrupt("after the receiver closed") is False
    interrupter.close()
    assert interrupter.interrupt("after close") is False
    interrupter.close()  # idempotent


def test_interrupter_context_managers_close() -> None:
    interrupter, receiver = sp.interrupt_channel()
    with interrupter as same:
        assert same is interrupter
    assert interrupter.interrupt() is False
    with pytest.raises(anyio.EndOfStream):
        receiver.receive_nowait()
    receiver.close()


def test_clone_keeps_the_channel_open_until_every_clone_is_closed() -> None:
    interrupter, receiver = sp.interrupt_channel()
    other = interrupter.clone()
    interrupter.close()
    assert other.interrupt("from the clone") is True
    assert receiver.receive_nowait().reason == "from the clone"
    other.close()
    with pytest.raises(anyio.EndOfStream):
        receiver.receive_nowait()
    receiver.close()
    with pytest.raises(anyio.ClosedResourceError):
        interrupter.clone()


@pytest.mark.anyio
async def test_send_and_async_context_manager() -> None:
    interrupter, receiver = sp.interrupt_channel()
    async with interrupter:
        signal = sp.InterruptSignal(reason="sent", source="api")
        await interrupter.send(signal)
        assert receiver.receive_nowait() is signal
        with pytest.raises(TypeError, match="expects an InterruptSignal, got str"):
            await interrupter.send("stop")  # type: ignore[arg-type]
    with pytest.raises(anyio.ClosedResourceError):
        await interrupter.send(sp.InterruptSignal())
    receiver.close()


@pytest.mark.anyio
async def test_send_after_every_receiver_closed_is_not_an_error() -> None:
    interrupter, receiver = sp.interrupt_channel()
    receiver.close()
    await interrupter.send(sp.InterruptSignal())
    interrupter.close()
