"""Nested flows: `flow.include(other)` runs a whole flow as one step (API.md §2)."""

from __future__ import annotations

import inspect

import anyio
import anyio.lowlevel
import pytest

import stoppoint as sp

from .conftest import Channel, line_after

pytestmark = pytest.mark.anyio


def inner_flow(ran: list[str], interrupter: sp.Interrupter | None = None, interrupt_in: str | None = None) -> sp.Flow:
    """x -> y -> z -> w, fed by the outer `prepare` step and the input `factor`; the step named
    `interrupt_in` interrupts the run."""
    inner = sp.Flow("inner")

    def note(ctx: sp.StepContext) -> None:
        assert ctx.flow == "inner"
        ran.append(ctx.step)
        if ctx.step == interrupt_in:
            assert interrupter is not None
            interrupter.interrupt(f"in {ctx.step}", source="test")

    @inner.step
    async def x(ctx: sp.StepContext, prepare: int, factor: int) -> int:
        note(ctx)
        return prepare * factor

    @inner.step
    async def y(ctx: sp.StepContext, x: int) -> int:
        note(ctx)
        return x + 1

    @inner.step
    async def z(ctx: sp.StepContext, y: int) -> int:
        note(ctx)
        return y + 1

    @inner.step
    async def w(ctx: sp.StepContext, z: int) -> int:
        note(ctx)
        return z + 1

    return inner


def outer_flow(inner: sp.Flow, ran: list[str], name: str | None = None) -> sp.Flow:
    """prepare -> the included flow -> finish (which takes the include step's output)."""
    outer = sp.Flow("outer")
    include_name = name or inner.name

    @outer.step
    async def prepare(base: int) -> int:
        ran.append("prepare")
        return base

    outer.include(inner, name=name)

    async def finish(**results: int) -> int:
        ran.append("finish")
        return results[include_name] * 10

    finish.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(include_name, inspect.Parameter.KEYWORD_ONLY)]
    )
    outer.step(name="finish")(finish)
    return outer


async def test_an_included_flow_runs_as_one_step() -> None:
    ran: list[str] = []
    outer = outer_flow(inner_flow(ran), ran)
    assert outer.steps == ("prepare", "inner", "finish")
    assert outer.inputs == ("base", "factor")
    assert outer.graph() == {"prepare": (), "inner": ("prepare",), "finish": ("inner",)}
    outcome = await outer.run({"base": 2, "factor": 3}, run_id="r1")
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == (2 * 3 + 3) * 10
    assert ran == ["prepare", "x", "y", "z", "w", "finish"]
    step = outcome.report.steps["inner"]
    assert step.status is sp.StepStatus.COMPLETED
    assert step.nested is not None
    assert step.nested.flow == "inner"
    assert step.nested.run_id == "r1"
    assert step.nested.completed == ["x", "y", "z", "w"]
    assert outcome.report.steps["prepare"].nested is None


async def test_include_under_another_name() -> None:
    ran: list[str] = []
    outer = outer_flow(inner_flow(ran), ran, name="crunch")
    outcome = await outer.run({"base": 1, "factor": 1})
    assert isinstance(outcome, sp.Completed)
    assert list(outcome.report.steps) == ["prepare", "crunch", "finish"]


@pytest.mark.parametrize(
    ("interrupt_in", "inner_completed"),
    [("x", ["x"]), ("y", ["x", "y"]), ("w", None)],
)
async def test_an_interrupt_stops_the_inner_flow_between_its_steps(
    channel: Channel, interrupt_in: str, inner_completed: list[str] | None
) -> None:
    interrupter, receiver = channel
    ran: list[str] = []
    outer = outer_flow(inner_flow(ran, interrupter, interrupt_in), ran)
    outcome = await outer.run({"base": 2, "factor": 3}, interrupts=receiver)
    if inner_completed is None:
        # The interrupt came during the inner flow's last step: the include step completed, and
        # the outer flow stops before `finish`.
        assert isinstance(outcome, sp.Interrupted)
        assert outcome.report.completed == ["prepare", "inner"]
        assert outcome.report.not_started == ["finish"]
        assert outcome.checkpoint.nested == {}
        return
    assert isinstance(outcome, sp.Interrupted)
    assert ran == ["prepare", *inner_completed]
    report = outcome.report
    assert report.completed == ["prepare"]
    assert report.stopped == ["inner"]
    assert report.not_started == ["finish"]
    nested = report.steps["inner"].nested
    assert nested is not None
    assert nested.completed == inner_completed
    assert nested.not_started == [s for s in ["x", "y", "z", "w"] if s not in inner_completed]
    assert report.steps["inner"].stopped_at is None  # stopped between inner steps
    # The checkpoint keeps the inner flow's completed outputs under the include step's name.
    assert outcome.checkpoint.outputs == {"prepare": 2}
    assert set(outcome.checkpoint.nested["inner"].outputs) == set(inner_completed)
    assert outcome.checkpoint.nested["inner"].flow == "inner"


