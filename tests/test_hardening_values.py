"""Issue 13: what run() accepts and what a step returns can be read back, or is refused at once.

- Inputs are validated at `run()`/`start()` against the annotations of the parameters that take them,
  as `load_checkpoint` validates them, before any step starts or anything is stored: a value a resume
  would not read back as given raises `FlowInputError` naming the flow and the input.
- An output (or input) nested deeper than a checkpoint can read back, or an int longer than JSON text
  can carry, is refused when produced: `CheckpointError` naming the step fails it, as an output that
  cannot be serialised does (`FlowInputError` for an input).
- A run id UTF-8 cannot encode raises `FlowInputError` before anything runs or is stored.
- `same_value` never raises.

Every test here failed before its fix, except those pinning what is still accepted on the other side of
each boundary (the deepest output or input, a 4,300-digit int, a live input without a store, inputs kept as given).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import stoppoint as sp
from stoppoint._checkpoint import CheckpointFile, parse_depth, same_value

from .conftest import statuses
from .test_hardening_saves import three_steps

pytestmark = pytest.mark.anyio


def nest(levels: int) -> Any:
    """`levels` lists, one inside the other, around a 1."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


# The JSON parser's limit on nesting, less the two levels a checkpoint's layout wraps a top-level
# value in (the document, its "outputs" or "inputs"); each include step nests two more.
TOP = parse_depth() - 2


def test_the_parser_limit_is_pydantics() -> None:
    assert parse_depth() == 200  # pydantic 2.x's jiter; the boundaries below follow it if it changes


# -- 1. inputs are validated when run() is called ------------------------------------------------------


class Point(BaseModel):
    x: int
    y: int


def typed_flow(calls: list[dict[str, Any]]) -> sp.Flow:
    flow = sp.Flow("typed")

    @flow.step
    async def use(n: int, when: dt.datetime, pair: tuple[int, int], point: Point, anything: Any = None) -> int:
        calls.append({"n": n, "when": when, "pair": pair, "point": point, "anything": anything})
        return n

    return flow


GOOD: dict[str, Any] = {
    "n": 5,
    "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    "pair": (1, 2),
    "point": Point(x=1, y=2),
}


@pytest.mark.parametrize("with_store", [False, True])
async def test_an_input_that_does_not_validate_is_refused_before_anything_runs_or_is_stored(
    store: sp.Store, with_store: bool
) -> None:
    calls: list[dict[str, Any]] = []
    with pytest.raises(sp.FlowInputError, match=r"flow 'typed': input 'n': it does not validate as int") as info:
        await typed_flow(calls).run({**GOOD, "n": "abc"}, store=store if with_store else None, run_id="r")
    assert set(info.value.invalid) == {"n"}
    assert (info.value.missing, info.value.unknown) == ((), ())
    assert calls == []
    assert await store.list_runs() == []
    # The same run id with a good input: nothing of the refused run is in the way.
    outcome = await typed_flow(calls).run(GOOD, store=store, run_id="r")
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 5


@pytest.mark.parametrize("with_store", [False, True])
async def test_an_input_a_resume_would_read_back_as_another_value_is_refused(store: sp.Store, with_store: bool) -> None:
    """pydantic's lax mode reads "5" back as 5: the first run would see "5", a resume 5."""
    calls: list[dict[str, Any]] = []
    with pytest.raises(sp.FlowInputError, match=r"input 'n': a resume would read it back as 5 \(int\)") as info:
        await typed_flow(calls).run({**GOOD, "n": "5"}, store=store if with_store else None, run_id="r")
    assert "not as the str given; pass a int" in info.value.invalid["n"]
    assert calls == []
    assert await store.list_runs() == []


async def test_the_invalid_inputs_are_named_together_with_the_missing_and_unknown_ones() -> None:
    with pytest.raises(sp.FlowInputError) as info:
        await typed_flow([]).run({"n": "x", "pair": [1, "two"], "extra": 1})
    assert info.value.missing == ("when", "point")
    assert info.value.unknown == ("extra",)
    assert set(info.value.invalid) == {"n", "pair"}
    message = str(info.value)
    assert all(part in message for part in ("'when'", "'extra'", "input 'n'", "input 'pair'", "tuple[int, int]"))


