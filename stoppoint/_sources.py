"""Sync and async sources, and closing generators: the rules `ctx.iterate()` and `interruptible()` share.

Both take a source that may be an `Iterable` or an `AsyncIterable`, hand out its items one by one
from an async iterator, and close the source when a loop over it is left unfinished if, and only
if, it is a generator.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Generator, Iterable, Iterator, Sized
from typing import TypeVar

import anyio

T = TypeVar("T")

# Stepping an opened source is `await iterator.__anext__()` when it is async, `next(iterator)` when
# it is sync, until END_OF_SOURCE. It is the one rule not called from here: the iterators of
# ctx.iterate() and interruptible() spell it inline, one line each in their `__anext__`, because one
# more call per item costs them 8-10% (python -m benchmarks.compare).
END_OF_SOURCE = (StopIteration, StopAsyncIteration)
"""What a source raises at its end: either is accepted from either kind of source, as the end."""


def open_source(source: AsyncIterable[T] | Iterable[T]) -> tuple[Iterator[T] | AsyncIterator[T], bool, int] | None:
    """`(iterator, is_async, size)` of `source`, or None when it is neither iterable nor async iterable.

    `size` is `len(source)` for a sized source (list, range, ...), else -1. The caller raises the
    TypeError for None, in its own words.
    """
    size = len(source) if isinstance(source, Sized) else -1
    # Async first: an object that offers both is iterated the async way, which does not block the loop.
    if isinstance(source, AsyncIterable):
        return source.__aiter__(), True, size
    if isinstance(source, Iterable):
        return iter(source), False, size
    return None


def is_generator(iterator: object) -> bool:
    """Whether `iterator` is a generator, sync or async: the only sources closed when a loop is cut short.

    A generator left unfinished runs its `finally` blocks only when closed (or collected, which trio
    reports as a warning for an async one); other iterators, such as streams or `iter(list)`, keep
    what was not taken and stay open for their owner.
    """
    return isinstance(iterator, Generator | AsyncGenerator)


async def close_generator(iterator: object, *, shield: bool = False) -> None:
    """Close `iterator` if it is a generator (`aclose()` or `close()`), so its `finally` blocks run now.

    `shield=True` lets an async generator's cleanup complete even when the caller is being
    cancelled. An error its cleanup raises propagates: what to do with it is the caller's call.
    """
    if isinstance(iterator, AsyncGenerator):
        if shield:
            with anyio.CancelScope(shield=True):
                await iterator.aclose()
        else:
            await iterator.aclose()
    elif isinstance(iterator, Generator):
        iterator.close()
