"""Declaring flows: parameter resolution, the graph, and every FlowDefinitionError (API.md §2)."""

from __future__ import annotations

import functools
from typing import Any, Optional

import pytest

import stoppoint as sp


def make_flow() -> sp.Flow:
    flow = sp.Flow("deploy", version="2", max_concurrency=3)

    @flow.step
    async def server(ctx: sp.StepContext, host: str, port: int = 22) -> str:
        return f"{host}:{port}"

    @flow.step
    async def upload(ctx: sp.StepContext, server: str, parts: int) -> int:
        return parts

    @flow.step(name="config", after=("server",))
    async def write_config(upload: int, host: str) -> str:
        return "cfg"

    @flow.step(after="config")
    async def start(ctx: Any) -> None:
        return None

    return flow


def test_steps_inputs_graph() -> None:
    flow = make_flow()
    assert flow.name == "deploy"
    assert flow.version == "2"
    assert flow.max_concurrency == 3
    assert flow.steps == ("server", "upload", "config", "start")
    assert flow.inputs == ("host", "parts")  # port has a default: not required
    assert flow.graph() == {
        "server": (),
        "upload": ("server",),
        "config": ("upload", "server"),
        "start": ("config",),
    }
    assert flow.result == "start"
    assert "deploy" in repr(flow)


def test_decorator_returns_the_function_unchanged() -> None:
    flow = sp.Flow("f")

    async def body() -> int:
        return 1

    assert flow.step(body) is body
    assert flow.step(name="other")(body) is body
    assert flow.steps == ("body", "other")


def test_context_parameter_by_annotation_or_name() -> None:
    flow = sp.Flow("f")

    @flow.step
    async def a(context: sp.StepContext) -> None: ...

    @flow.step
    async def b(ctx) -> None:  # type: ignore[no-untyped-def]
        ...

    assert flow.inputs == ()
    assert flow._specs["a"].context_param == "context"
    assert flow._specs["b"].context_param == "ctx"


def test_result_names_another_step() -> None:
    flow = sp.Flow("f", result="a")

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b() -> int:
        return 2

    assert flow.result == "a"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, r"Flow\(\): name must be a non-empty str"),
        ({"name": "f", "version": ""}, r"flow 'f': version must be a non-empty str"),
        ({"name": "f", "max_concurrency": 0}, r"flow 'f': max_concurrency must be None or an int >= 1, got 0"),
        ({"name": "f", "max_concurrency": 1.5}, r"flow 'f': max_concurrency must be None or an int >= 1"),
        ({"name": "f", "result": ""}, r"flow 'f': result must be a step name"),
    ],
)
def test_bad_flow_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(sp.FlowDefinitionError, match=match):
        sp.Flow(**kwargs)


def test_sync_function_is_rejected() -> None:
    flow = sp.Flow("deploy")
    with pytest.raises(sp.FlowDefinitionError, match=r"flow 'deploy', step 'server': not an `async def` function"):

        @flow.step
        def server(host: str) -> str:  # type: ignore[type-var]
            return host


def test_async_generator_is_rejected() -> None:
    flow = sp.Flow("deploy")
    with pytest.raises(sp.FlowDefinitionError, match=r"flow 'deploy', step 'parts': an async generator"):

        @flow.step
        async def parts():  # type: ignore[no-untyped-def]
            yield 1


def test_duplicate_step_name() -> None:
    flow = sp.Flow("deploy")

    @flow.step
    async def server() -> None: ...

    with pytest.raises(sp.FlowDefinitionError, match=r"flow 'deploy', step 'server': duplicate step name 'server'"):

        @flow.step(name="server")
        async def other() -> None: ...

    assert flow.steps == ("server",)


def test_unknown_after() -> None:
    flow = sp.Flow("deploy")

    @flow.step
    async def server() -> None: ...

    with pytest.raises(
        sp.FlowDefinitionError, match=r"flow 'deploy', step 'upload': after='nowhere' is not an earlier step"
    ):

        @flow.step(after=("server", "nowhere"))
        async def upload() -> None: ...

    assert flow.steps == ("server",)


def test_after_a_later_step_is_rejected() -> None:
    flow = sp.Flow("deploy")
    with pytest.raises(sp.FlowDefinitionError, match=r"step 'upload': after='config' is not an earlier step"):

        @flow.step(after="config")
        async def upload() -> None: ...