async def test_a_step_gets_the_inputs_exactly_as_given_and_a_resume_from_the_store_reads_them_back(
    store: sp.Store,
) -> None:
    flow = sp.Flow("kept")
    calls: list[dict[str, Any]] = []
    broken = [True]

    @flow.step
    async def first(n: int, when: dt.datetime, pair: tuple[int, int], point: Point, anything: Any = None) -> int:
        calls.append({"n": n, "when": when, "pair": pair, "point": point, "anything": anything})
        return n

    @flow.step
    async def second(first: int) -> int:
        if broken[0]:
            raise RuntimeError("not yet")
        return first + 1

    given = {**GOOD, "anything": {"a": (1, 2)}}
    with pytest.raises(sp.StepFailed):
        await flow.run(given, store=store, run_id="k")
    assert all(calls[0][name] is value for name, value in given.items())  # not converted, not copied
    broken[0] = False
    outcome = await flow.run(store=store, run_id="k")  # inputs read back from the store
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 6
    stored = await store.load("kept", "k")
    assert stored is not None
    inputs = flow.load_checkpoint(stored.checkpoint_json).inputs
    assert {name: inputs[name] for name in GOOD} == GOOD
    # Given again, equal inputs resume too; an input as a resume would not read it back is refused.
    assert isinstance(await flow.run(given, store=store, run_id="k"), sp.Completed)


class Handle:
    """A live object (a connection, a client): pydantic validates it in python mode (as a
    `Callable`), as itself."""

    def __call__(self) -> object:  # pragma: no cover - never called
        return self


async def test_without_a_store_a_live_input_that_cannot_be_serialised_is_accepted() -> None:
    flow = sp.Flow("live")
    seen: list[object] = []

    @flow.step
    async def use(handle: Callable[[], object], other: Any) -> int:
        seen.extend([handle, other])
        return 1

    handle, other = Handle(), Handle()
    outcome = await flow.run({"handle": handle, "other": other})
    assert isinstance(outcome, sp.Completed)
    assert seen[0] is handle
    assert seen[1] is other


async def test_with_a_store_an_input_that_cannot_be_serialised_is_refused(store: sp.Store) -> None:
    """Annotated or not (Any): the store could never hold the run."""
    flow = sp.Flow("live")

    @flow.step
    async def use(handle: Callable[[], object], other: Any) -> int:
        raise AssertionError("never runs")  # pragma: no cover

    with pytest.raises(sp.FlowInputError, match=r"input 'handle': it \(Handle\) cannot be serialised") as info:
        await flow.run({"handle": Handle(), "other": Handle()}, store=store, run_id="r")
    assert set(info.value.invalid) == {"handle", "other"}
    assert "it (Handle) cannot be serialised" in info.value.invalid["other"]
    assert await store.list_runs() == []


@dataclasses.dataclass
class Tagged:
    """A dataclass whose `__post_init__` changes what it is given: it does not read back the same."""

    tag: str

    def __post_init__(self) -> None:
        self.tag = self.tag + "!"


async def test_an_input_that_validation_changes_is_refused(store: sp.Store) -> None:
    """Without a store the instance is kept as it is (pydantic does not validate it again); from the
    store's JSON it would be built again."""
    flow = sp.Flow("changes")

    @flow.step
    async def use(tagged: Tagged) -> str:
        return tagged.tag

    with pytest.raises(sp.FlowInputError, match=r"input 'tagged': a resume would read it back as Tagged\(tag='a!!'\)"):
        await flow.run({"tagged": Tagged("a")}, store=store, run_id="t")
    assert await store.list_runs() == []
    outcome = await flow.run({"tagged": Tagged("a")})
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "a!"


