"""Declaring a step: what each parameter of a step function is (the context, another step's output, a flow
input, a resource), and the checks of a declaration (names, kinds, `after=`, `retry=`, `timeout=`), each
failing with a `FlowDefinitionError` that names the flow, the step and the problem."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from ._context import StepContext
from ._errors import FlowDefinitionError
from ._plan import Input, StepSpec
from ._resource import is_resource
from ._retry import Retry, check_timeout

__all__ = [
    "INHERIT",
    "check_after",
    "check_kinds",
    "check_new_name",
    "check_retry",
    "check_timeout_of",
    "step_parameters",
]

_CONTEXT_NAME = "ctx"
_NO_DEFAULT = inspect.Parameter.empty


class _Inherit:
    """`retry=` / `timeout=` not given to `@flow.step`: the flow's default applies."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<the flow's default>"


INHERIT: Any = _Inherit()


def check_retry(where: str, retry: object) -> Retry | None:
    if retry is not None and not isinstance(retry, Retry):
        raise FlowDefinitionError(f"{where}: retry= must be a stoppoint.Retry or None, got {retry!r}")
    return retry


def check_timeout_of(where: str, timeout: object) -> float | None:
    try:
        return check_timeout(where, timeout)
    except (TypeError, ValueError) as exc:
        raise FlowDefinitionError(str(exc)) from None


def _is_context_annotation(annotation: Any) -> bool:
    """`StepContext`, or an optional/union that includes it (`StepContext | None`)."""
    if annotation is StepContext:
        return True
    if isinstance(annotation, str):
        # Under `from __future__ import annotations` the annotation is a string; do not eval it.
        parts = annotation.replace("Optional[", "").replace("]", "").split("|")
        return any(part.strip().rsplit(".", 1)[-1] == "StepContext" for part in parts)
    return any(arg is StepContext for arg in typing.get_args(annotation))


def step_parameters(
    where: str, fn: Callable[..., Awaitable[Any]], step_name: str, earlier: Mapping[str, object]
) -> tuple[str | None, list[str], list[Input], list[str]]:
    """Sort a step function's parameters: (its context parameter, the earlier steps whose outputs
    it takes, the flow inputs it takes, its resources).

    Raises:
        FlowDefinitionError: A parameter no step may have (`where` names the flow and step).
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise FlowDefinitionError(f"{where}: cannot read the signature: {exc}") from exc
    context_param: str | None = None
    dependencies: list[str] = []
    inputs: list[Input] = []
    resources: list[str] = []
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL or param.kind is inspect.Parameter.VAR_KEYWORD:
            star = "*" if param.kind is inspect.Parameter.VAR_POSITIONAL else "**"
            raise FlowDefinitionError(
                f"{where}: parameter {star}{param.name} is not allowed; steps take named parameters only"
            )
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise FlowDefinitionError(
                f"{where}: parameter {param.name!r} is positional-only; steps are called by parameter name"
            )
        if _is_context_annotation(param.annotation) or param.name == _CONTEXT_NAME:
            if context_param is not None:
                raise FlowDefinitionError(f"{where}: two context parameters ({context_param!r} and {param.name!r})")
            context_param = param.name
        elif param.name == step_name:
            raise FlowDefinitionError(
                f"{where}: parameter {param.name!r} has the step's own name; a step cannot take its own "
                "output, and an input of that name would be shadowed by the step"
            )
        elif is_resource(fn, param.annotation):
            if param.name in earlier:
                raise FlowDefinitionError(
                    f"{where}: resource parameter {param.name!r} has the name of an earlier step; rename one"
                )
            if param.default is not _NO_DEFAULT:
                raise FlowDefinitionError(
                    f"{where}: resource parameter {param.name!r} has a default; a resource is always given to "
                    "the run (resources={...})"
                )
            resources.append(param.name)
        elif param.name in earlier:
            dependencies.append(param.name)
        else:
            inputs.append(Input(param.name, param.default is _NO_DEFAULT))
    return context_param, dependencies, inputs, resources


def check_kinds(
    where: str,
    inputs: Iterable[str],
    resources: Iterable[str],
    input_users: Mapping[str, str],
    resource_users: Mapping[str, str],
) -> None:
    """Refuse a name that would be a flow input in one step and a resource in another."""
    for name in inputs:
        if name in resource_users:
            raise FlowDefinitionError(
                f"{where}: {name!r} is a resource of earlier step {resource_users[name]!r} (annotated Resource[...]) "
                "and an input here; annotate both alike or rename one"
            )
    for name in resources:
        if name in input_users:
            raise FlowDefinitionError(
                f"{where}: {name!r} is an input of earlier step {input_users[name]!r} and a resource here "
                "(annotated Resource[...]); annotate both alike or rename one"
            )


def check_new_name(
    where: str,
    step_name: str,
    specs: Mapping[str, StepSpec],
    input_users: Mapping[str, str],
    resource_users: Mapping[str, str],
) -> None:
    """Refuse a step name that is taken: by a step, the step context, or an earlier step's input or resource."""
    if step_name in specs:
        raise FlowDefinitionError(f"{where}: duplicate step name {step_name!r}")
    if step_name == _CONTEXT_NAME:
        raise FlowDefinitionError(f"{where}: {_CONTEXT_NAME!r} is reserved for the step context")
    if step_name in input_users:
        raise FlowDefinitionError(
            f"{where}: the name {step_name!r} is already an input of earlier step "
            f"{input_users[step_name]!r}; rename the step or that parameter"
        )
    if step_name in resource_users:
        raise FlowDefinitionError(
            f"{where}: the name {step_name!r} is already a resource of earlier step "
            f"{resource_users[step_name]!r}; rename the step or that parameter"
        )


def check_after(where: str, after: str | Iterable[str], specs: Mapping[str, StepSpec]) -> tuple[str, ...]:
    """`after=` as a tuple of earlier steps' names, each once."""
    after_names = (after,) if isinstance(after, str) else tuple(after)
    for other in after_names:
        if not isinstance(other, str):
            raise FlowDefinitionError(f"{where}: after= must hold step names, got {other!r}")
        if other not in specs:
            known = ", ".join(specs) or "none yet"
            raise FlowDefinitionError(f"{where}: after={other!r} is not an earlier step (declared so far: {known})")
    return tuple(dict.fromkeys(after_names))
