"""Sync and async sources, and closing generators: the rules `ctx.iterate()` and `interruptible()` share.

Both take a source that may be an `Iterable` or an `AsyncIterable`, hand out its items one by one
from an async iterator, and close the source when a loop over it is left unfinished if, and only
if, it is a generator.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sized
from typing import TypeVar

T = TypeVar("T")


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