async def test_start_validates_the_inputs_too() -> None:
    calls: list[dict[str, Any]] = []
    async with anyio.create_task_group() as task_group:
        with pytest.raises(sp.FlowInputError, match=r"input 'n'"):
            await typed_flow(calls).start(task_group, {**GOOD, "n": "5"})
    assert calls == []


# -- 2. outputs (and inputs) that are saved can be read back ------------------------------------------


async def assert_refused_and_resumable(store: sp.Store, make: Callable[[], object], why: str) -> None:
    """`make` fails its step with a CheckpointError naming it; the run is stored failed, without it,
    and goes on from there once the step returns something storable."""
    calls: list[str] = []
    with pytest.raises(sp.CheckpointError, match=rf"flow 'odd', run 'o': the output of step 'make' {why}"):
        await three_steps(calls, make).run(store=store, run_id="o")
    assert calls == ["first", "make"]
    stored = await store.load("odd", "o")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.FAILED
    report = sp.RunReport.model_validate_json(stored.report_json)
    assert statuses(report)["make"] is sp.StepStatus.FAILED
    assert why.replace("\\", "") in (report.steps["make"].error or "")
    assert three_steps([], make).load_checkpoint(stored.checkpoint_json).outputs == {"first": 1}
    calls.clear()
    outcome = await three_steps(calls, lambda: "fine").run(store=store, run_id="o")
    assert isinstance(outcome, sp.Completed)
    assert calls == ["make", "use"]


async def assert_stored_and_read_back(store: sp.Store, value: object) -> None:
    outcome = await three_steps([], lambda: value).run(store=store, run_id="o")
    assert isinstance(outcome, sp.Completed)
    stored = await store.load("odd", "o")  # SQLiteStore parses the checkpoint as it loads it
    assert stored is not None
    assert three_steps([], lambda: value).load_checkpoint(stored.checkpoint_json).outputs["make"] == value


async def test_the_deepest_output_a_checkpoint_can_hold_is_stored_and_read_back(store: sp.Store) -> None:
    await assert_stored_and_read_back(store, nest(TOP))


async def test_an_output_one_level_deeper_fails_its_step_and_the_run_is_stored_failed(store: sp.Store) -> None:
    """Saved before, it made every later load raise StoreError: recursion limit exceeded."""
    await assert_refused_and_resumable(store, lambda: nest(TOP + 1), rf"is nested {TOP + 1} levels deep")


async def test_an_output_too_deep_to_serialise_at_all_is_refused_the_same_way(store: sp.Store) -> None:
    await assert_refused_and_resumable(store, lambda: nest(300), r"\(list\) cannot be serialised")


def including_flow(calls: list[str], depth: int) -> sp.Flow:
    """outer: inc (the flow inner: deep -> broken) -> after. `deep` returns `depth` nested lists;
    `broken` fails once, so the stored run keeps inner's checkpoint nested in outer's."""
    inner = sp.Flow("inner")

    @inner.step
    async def deep() -> Any:
        calls.append("deep")
        return nest(depth)

    @inner.step
    async def broken(deep: Any) -> int:
        calls.append("broken")
        if calls.count("broken") == 1:
            raise RuntimeError("once")
        return 1

    outer = sp.Flow("outer")
    outer.include(inner, "inc")

    @outer.step
    async def after(inc: int) -> int:
        return inc

    return outer


async def test_in_an_included_flow_the_deepest_output_a_nested_checkpoint_can_hold_is_read_back(
    store: sp.Store,
) -> None:
    calls: list[str] = []
    with pytest.raises(sp.StepFailed):
        await including_flow(calls, TOP - 2).run(store=store, run_id="n")
    stored = await store.load("outer", "n")
    assert stored is not None
    checkpoint = including_flow([], TOP - 2).load_checkpoint(stored.checkpoint_json)
    assert checkpoint.nested["inc"].outputs == {"deep": nest(TOP - 2)}
    outcome = await including_flow(calls, TOP - 2).run(store=store, run_id="n")
    assert isinstance(outcome, sp.Completed)
    assert calls == ["deep", "broken", "broken"]


