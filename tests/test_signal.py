"""InterruptSignal, Interrupter and interrupt_channel (API.md §1)."""

import copy
import gc
import pickle
import weakref
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


@pytest.mark.anyio
async def test_send_is_not_held_back_by_a_full_clone_nobody_reads() -> None:
    interrupter, receiver = sp.interrupt_channel(max_buffer_size=1)
    unread = receiver.clone()
    with interrupter, receiver, unread:
        interrupter.interrupt("fills both buffers")
        receiver.receive_nowait()  # `receiver` has room again; `unread` stays full
        with anyio.move_on_after(0.05):
            # `unread` is full and nobody reads it: send() waits for it, but only after every
            # other clone got the signal.
            await interrupter.send(sp.InterruptSignal(reason="second"))
        assert receiver.receive_nowait().reason == "second"


def test_dropped_clones_are_not_kept_alive_by_the_channel() -> None:
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        clone = receiver.clone()
        ref = weakref.ref(clone)
        with pytest.warns(ResourceWarning, match="Unclosed <_LinkedReceiver"):
            del clone  # the user's leak is reported; the channel does not keep the clone alive
        gc.collect()
        assert ref() is None
        receiver.close()
        assert interrupter.interrupt("nobody can read this") is False


def test_copies_are_clones_and_pickling_is_refused() -> None:
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        other = copy.copy(interrupter)
        other.close()  # a copy is a clone: closing it does not end the channel
        assert interrupter.interrupt("still open") is True
        assert receiver.receive_nowait().reason == "still open"
        with copy.deepcopy(receiver) as also:
            assert interrupter.interrupt("to both")
            assert also.receive_nowait().reason == "to both"
            assert receiver.receive_nowait().reason == "to both"
        with pytest.raises(TypeError, match="cannot pickle an Interrupter"):
            pickle.dumps(interrupter)
        with pytest.raises(TypeError, match="cannot pickle an interrupt receiver"):
            pickle.dumps(receiver)


def test_an_unclosed_interrupter_warns_and_ends_the_stream() -> None:
    interrupter, receiver = sp.interrupt_channel()
    with receiver:
        with pytest.warns(ResourceWarning, match="Unclosed <Interrupter"):
            del interrupter
        with pytest.raises(anyio.EndOfStream):
            receiver.receive_nowait()
