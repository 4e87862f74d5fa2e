"""`Resource[T]`: a step parameter that takes a live object given to the run, not a flow input.

`Resource[T]` is `Annotated[T, RESOURCE]`, so a type checker sees the parameter as a `T`. Which
parameters are resources is decided once, when the step is declared (`is_resource`).
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, TypeVar

__all__ = ["RESOURCE", "Resource", "is_resource"]

T = TypeVar("T")


class _ResourceMarker:
    """The mark `Resource[T]` puts in its `Annotated` metadata."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "stoppoint.RESOURCE"


RESOURCE = _ResourceMarker()

Resource = Annotated[T, RESOURCE]
"""A step parameter annotated `Resource[T]` takes a live object of type `T` (a client, a pool) given as
`flow.run(..., resources={name: obj})` (or `start`, or `Worker(resources=...)`): it is not a flow
input, never serialised or stored, and must be given again on resume."""

# `sp.Resource[...]`, `stoppoint.Resource[...]`, `Resource[...]`: the dotted name before the first `[`.
_HEAD = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\[")


def _marked(annotation: Any) -> bool:
    return typing.get_origin(annotation) is Annotated and any(
        item is RESOURCE for item in getattr(annotation, "__metadata__", ())
    )


def is_resource(fn: Any, annotation: Any) -> bool:
    """Whether a parameter of step function `fn` annotated `annotation` is a resource.

    A string annotation (`from __future__ import annotations`) is not evaluated: only the name before
    its `[` is looked up in the step's module, so `sp.Resource[httpx.AsyncClient]` is recognised even
    when `httpx` is imported only under `TYPE_CHECKING`.
    """
    if not isinstance(annotation, str):
        return _marked(annotation)
    match = _HEAD.match(annotation)
    if match is None:
        return False
    names = match.group(1).split(".")
    namespace = getattr(fn, "__globals__", {})
    if names[0] not in namespace:
        return False
    found: Any = namespace[names[0]]
    for name in names[1:]:
        found = getattr(found, name, None)
        if found is None:
            return False
    return found is Resource or (_marked(found) and typing.get_args(found)[0] is T)