async def test_in_an_included_flow_an_output_one_level_deeper_fails_its_step(store: sp.Store) -> None:
    calls: list[str] = []
    with pytest.raises(
        sp.CheckpointError,
        match=rf"flow 'inner', run 'n': the output of step 'deep' is nested {TOP - 1} levels deep; .*most {TOP - 2}",
    ):
        await including_flow(calls, TOP - 1).run(store=store, run_id="n")
    assert calls == ["deep"]
    stored = await store.load("outer", "n")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.FAILED
    report = sp.RunReport.model_validate_json(stored.report_json)
    nested = report.steps["inc"].nested
    assert nested is not None
    assert nested.steps["deep"].status is sp.StepStatus.FAILED
    including_flow([], TOP - 1).load_checkpoint(stored.checkpoint_json)  # what is stored reads back


async def test_an_int_of_4300_digits_is_stored_and_read_back(store: sp.Store) -> None:
    await assert_stored_and_read_back(store, 10**4299)


async def test_an_int_longer_than_json_text_can_carry_fails_its_step(store: sp.Store) -> None:
    """Before, run() raised a bare ValueError from json.dumps."""
    await assert_refused_and_resumable(store, lambda: 10**4300, r"holds an int of more than 4300 digits")


def one_input_flow() -> sp.Flow:
    flow = sp.Flow("one")

    @flow.step
    async def use(x: Any) -> int:
        return 1

    return flow


async def test_the_deepest_input_a_checkpoint_can_hold_is_accepted_and_read_back(store: sp.Store) -> None:
    flow = one_input_flow()
    assert isinstance(await flow.run({"x": nest(TOP)}, store=store, run_id="i"), sp.Completed)
    stored = await store.load("one", "i")
    assert stored is not None
    assert flow.load_checkpoint(stored.checkpoint_json).inputs == {"x": nest(TOP)}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (nest(TOP + 1), rf"is nested {TOP + 1} levels deep"),
        (10**4300, r"holds an int of more than 4300 digits"),
        ("caf\udce9", r"holds text that is not valid Unicode"),
    ],
    ids=["deep", "long int", "surrogate"],
)
async def test_an_input_a_store_could_not_read_back_is_refused(store: sp.Store, value: object, why: str) -> None:
    with pytest.raises(sp.FlowInputError, match=rf"flow 'one': input 'x': it {why}") as info:
        await one_input_flow().run({"x": value}, store=store, run_id="i")
    assert set(info.value.invalid) == {"x"}
    assert await store.list_runs() == []


async def test_an_input_an_included_flow_takes_must_fit_its_nested_checkpoint(store: sp.Store) -> None:
    """The included flow's checkpoint holds the input again, two levels deeper."""
    outer = sp.Flow("outer")
    outer.include(one_input_flow(), "inc")
    with pytest.raises(sp.FlowInputError, match=rf"is nested {TOP - 1} levels deep; .* at most {TOP - 2}"):
        await outer.run({"x": nest(TOP - 1)}, store=store, run_id="i")
    assert isinstance(await outer.run({"x": nest(TOP - 2)}, store=store, run_id="i"), sp.Completed)


@pytest.mark.parametrize("with_store", [False, True])
async def test_a_run_id_utf8_cannot_encode_is_refused_before_anything_runs(store: sp.Store, with_store: bool) -> None:
    """Before, run() raised a bare UnicodeEncodeError (or, without a store, to_json() did later)."""
    calls: list[str] = []
    with pytest.raises(sp.FlowInputError, match=r"flow 'odd': run id 'r\\udc80' holds a lone surrogate") as info:
        await three_steps(calls, lambda: 1).run(store=store if with_store else None, run_id="r\udc80")
    assert info.value.invalid_run_id == "r\udc80"
    assert calls == []
    assert await store.list_runs() == []
    async with anyio.create_task_group() as task_group:
        with pytest.raises(sp.FlowInputError, match=r"run id 'r\\udc80'"):
            await three_steps(calls, lambda: 1).start(task_group, store=store if with_store else None, run_id="r\udc80")
    assert calls == []