async def test_a_stopping_point_inside_an_inner_step_stops_it_and_says_where(channel: Channel) -> None:
    interrupter, receiver = channel
    inner = sp.Flow("inner")
    lines: list[str] = []

    @inner.step
    async def crawl(ctx: sp.StepContext) -> int:
        interrupter.interrupt()
        lines.append(f"test_nested.py:{line_after()}")
        await ctx.checkpoint()
        return 1  # pragma: no cover

    outer = sp.Flow("outer")
    outer.include(inner)
    outcome = await outer.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    step = outcome.report.steps["inner"]
    assert step.status is sp.StepStatus.INTERRUPTED
    assert step.stopped_at == lines[0]
    assert step.nested is not None
    assert step.nested.steps["crawl"].stopped_at == lines[0]
    assert outcome.report.interrupts == [outcome.signal]
    assert step.nested.interrupts == []  # signals are listed once, in the top-level report


@pytest.mark.parametrize("n", [0, 1, 2, 3])
async def test_poll_next_n_counts_the_steps_of_included_flows(channel: Channel, n: int) -> None:
    """PollNextN(n) after an interrupt in x: n more leaf steps, across the nesting (the include step
    itself does not count)."""
    interrupter, receiver = channel
    ran: list[str] = []
    outer = outer_flow(inner_flow(ran, interrupter, "x"), ran)
    outcome = await outer.run({"base": 1, "factor": 1}, interrupts=receiver, strategy=sp.PollNextN(n))
    leaf_order = ["y", "z", "w", "finish"]
    assert ran == ["prepare", "x", *leaf_order[:n]]
    assert isinstance(outcome, sp.Interrupted)


async def test_finish_current_lets_the_inner_step_finish_and_starts_nothing(channel: Channel) -> None:
    interrupter, receiver = channel
    ran: list[str] = []
    outer = outer_flow(inner_flow(ran, interrupter, "y"), ran)
    outcome = await outer.run({"base": 1, "factor": 1}, interrupts=receiver, strategy=sp.FinishCurrent())
    assert ran == ["prepare", "x", "y"]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["inner"]


async def test_ignore_interruptions_runs_the_nested_flow_to_the_end(channel: Channel) -> None:
    interrupter, receiver = channel
    ran: list[str] = []
    outer = outer_flow(inner_flow(ran, interrupter, "x"), ran)
    outcome = await outer.run({"base": 1, "factor": 1}, interrupts=receiver, strategy=sp.IgnoreInterruptions())
    assert isinstance(outcome, sp.Completed)
    assert ran == ["prepare", "x", "y", "z", "w", "finish"]