def test_after_must_hold_names() -> None:
    flow = sp.Flow("deploy")
    with pytest.raises(sp.FlowDefinitionError, match=r"step 'upload': after= must hold step names, got 3"):

        @flow.step(after=[3])  # type: ignore[list-item]
        async def upload() -> None: ...


def test_step_named_like_an_input_used_earlier() -> None:
    flow = sp.Flow("deploy")

    @flow.step
    async def server(host: str) -> str:
        return host

    with pytest.raises(
        sp.FlowDefinitionError,
        match=r"flow 'deploy', step 'host': the name 'host' is already an input of earlier step 'server'",
    ):

        @flow.step
        async def host() -> str:
            return "h"


@pytest.mark.parametrize("star", ["args", "kwargs"])
def test_var_parameters_are_rejected(star: str) -> None:
    flow = sp.Flow("deploy")
    if star == "args":

        async def fn(*parts: str) -> None: ...

        match = r"flow 'deploy', step 'fn': parameter \*parts is not allowed"
    else:

        async def fn(**options: str) -> None: ...  # type: ignore[misc]

        match = r"flow 'deploy', step 'fn': parameter \*\*options is not allowed"
    with pytest.raises(sp.FlowDefinitionError, match=match):
        flow.step(fn)


def test_positional_only_parameter_is_rejected() -> None:
    flow = sp.Flow("deploy")

    async def fn(host: str, /) -> None: ...

    with pytest.raises(sp.FlowDefinitionError, match=r"step 'fn': parameter 'host' is positional-only"):
        flow.step(fn)


def test_two_context_parameters() -> None:
    flow = sp.Flow("deploy")

    async def fn(ctx: sp.StepContext, context: sp.StepContext) -> None: ...

    with pytest.raises(sp.FlowDefinitionError, match=r"step 'fn': two context parameters \('ctx' and 'context'\)"):
        flow.step(fn)


def test_step_named_ctx_is_reserved() -> None:
    flow = sp.Flow("deploy")

    async def fn() -> None: ...

    with pytest.raises(sp.FlowDefinitionError, match=r"step 'ctx': 'ctx' is reserved for the step context"):
        flow.step(name="ctx")(fn)


def test_bad_step_name() -> None:
    flow = sp.Flow("deploy")

    async def fn() -> None: ...

    with pytest.raises(sp.FlowDefinitionError, match=r"flow 'deploy': step name must be a non-empty str, got ''"):
        flow.step(name="")(fn)


def test_not_callable() -> None:
    flow = sp.Flow("deploy")
    with pytest.raises(
        sp.FlowDefinitionError, match=r"flow 'deploy', step None: a step must be an `async def` function, got int"
    ):
        flow.step(42)  # type: ignore[type-var]


def test_empty_flow_has_no_result() -> None:
    with pytest.raises(sp.FlowDefinitionError, match=r"flow 'empty' has no steps"):
        _ = sp.Flow("empty").result


def test_unknown_result_step() -> None:
    flow = sp.Flow("deploy", result="nowhere")

    @flow.step
    async def server() -> None: ...

    with pytest.raises(
        sp.FlowDefinitionError, match=r"flow 'deploy': result='nowhere' is not a step \(steps: server\)"
    ):
        _ = flow.result


def test_parameter_named_like_its_own_step() -> None:
    flow = sp.Flow("deploy")

    async def server(server: str) -> str:
        return server

    with pytest.raises(sp.FlowDefinitionError, match=r"step 'server': parameter 'server' has the step's own name"):
        flow.step(server)


def test_optional_context_annotation_is_the_context() -> None:
    flow = sp.Flow("f")

    @flow.step
    async def a(context: sp.StepContext | None = None) -> None: ...

    @flow.step
    async def b(context: Optional[sp.StepContext] = None) -> None:  # noqa: UP045 - the spelling under test
        ...

    assert flow._specs["a"].context_param == "context"
    assert flow._specs["b"].context_param == "context"
    assert flow.inputs == ()


def test_partial_needs_a_name() -> None:
    flow = sp.Flow("f")

    async def body(x: int) -> int:
        return x

    with pytest.raises(
        sp.FlowDefinitionError, match=r"has no __name__ \(a functools.partial\?\); give the step a name="
    ):
        flow.step(functools.partial(body, x=1))
    flow.step(name="one")(functools.partial(body, x=1))
    assert flow.steps == ("one",)