def test_to_json_names_the_run_when_its_id_cannot_be_encoded() -> None:
    checkpoint = sp.Checkpoint(flow="f", flow_version="1", run_id="r\udc80", inputs={}, outputs={})
    with pytest.raises(sp.CheckpointError, match=r"flow 'f', run 'r\\udc80': its run id .* not valid Unicode"):
        checkpoint.to_json()


def test_to_json_names_an_int_too_long_for_json_text() -> None:
    checkpoint = sp.Checkpoint(flow="f", flow_version="1", run_id="r", inputs={"n": 10**4300}, outputs={})
    with pytest.raises(sp.CheckpointError, match=r"flow 'f', run 'r': input 'n' holds an int of more than 4300"):
        checkpoint.to_json()


@pytest.mark.parametrize("nested", [False, True], ids=["top", "in an include"])
def test_a_checkpoint_built_by_hand_is_refused_one_level_deeper_than_reads_back(nested: bool) -> None:
    """A checkpoint no run built has no record of checked values: its whole text is parsed."""
    room = TOP - 2 if nested else TOP

    def checkpoint(depth: int) -> sp.Checkpoint:
        inner = sp.Checkpoint(flow="f", flow_version="1", run_id="r", inputs={}, outputs={"s": nest(depth)})
        if not nested:
            return inner
        return sp.Checkpoint(flow="f", flow_version="1", run_id="r", inputs={}, outputs={}, nested={"inc": inner})

    text = checkpoint(room).to_json()
    read = CheckpointFile.parse(text)
    assert (read.nested["inc"] if nested else read).outputs["s"] == nest(room)
    with pytest.raises(sp.CheckpointError, match=rf"flow 'f', run 'r': the output of step 's' is nested {room + 1}"):
        checkpoint(room + 1).to_json()


async def test_a_run_saved_many_times_checks_each_output_once_and_still_refuses_a_deep_one(store: sp.Store) -> None:
    """A run's saves remember the outputs they found shallow enough (walking every output at every save cost a
    save of 30 KB two fifths more): a deep-but-fitting output stays stored through later saves, and a too-deep
    one arriving after it is still refused, naming its own step."""
    flow = sp.Flow("long")
    depths = [TOP, 3, TOP, TOP + 1]
    for i, depth in enumerate(depths):

        async def step(depth: int = depth) -> Any:
            return nest(depth)

        flow.step(step, name=f"s{i}", after=[f"s{i - 1}"] if i else [])  # one after the other: a save each
    with pytest.raises(sp.CheckpointError, match=rf"the output of step 's3' is nested {TOP + 1} levels deep"):
        await flow.run(store=store, run_id="l")
    stored = await store.load("long", "l")
    assert stored is not None
    assert stored.record.status is sp.RunStatus.FAILED
    assert flow.load_checkpoint(stored.checkpoint_json).outputs == {f"s{i}": nest(d) for i, d in enumerate(depths[:3])}


# -- same_value never raises ---------------------------------------------------------------------------


class Incomparable:
    """Neither comparable (its == raises, like a numpy array's truth) nor serialisable."""

    def __eq__(self, other: object) -> bool:
        raise ValueError("the truth value of an array with more than one element is ambiguous")

    __hash__ = object.__hash__


class Ambiguous:
    """== returns something whose truth cannot be told."""

    def __eq__(self, other: object) -> Any:
        return self

    def __bool__(self) -> bool:
        raise ValueError("ambiguous")

    __hash__ = object.__hash__


def test_same_value_never_raises() -> None:
    a, b = Incomparable(), Incomparable()
    assert same_value(a, a)
    assert not same_value(a, b)
    assert not same_value(a, 1)
    assert not same_value(Ambiguous(), Ambiguous())
    assert not same_value(nest(300), nest(300)[0])
    assert same_value(float("nan"), float("nan"))
    assert same_value((1, 2), [1, 2])