async def test_force_cancels_the_inner_step_and_the_include_step(channel: Channel) -> None:
    interrupter, receiver = channel
    inner = sp.Flow("inner")
    started = anyio.Event()

    @inner.step
    async def done() -> int:
        return 1

    @inner.step
    async def stuck(done: int) -> int:
        started.set()
        await anyio.sleep_forever()
        return done  # pragma: no cover

    outer = sp.Flow("outer")
    outer.include(inner)

    async def force() -> None:
        await started.wait()
        interrupter.interrupt("now", force=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(force)
        outcome = await outer.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.forced
    step = outcome.report.steps["inner"]
    assert step.status is sp.StepStatus.CANCELLED
    assert step.nested is not None
    assert step.nested.completed == ["done"]
    assert step.nested.cancelled == ["stuck"]
    assert outcome.checkpoint.nested["inner"].outputs == {"done": 1}


async def test_a_failing_inner_step_fails_the_include_step() -> None:
    inner = sp.Flow("inner")

    @inner.step
    async def explode() -> int:
        raise ValueError("boom")

    outer = sp.Flow("outer")

    @outer.step
    async def before() -> int:
        return 1

    outer.include(inner, after="before")

    @outer.step
    async def after(inner: int) -> int:  # pragma: no cover - never runs
        return inner

    with pytest.raises(sp.StepFailed) as info:
        await outer.run()
    error = info.value
    assert error.step == "inner"
    assert isinstance(error.__cause__, sp.StepFailed)
    assert error.__cause__.step == "explode"
    assert isinstance(error.__cause__.__cause__, ValueError)
    assert error.report.failed == ["inner"]
    assert error.report.not_started == ["after"]
    nested = error.report.steps["inner"].nested
    assert nested is not None
    assert nested.failed == ["explode"]
    assert error.checkpoint.outputs == {"before": 1}


async def test_two_levels_of_nesting(channel: Channel) -> None:
    interrupter, receiver = channel
    innermost = sp.Flow("innermost")

    @innermost.step
    async def deep(ctx: sp.StepContext, seed: int) -> int:
        return seed + 1

    @innermost.step
    async def deeper(ctx: sp.StepContext, deep: int) -> int:
        interrupter.interrupt()
        await ctx.checkpoint()
        return deep  # pragma: no cover

    middle = sp.Flow("middle")
    middle.include(innermost)
    top = sp.Flow("top")
    top.include(middle)
    outcome = await top.run({"seed": 1}, interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    middle_report = outcome.report.steps["middle"]
    assert middle_report.status is sp.StepStatus.INTERRUPTED
    assert middle_report.nested is not None
    inner_report = middle_report.nested.steps["innermost"]
    assert inner_report.status is sp.StepStatus.INTERRUPTED
    assert inner_report.nested is not None
    assert inner_report.nested.stopped == ["deeper"]
    assert middle_report.stopped_at == inner_report.stopped_at == inner_report.nested.steps["deeper"].stopped_at
    checkpoint = outcome.checkpoint.nested["middle"].nested["innermost"]
    assert checkpoint.outputs == {"deep": 2}


async def test_optional_inner_inputs_stay_optional() -> None:
    inner = sp.Flow("inner")

    @inner.step
    async def greet(name: str, punctuation: str = "!") -> str:
        return f"hello {name}{punctuation}"

    outer = sp.Flow("outer")
    outer.include(inner)
    assert outer.inputs == ("name",)
    assert (await outer.run({"name": "ada"})).value == "hello ada!"  # type: ignore[union-attr]
    assert (await outer.run({"name": "ada", "punctuation": "?"})).value == "hello ada?"  # type: ignore[union-attr]
    with pytest.raises(sp.FlowInputError, match="missing input\\(s\\) 'name'"):
        await outer.run({})


async def test_one_flow_included_twice_runs_twice() -> None:
    inner = sp.Flow("inc")

    @inner.step
    async def bump(value: int) -> int:
        return value + 1

    outer = sp.Flow("outer")

    @outer.step
    async def value() -> int:
        return 1

    outer.include(inner, name="first")

    @outer.step(name="value2")
    async def rename(first: int) -> int:
        return first

    nested_again = sp.Flow("inc2")

    @nested_again.step
    async def bump2(value2: int) -> int:
        return value2 + 1

    outer.include(nested_again, name="second")
    outer.include(inner, name="third")
    outcome = await outer.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.report.completed == ["value", "first", "value2", "second", "third"]
    assert outcome.value == 2  # `third` is fed by `value`


# -- definition errors ------------------------------------------------------------------------------------


def make_inner() -> sp.Flow:
    inner = sp.Flow("inner")

    @inner.step
    async def only(seed: int) -> int:
        return seed

    return inner


def test_include_refuses_what_is_not_a_flow() -> None:
    outer = sp.Flow("outer")

    async def fn() -> None:
        pass

    with pytest.raises(sp.FlowDefinitionError, match="flow 'outer': include\\(\\) needs a Flow, got function"):
        outer.include(fn)  # type: ignore[arg-type]


def test_a_flow_cannot_include_itself() -> None:
    outer = sp.Flow("outer")
    with pytest.raises(sp.FlowDefinitionError, match="flow 'outer', step 'outer': a flow cannot include itself"):
        outer.include(outer)


def test_an_empty_flow_cannot_be_included() -> None:
    with pytest.raises(sp.FlowDefinitionError, match="cannot include flow 'empty': flow 'empty' has no steps"):
        sp.Flow("outer").include(sp.Flow("empty"))


def test_include_name_clashes() -> None:
    outer = sp.Flow("outer")

    @outer.step
    async def inner() -> int:
        return 1

    with pytest.raises(sp.FlowDefinitionError, match="duplicate step name 'inner'"):
        outer.include(make_inner())
    with pytest.raises(sp.FlowDefinitionError, match="'ctx' is reserved"):
        outer.include(make_inner(), name="ctx")
    with pytest.raises(sp.FlowDefinitionError, match="has an input named 'seed' like the include step"):
        outer.include(make_inner(), name="seed")
    with pytest.raises(sp.FlowDefinitionError, match="after='nope' is not an earlier step"):
        outer.include(make_inner(), name="other", after="nope")
    with pytest.raises(sp.FlowDefinitionError, match="step name must be a non-empty str"):
        outer.include(make_inner(), name="")


def test_an_include_step_may_not_shadow_an_earlier_input() -> None:
    outer = sp.Flow("outer")

    @outer.step
    async def first(inner: int) -> int:
        return inner

    with pytest.raises(sp.FlowDefinitionError, match="already an input of earlier step 'first'"):
        outer.include(make_inner())


async def test_including_freezes_the_included_flow() -> None:
    inner = make_inner()
    sp.Flow("outer").include(inner)
    with pytest.raises(sp.FlowDefinitionError, match="declare every step before that"):

        @inner.step
        async def late() -> int:  # pragma: no cover
            return 1


async def test_cannot_include_into_a_flow_that_has_run() -> None:
    outer = make_inner()
    await outer.run({"seed": 1})
    with pytest.raises(sp.FlowDefinitionError, match="declare every step before that"):
        outer.include(sp.Flow("x"))
