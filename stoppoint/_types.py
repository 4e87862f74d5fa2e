"""The types a flow's values are validated into: its steps' annotations, each resolved alone.

One lookup serves every reader (checkpoints typing stored values back, `run()` checking its inputs,
the command validating its own), and one cache of the pydantic validators built from them.
Annotation text is resolved with `typing.get_type_hints` in the step's module, never `eval`.
"""

from __future__ import annotations

import functools
import typing
import weakref
from typing import Any

from pydantic import TypeAdapter

from ._plan import Plan

__all__ = ["Unresolved", "adapter", "hint", "input_type", "output_type", "type_name"]


class Unresolved:
    """An annotation that names something not reachable from the step's module."""

    def __init__(self, text: str, error: Exception) -> None:
        self.text = text
        self.error = error


class _Annotations:
    """Holds one annotation, so `typing.get_type_hints` resolves it alone."""

    def __init__(self, annotations: dict[str, Any]) -> None:
        self.__annotations__ = annotations


# Annotation text resolved once per step function (held weakly): run() checks its inputs at every
# run, and `get_type_hints` costs ~10 us a name. Keyed by the text too: a changed annotation is
# resolved again (a module global rebound after it was resolved is not, as for pydantic's models).
_resolved: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]] = weakref.WeakKeyDictionary()


def hint(fn: Any, name: str) -> Any:
    """The resolved annotation `name` of `fn` (`"return"` for its result): Any when it has none,
    `Unresolved` when its text names something the step's module cannot see.

    Each annotation is resolved alone: a parameter annotated with a name imported only under
    TYPE_CHECKING (often `StepContext`) must not cost another parameter its type.
    """
    annotation = getattr(fn, "__annotations__", {}).get(name, Any)
    if not isinstance(annotation, str):
        return annotation
    try:
        known = _resolved.setdefault(fn, {})
    except TypeError:  # not weakly referable (an `async def` function always is)
        known = {}
    key = (name, annotation)
    if key in known:
        return known[key]
    try:
        globalns = getattr(fn, "__globals__", None)
        resolved = typing.get_type_hints(_Annotations({name: annotation}), globalns=globalns)[name]
    except Exception as exc:
        # Typically a class defined inside a function, under `from __future__ import annotations`.
        # Handing back the raw JSON instead would fail later, far from the cause.
        return Unresolved(annotation, exc)  # not kept: the name may be defined later
    known[key] = resolved
    return resolved


def output_type(plan: Plan, step: str) -> Any:
    """The type of step `step`'s output: its return annotation (an include step's: the included
    flow's result's)."""
    spec = plan.specs[step]
    if spec.include is not None:
        return output_type(spec.include, spec.include.result)
    return hint(spec.fn, "return")


def input_type(plan: Plan, name: str) -> Any:
    """The type of flow input `name`: the annotation of the first step parameter that takes it,
    looking into included flows."""
    spec = plan.specs[plan.input_users[name]]
    if spec.include is not None:
        return input_type(spec.include, name)
    return hint(spec.fn, name)


def type_name(annotation: Any) -> str:
    """A type as a message shows it: `int`, `list[str]`, `Optional[int]`."""
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


@functools.lru_cache(maxsize=256)
def _cached_adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def adapter(annotation: Any) -> TypeAdapter[Any]:
    """The TypeAdapter of `annotation`, built once: building one costs far more than validating
    with it. What pydantic raises building one (`PydanticSchemaGenerationError` for a type it
    cannot validate) is raised, and not cached."""
    try:
        return _cached_adapter(annotation)
    except TypeError:  # unhashable (an Annotated with a list in it, say)
        return TypeAdapter(annotation)
