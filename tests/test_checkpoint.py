"""Checkpoints and resume (API.md §6): `to_json()` / `flow.load_checkpoint()` and `run(resume=...)`.

Every flow here is built by a factory function, so a test can build it twice: a second, "fresh"
flow object stands for a new process that only has the checkpoint's JSON text. Steps count how
often they start and complete (`Tally`), and interrupt the run from inside themselves (`Stopper`),
so nothing waits for time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union
from uuid import UUID

import anyio.lowlevel
import pydantic_core
import pytest
from pydantic import BaseModel

import stoppoint as sp
from stoppoint._store import run_status

from .conftest import Channel

if TYPE_CHECKING:
    from stoppoint import StepContext  # only for type checkers: not resolvable at run time

pytestmark = pytest.mark.anyio


# -- types the steps return ----------------------------------------------------------------------------


class Color(Enum):
    RED = "red"
    BLUE = "blue"


class Level(IntEnum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    born: datetime
    id: UUID
    address: Address
    friends: list[Address] = []
    color: Color = Color.RED


class Cat(BaseModel):
    kind: Literal["cat"] = "cat"
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    good: bool


class Bag(BaseModel):
    """A model with a field that takes anything: what a tampered file puts there stays data."""

    label: str
    meta: Any


class Summary(BaseModel):
    b: int
    c: int
    e: str


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclass
class Trip:
    points: tuple[Point, ...]
    start: datetime
    tags: tuple[str, str]
    price: Decimal


ALICE = Person(
    name="Alice",
    born=datetime(1990, 5, 17, 8, 30, tzinfo=UTC),
    id=UUID("12345678-1234-5678-1234-567812345678"),
    address=Address(street="1 Main St", city="Springfield"),
    friends=[Address(street="2 Side St", city="Shelbyville")],
    color=Color.BLUE,
)
TRIP = Trip(
    points=(Point(1, 2), Point(3, 4)),
    start=datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5))),
    tags=("sea", "sun"),
    price=Decimal("1234.50"),
)


# -- helpers -------------------------------------------------------------------------------------------


class Tally:
    """How often each step started and completed, over every attempt of a run; `on_start`
    hooks look at the world as each step starts."""

    def __init__(self) -> None:
        self.started: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.on_start: list[Callable[[sp.StepContext], None]] = []

    def start(self, ctx: sp.StepContext) -> None:
        self.started[ctx.step] += 1
        for hook in self.on_start:
            hook(ctx)

    def done(self, ctx: sp.StepContext) -> None:
        self.completed[ctx.step] += 1


class Stopper:
    """The named steps interrupt the run and stop at their next stopping point, each only the
    first time it runs (so the resumed attempt gets past it)."""

    def __init__(self, interrupter: sp.Interrupter | None = None, *steps: str) -> None:
        self.interrupter = interrupter
        self.steps = set(steps)
        self.fail: set[str] = set()  # these steps raise, once each

    async def __call__(self, ctx: sp.StepContext) -> None:
        if ctx.step in self.fail:
            self.fail.discard(ctx.step)
            raise RuntimeError(f"{ctx.step} broke")
        if ctx.step in self.steps:
            self.steps.discard(ctx.step)
            assert self.interrupter is not None
            assert self.interrupter.interrupt(f"in {ctx.step}", source="test")
            await ctx.checkpoint()
            raise AssertionError("the stopping point should have stopped the step")  # pragma: no cover


NO_STOP = Stopper()


def checkpoint_doc(of: sp.Flow, **fields: Any) -> dict[str, Any]:
    """The JSON document of a checkpoint of flow `of` (the layout `to_json()` writes), with `fields` set."""
    doc: dict[str, Any] = {
        "format": "stoppoint.checkpoint",
        "format_version": 1,
        "flow": of.name,
        "flow_version": of.version,
        "run_id": "r1",
        "inputs": {},
        "outputs": {},
        "nested": {},
    }
    doc.update(fields)
    return doc


# -- a flow of values, one step per value ----------------------------------------------------------


def producer(value: Any, annotation: str | None) -> Callable[[], Any]:
    """A step returning `value`, with `annotation` (a string, as `from __future__ import
    annotations` makes every annotation) as its return annotation, or none."""

    async def produce() -> Any:
        return value

    produce.__annotations__ = {} if annotation is None else {"return": annotation}
    return produce


def values_flow(values: dict[str, tuple[str | None, Any]], stopper: Stopper) -> sp.Flow:
    """One step per value (`name: (annotation, value)`), then `stop`, which interrupts the run."""
    flow = sp.Flow("values")
    for name, (annotation, value) in values.items():
        flow.step(name=name)(producer(value, annotation))

    @flow.step(after=tuple(values))
    async def stop(ctx: sp.StepContext) -> None:
        await stopper(ctx)

    return flow


# (annotation as written in a step, value); the annotation resolves in this module's globals.
TYPED_VALUES: dict[str, tuple[str | None, Any]] = {
    "int": ("int", 7),
    "big_int": ("int", 2**80),
    "str": ("str", 'héllo ✓ "quoted"\n'),
    "float": ("float", 2.5),
    "bool": ("bool", True),
    "list_int": ("list[int]", [1, 2, 3]),
    "dict_str_float": ("dict[str, float]", {"a": 1.5, "b": -2.0}),
    "dict_int_keys": ("dict[int, str]", {1: "one", 2: "two"}),
    "tuple_var": ("tuple[int, ...]", (1, 2, 3)),
    "tuple_fixed": ("tuple[int, str, bool]", (1, "x", False)),
    "set": ("set[str]", {"a", "b", "c"}),
    "frozenset": ("frozenset[int]", frozenset({1, 2})),
    "none": ("None", None),
    "aware_datetime": ("datetime", datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)),
    "offset_datetime": ("datetime", datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=5, minutes=30)))),
    "naive_datetime": ("datetime", datetime(2024, 5, 6, 7, 8, 9)),
    "date": ("date", date(2024, 2, 29)),
    "timedelta": ("timedelta", timedelta(days=2, seconds=3, microseconds=4)),
    "uuid": ("UUID", UUID("87654321-4321-8765-4321-876543218765")),
    "enum": ("Color", Color.BLUE),
    "int_enum": ("Level", Level.HIGH),
    "decimal": ("Decimal", Decimal("1.10")),
    "path": ("Path", Path("/tmp/a b/c.txt")),
    "bytes": ("bytes", b"utf-8 bytes"),
    "literal": ("Literal['a', 'b']", "b"),
    "model": ("Person", ALICE),
    "list_of_models": ("list[Address]", [ALICE.address, Address(street="x", city="y")]),
    "optional_model": ("Optional[Person]", ALICE),
    "optional_model_none": ("Optional[Person]", None),
    "pipe_optional_model": ("Person | None", ALICE),
    "union_int_str_int": ("Union[int, str]", 5),
    "union_int_str_str": ("int | str", "5"),
    "union_of_models_cat": ("Cat | Dog", Cat(lives=9)),
    "union_of_models_dog": ("Cat | Dog", Dog(good=True)),
    "dataclass": ("Trip", TRIP),
    "dict_of_dataclasses": ("dict[str, Point]", {"origin": Point(0, 0), "far": Point(-7, 10**6)}),
}


def same(actual: Any, expected: Any) -> None:
    """`actual` equals `expected`, with the same types all the way down (1 == 1.0 == True is not enough)."""
    assert actual == expected
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, BaseModel):
        for name in type(expected).model_fields:
            same(getattr(actual, name), getattr(expected, name))
    elif dataclasses.is_dataclass(expected):
        for field in dataclasses.fields(expected):
            same(getattr(actual, field.name), getattr(expected, field.name))
    elif isinstance(expected, list | tuple):
        for a, e in zip(actual, expected, strict=True):
            same(a, e)
    elif isinstance(expected, dict):
        for key in expected:
            same(next(k for k in actual if k == key), key)
            same(actual[key], expected[key])
    elif isinstance(expected, datetime):
        assert actual.utcoffset() == expected.utcoffset()


async def interrupted_values(receiver: Any, interrupter: sp.Interrupter, values: dict[str, Any]) -> sp.Checkpoint:
    outcome = await values_flow(values, Stopper(interrupter, "stop")).run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["stop"]
    return outcome.checkpoint


# -- 1. round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TYPED_VALUES))
async def test_an_output_round_trips_typed_by_its_return_annotation(channel: Channel, name: str) -> None:
    interrupter, receiver = channel
    values = {name: TYPED_VALUES[name]}
    checkpoint = await interrupted_values(receiver, interrupter, values)
    text = checkpoint.to_json()
    json.loads(text)  # plain JSON
    loaded = values_flow(values, NO_STOP).load_checkpoint(text)  # a fresh flow object, as in a new process
    assert list(loaded.outputs) == [name]
    same(loaded.outputs[name], values[name][1])
    assert (loaded.flow, loaded.flow_version, loaded.run_id) == ("values", "1", checkpoint.run_id)
    assert loaded == checkpoint


async def test_every_typed_output_round_trips_in_one_checkpoint(channel: Channel) -> None:
    interrupter, receiver = channel
    checkpoint = await interrupted_values(receiver, interrupter, TYPED_VALUES)
    loaded = values_flow(TYPED_VALUES, NO_STOP).load_checkpoint(checkpoint.to_json())
    assert loaded == checkpoint
    for name, (_, value) in TYPED_VALUES.items():
        same(loaded.outputs[name], value)
    # A loaded checkpoint serialises again, to the same checkpoint (set order aside, the same text).
    assert values_flow(TYPED_VALUES, NO_STOP).load_checkpoint(loaded.to_json()) == checkpoint


UNTYPED = {
    "tuple": (1, 2),
    "datetime": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    "uuid": UUID("87654321-4321-8765-4321-876543218765"),
    "enum": Color.RED,
    "model": Address(street="s", city="c"),
    "dataclass": Point(1, 2),
    "set": {3},
    "int_keys": {1: "a"},
}


@pytest.mark.parametrize("annotation", [None, "Any"])
async def test_an_output_without_a_usable_annotation_stays_as_json_gave_it(
    channel: Channel, annotation: str | None
) -> None:
    interrupter, receiver = channel
    values = {name: (annotation, value) for name, value in UNTYPED.items()}
    checkpoint = await interrupted_values(receiver, interrupter, values)
    loaded = values_flow(values, NO_STOP).load_checkpoint(checkpoint.to_json())
    assert loaded.outputs == {
        "tuple": [1, 2],
        "datetime": "2024-01-02T03:04:05Z",
        "uuid": "87654321-4321-8765-4321-876543218765",
        "enum": "red",
        "model": {"street": "s", "city": "c"},
        "dataclass": {"x": 1, "y": 2},
        "set": [3],
        "int_keys": {"1": "a"},
    }


def people_flow(stopper: Stopper) -> sp.Flow:
    """Steps written out with their annotations (strings, under `from __future__ import annotations`)."""
    flow = sp.Flow("people", version="2024-06")

    @flow.step
    async def person(name: str, born: datetime, friends: tuple[Address, ...], color: Color = Color.RED) -> Person:
        assert type(born) is datetime
        assert all(type(friend) is Address for friend in friends)
        return Person(name=name, born=born, id=ALICE.id, address=ALICE.address, friends=list(friends), color=color)

    @flow.step
    async def maybe(person: Person) -> Optional[Person]:  # noqa: UP045 - the spelling under test
        return person

    @flow.step
    async def nobody() -> Optional[Person]:  # noqa: UP045
        return None

    @flow.step
    async def pet(person: Person) -> Union[Cat, Dog]:  # noqa: UP007 - the spelling under test
        return Dog(good=person.color is Color.BLUE)

    @flow.step
    async def later(person: Person) -> Later:  # a class defined further down this module
        return Later(person=person, trip=TRIP)

    @flow.step
    async def nothing() -> None:
        pass

    @flow.step
    async def raw(person):  # type: ignore[no-untyped-def]
        return {"name": person.name, "when": person.born}

    @flow.step(after=("maybe", "nobody", "pet", "later", "nothing", "raw"))
    async def end(ctx: sp.StepContext, later: Later, pet: Cat | Dog) -> str:
        assert type(later) is Later
        assert type(later.trip) is Trip
        await stopper(ctx)
        return f"{later.person.name} {pet.kind}"

    return flow


PEOPLE_INPUTS = {"name": "Alice", "born": ALICE.born, "friends": tuple(ALICE.friends), "color": Color.BLUE}


async def test_annotated_steps_and_inputs_round_trip_typed_in_a_fresh_flow(channel: Channel) -> None:
    interrupter, receiver = channel
    outcome = await people_flow(Stopper(interrupter, "end")).run(PEOPLE_INPUTS, interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    loaded = people_flow(NO_STOP).load_checkpoint(outcome.checkpoint.to_json())
    assert loaded.flow_version == "2024-06"
    same(loaded.outputs["person"], ALICE)
    same(loaded.outputs["maybe"], ALICE)
    assert loaded.outputs["nobody"] is None
    same(loaded.outputs["pet"], Dog(good=True))
    same(loaded.outputs["later"], Later(person=ALICE, trip=TRIP))
    assert "nothing" in loaded.outputs
    assert loaded.outputs["nothing"] is None
    assert loaded.outputs["raw"] == {"name": "Alice", "when": "1990-05-17T08:30:00Z"}  # no annotation: JSON
    # Inputs are typed back by the annotations of the parameters that take them.
    assert set(loaded.inputs) == set(PEOPLE_INPUTS)
    for name, value in PEOPLE_INPUTS.items():
        same(loaded.inputs[name], value)
    assert {k: v for k, v in loaded.outputs.items() if k != "raw"} == {
        k: v for k, v in outcome.checkpoint.outputs.items() if k != "raw"
    }

    # ... and the fresh flow resumes from it, given the same inputs again.
    resumed = await people_flow(NO_STOP).run(PEOPLE_INPUTS, resume=loaded)
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == "Alice dog"
    assert [name for name, step in resumed.report.steps.items() if not step.resumed] == ["end"]


async def test_the_checkpoint_of_a_failed_run_round_trips() -> None:
    stopper = Stopper()
    stopper.fail.add("end")
    with pytest.raises(sp.StepFailed, match="end broke") as info:
        await people_flow(stopper).run(PEOPLE_INPUTS)
    checkpoint = info.value.checkpoint
    assert set(checkpoint.outputs) == {"person", "maybe", "nobody", "pet", "later", "nothing", "raw"}
    loaded = people_flow(NO_STOP).load_checkpoint(checkpoint.to_json())
    same(loaded.outputs["later"], Later(person=ALICE, trip=TRIP))
    resumed = await people_flow(NO_STOP).run(resume=loaded)  # inputs omitted: the checkpoint's
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == "Alice dog"


async def test_to_json_writes_the_documented_layout(channel: Channel) -> None:
    interrupter, receiver = channel
    outcome = await people_flow(Stopper(interrupter, "end")).run(PEOPLE_INPUTS, interrupts=receiver, run_id="r-7")
    assert isinstance(outcome, sp.Interrupted)
    doc = json.loads(outcome.checkpoint.to_json())
    assert list(doc) == [
        "format",
        "format_version",
        "flow",
        "flow_version",
        "run_id",
        "inputs",
        "outputs",
        "nested",
        "progress",
    ]
    assert doc["format"] == "stoppoint.checkpoint"
    assert doc["format_version"] == 2
    assert doc["progress"] == {}
    assert (doc["flow"], doc["flow_version"], doc["run_id"]) == ("people", "2024-06", "r-7")
    assert doc["inputs"]["born"] == "1990-05-17T08:30:00Z"
    assert doc["outputs"]["pet"] == {"kind": "dog", "good": True}
    assert doc["nested"] == {}
    # bytes are accepted too, as files give them
    text = outcome.checkpoint.to_json()
    assert people_flow(NO_STOP).load_checkpoint(text.encode()) == people_flow(NO_STOP).load_checkpoint(text)


# -- 2. values that cannot be serialised ---------------------------------------------------------------


class Opaque:
    """An arbitrary object pydantic does not know how to turn into JSON."""


@pytest.mark.parametrize("kind", ["object", "socket", "lambda", "binary_bytes"])
async def test_an_output_that_cannot_be_serialised_fails_only_at_to_json_naming_the_step(
    channel: Channel, kind: str
) -> None:
    interrupter, receiver = channel
    with socket.socket() as sock:
        weird: Any = {
            "object": Opaque(),
            "socket": sock,
            "lambda": lambda: 1,
            "binary_bytes": b"\xff\xfe\x00",  # not UTF-8: pydantic writes bytes as UTF-8 text
        }[kind]
        values: dict[str, tuple[str | None, Any]] = {"fine": ("int", 1), "weird": (None, weird)}
        outcome = await values_flow(values, Stopper(interrupter, "stop")).run(interrupts=receiver)
        # The run itself is not bothered: the checkpoint holds the object as it is.
        assert isinstance(outcome, sp.Interrupted)
        assert outcome.checkpoint.outputs["weird"] is weird
        with pytest.raises(sp.CheckpointError, match=r"the output of step 'weird' \(\w+\) cannot be serialised"):
            outcome.checkpoint.to_json()


async def test_an_input_that_cannot_be_serialised_is_named(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("takes")
    stopper = Stopper(interrupter, "use")

    @flow.step
    async def use(ctx: sp.StepContext, thing: object, n: int) -> int:
        await stopper(ctx)
        return n  # pragma: no cover

    outcome = await flow.run({"thing": Opaque(), "n": 1}, interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    with pytest.raises(sp.CheckpointError, match=r"input 'thing' \(Opaque\) cannot be serialised") as info:
        outcome.checkpoint.to_json()
    assert not isinstance(info.value, sp.CheckpointMismatch)


async def test_an_inner_output_that_cannot_be_serialised_is_named(channel: Channel) -> None:
    interrupter, receiver = channel
    inner = sp.Flow("inner")
    stopper = Stopper(interrupter, "second")

    @inner.step
    async def first() -> Opaque:
        return Opaque()

    @inner.step
    async def second(ctx: sp.StepContext, first: Opaque) -> int:
        await stopper(ctx)
        return 1  # pragma: no cover

    outer = sp.Flow("outer")
    outer.include(inner)
    outcome = await outer.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    with pytest.raises(sp.CheckpointError, match=r"flow 'inner'.*the output of step 'first'"):
        outcome.checkpoint.to_json()


# -- 3. loading: what is refused, and how ----------------------------------------------------------------


def small_flow() -> sp.Flow:
    flow = sp.Flow("small", version="5")

    @flow.step
    async def n(count: int) -> int:
        return count

    @flow.step
    async def person(n: int) -> Person:
        return ALICE  # pragma: no cover

    @flow.step
    async def bag(person: Person) -> Bag:
        return Bag(label="b", meta=None)  # pragma: no cover

    @flow.step
    async def loose(bag: Bag):  # type: ignore[no-untyped-def]
        return None  # pragma: no cover

    return flow


GOOD_DOC = checkpoint_doc(small_flow(), inputs={"count": 3}, outputs={"n": 3})


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        pytest.param("{not json", "Invalid JSON", id="not-json"),
        pytest.param("", "Invalid JSON", id="empty"),
        pytest.param(b"\xff\xfe{}", "", id="not-utf8"),
        pytest.param("[]", "model_type", id="a-list"),
        pytest.param("null", "model_type", id="null"),
        pytest.param('"{}"', "model_type", id="a-string"),
        pytest.param(json.dumps({k: v for k, v in GOOD_DOC.items() if k != "outputs"}), "outputs", id="no-outputs"),
        pytest.param(json.dumps({**GOOD_DOC, "outputs": [3]}), "outputs", id="outputs-a-list"),
        pytest.param(json.dumps({**GOOD_DOC, "run_id": 7}), "run_id", id="run_id-an-int"),
        pytest.param(json.dumps({**GOOD_DOC, "format": "pickle"}), "format", id="wrong-format"),
        pytest.param(json.dumps({k: v for k, v in GOOD_DOC.items() if k != "format"}), "format", id="no-format"),
        pytest.param(json.dumps({**GOOD_DOC, "format_version": 3}), "format_version", id="newer-version"),
        pytest.param(json.dumps({**GOOD_DOC, "format_version": 0}), "format_version", id="older-version"),
        pytest.param(json.dumps({**GOOD_DOC, "format_version": "1"}), "format_version", id="version-a-string"),
        pytest.param(json.dumps({**GOOD_DOC, "pickle": "gASVAA=="}), "Extra inputs are not permitted", id="extra-key"),
        pytest.param(
            json.dumps({**GOOD_DOC, "nested": {"n": {**GOOD_DOC, "surprise": 1}}}),
            "Extra inputs are not permitted",
            id="extra-key-nested",
        ),
    ],
)
def test_text_that_is_not_a_checkpoint_raises_checkpoint_error_with_pydantic_detail(
    text: str | bytes, detail: str
) -> None:
    with pytest.raises(sp.CheckpointError, match="not a valid stoppoint checkpoint") as info:
        small_flow().load_checkpoint(text)
    assert not isinstance(info.value, sp.CheckpointMismatch)
    message = str(info.value)
    assert detail in message
    assert "validation error" in message  # pydantic's own report
    assert isinstance(info.value.__cause__, pydantic_core.ValidationError)


@pytest.mark.parametrize("value", [None, 42, {"format": "stoppoint.checkpoint"}, ["{}"]])
def test_a_value_that_is_not_text_raises_checkpoint_error(value: Any) -> None:
    with pytest.raises(sp.CheckpointError, match="JSON text"):
        small_flow().load_checkpoint(value)


def test_the_good_document_loads() -> None:
    """The base of the documents above is itself fine (so each one fails for its own reason)."""
    loaded = small_flow().load_checkpoint(json.dumps(GOOD_DOC))
    assert loaded.outputs == {"n": 3}
    assert loaded.inputs == {"count": 3}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"flow": "other"}, r"belongs to flow 'other', not 'small'", id="another-flow"),
        pytest.param({"flow_version": "4"}, r"taken at version '4'; the flow is now version '5'", id="older-version"),
        pytest.param({"flow_version": "6"}, r"taken at version '6'", id="newer-version"),
        pytest.param({"outputs": {"n": 3, "gone": 1}}, r"outputs for 'gone'", id="unknown-step"),
        pytest.param({"nested": {"n": {**GOOD_DOC, "flow": "n"}}}, r"outputs for 'n'", id="nested-for-a-plain-step"),
        pytest.param({"nested": {"ghost": GOOD_DOC}}, r"'ghost'", id="nested-for-no-step"),
        pytest.param({"inputs": {"count": 3, "stranger": 1}}, r"inputs 'stranger'", id="unknown-input"),
    ],
)
def test_a_checkpoint_of_another_flow_version_or_shape_raises_checkpoint_mismatch(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(sp.CheckpointMismatch, match=message):
        small_flow().load_checkpoint(json.dumps({**GOOD_DOC, **change}))


@pytest.mark.parametrize(
    ("change", "what", "detail"),
    [
        pytest.param({"outputs": {"n": "seven"}}, "the output of step 'n'", "int_parsing", id="str-for-int"),
        pytest.param({"outputs": {"n": None}}, "the output of step 'n'", "int_type", id="null-for-int"),
        pytest.param({"outputs": {"n": 1.5}}, "the output of step 'n'", "int_from_float", id="fraction-for-int"),
        pytest.param(
            {"outputs": {"person": {"name": "x", "born": "1990-01-01T00:00:00Z", "id": str(ALICE.id)}}},
            "the output of step 'person'",
            "address",
            id="model-missing-a-field",
        ),
        pytest.param(
            {"outputs": {"person": {**ALICE.model_dump(mode="json"), "born": "yesterday"}}},
            "the output of step 'person'",
            "born",
            id="model-bad-datetime",
        ),
        pytest.param({"inputs": {"count": "many"}}, "input 'count'", "int_parsing", id="bad-input"),
    ],
)
def test_a_value_that_does_not_validate_raises_checkpoint_error_naming_it(
    change: dict[str, Any], what: str, detail: str
) -> None:
    with pytest.raises(sp.CheckpointError) as info:
        small_flow().load_checkpoint(json.dumps({**GOOD_DOC, **change}))
    assert not isinstance(info.value, sp.CheckpointMismatch)
    message = str(info.value)
    assert what in message
    assert "does not validate" in message
    assert detail in message


SMUGGLED = {
    "__reduce__": ["os.system", ["echo pwned"]],
    "py/object": "subprocess.Popen",
    "__class__": "builtins.eval",
    "pickle": pickle.dumps(Opaque).hex(),
}


def test_a_tampered_payload_stays_plain_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading a checkpoint must never unpickle")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, never)
    doc = {
        **GOOD_DOC,
        "outputs": {
            "n": 3,
            "person": ALICE.model_dump(mode="json"),
            "bag": {"label": "b", "meta": SMUGGLED},
            "loose": SMUGGLED,
        },
    }
    loaded = small_flow().load_checkpoint(json.dumps(doc))
    bag = loaded.outputs["bag"]
    assert type(bag) is Bag
    assert bag.meta == SMUGGLED  # a field typed Any keeps the dict as a dict
    assert type(bag.meta) is dict
    assert loaded.outputs["loose"] == SMUGGLED  # no annotation: JSON as it came
    # A pickle in place of the JSON is refused as not JSON, and not unpickled.
    with pytest.raises(sp.CheckpointError, match="Invalid JSON"):
        small_flow().load_checkpoint(pickle.dumps(GOOD_DOC, protocol=0))


# -- 4. resume -----------------------------------------------------------------------------------------


def diamond(stopper: Stopper, tally: Tally, version: str = "3") -> sp.Flow:
    """a -> (b, c) -> d; e runs after d without its output; f takes d and e.

    Each step checks that what it receives has its annotated type, so a resume that fed it
    JSON instead of typed values fails.
    """
    flow = sp.Flow("diamond", version=version)

    @flow.step
    async def a(ctx: sp.StepContext, n: int) -> int:
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return n + 1

    @flow.step
    async def b(ctx: sp.StepContext, a: int) -> list[int]:
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return [a, a]

    @flow.step
    async def c(ctx: sp.StepContext, a: int) -> tuple[int, int]:
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return (a, a * 2)

    @flow.step
    async def d(ctx: sp.StepContext, b: list[int], c: tuple[int, int]) -> dict[str, int]:
        assert type(b) is list
        assert type(c) is tuple
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return {"b": sum(b), "c": c[1]}

    @flow.step(after="d")
    async def e(ctx: sp.StepContext) -> str:
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return "e"

    @flow.step
    async def f(ctx: sp.StepContext, d: dict[str, int], e: str) -> Summary:
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return Summary(b=d["b"], c=d["c"], e=e)

    return flow


DIAMOND = ("a", "b", "c", "d", "e", "f")
EXPECTED = Summary(b=4, c=4, e="e")  # for n=1


def assert_resumed_report(report: sp.RunReport, reused: set[str]) -> None:
    """Every step completed; exactly the `reused` ones came from the checkpoint (and did not run)."""
    assert report.completed == list(report.steps)
    for name, step in report.steps.items():
        assert step.resumed is (name in reused), name
        if name in reused:
            assert step.started_at is None
            assert step.duration_s is None


@pytest.mark.parametrize("via_json", [False, True], ids=["in-memory", "json-fresh-flow"])
@pytest.mark.parametrize("stop_in", DIAMOND)
async def test_resume_runs_only_the_steps_that_had_not_completed(
    channel: Channel, stop_in: str, via_json: bool
) -> None:
    interrupter, receiver = channel
    tally = Tally()
    stopper = Stopper(interrupter, stop_in)
    first = await diamond(stopper, tally).run({"n": 1}, interrupts=receiver)
    assert isinstance(first, sp.Interrupted)
    done_first = set(first.report.completed)
    assert stop_in in first.report.stopped
    assert set(first.checkpoint.outputs) == done_first
    assert done_first == set(tally.completed)

    flow = diamond(stopper, tally)  # a fresh flow object: what a new process would build
    checkpoint = flow.load_checkpoint(first.checkpoint.to_json()) if via_json else first.checkpoint
    second = await flow.run(resume=checkpoint, interrupts=receiver)
    assert isinstance(second, sp.Completed)
    same(second.value, EXPECTED)
    # Every step completed exactly once over both attempts; only the stopped one started twice.
    assert tally.completed == Counter(DIAMOND)
    assert tally.started == Counter(DIAMOND) + Counter([stop_in])
    assert_resumed_report(second.report, done_first)
    assert second.report.run_id == first.report.run_id  # the run id defaults to the checkpoint's


async def test_a_run_resumed_twice_runs_each_step_once_overall(channel: Channel) -> None:
    """Three attempts, each in a fresh flow from the previous attempt's JSON."""
    interrupter, receiver = channel
    tally = Tally()
    stopper = Stopper(interrupter, "b", "e")
    outcome = await diamond(stopper, tally).run({"n": 1}, interrupts=receiver, run_id="three")
    assert isinstance(outcome, sp.Interrupted)
    reused: set[str] = set()
    attempts = 1
    while isinstance(outcome, sp.Interrupted):
        reused = set(outcome.report.completed) | {n for n, s in outcome.report.steps.items() if s.resumed}
        assert set(outcome.checkpoint.outputs) == reused
        flow = diamond(stopper, tally)
        outcome = await flow.run(resume=flow.load_checkpoint(outcome.checkpoint.to_json()), interrupts=receiver)
        attempts += 1
    assert attempts == 3
    same(outcome.value, EXPECTED)
    assert_resumed_report(outcome.report, reused)
    assert {"a", "b", "c", "d"} <= reused
    assert tally.completed == Counter(DIAMOND)
    assert tally.started == Counter(DIAMOND) + Counter(["b", "e"])
    assert outcome.report.run_id == "three"


async def test_a_checkpoint_of_a_failed_run_resumes_at_the_failed_step() -> None:
    tally = Tally()
    stopper = Stopper()
    stopper.fail.add("d")
    with pytest.raises(sp.StepFailed) as info:
        await diamond(stopper, tally).run({"n": 1})
    assert info.value.step == "d"
    checkpoint = info.value.checkpoint
    assert set(checkpoint.outputs) == {"a", "b", "c"}
    flow = diamond(stopper, tally)
    outcome = await flow.run({"n": 1}, resume=flow.load_checkpoint(checkpoint.to_json()))
    assert isinstance(outcome, sp.Completed)
    same(outcome.value, EXPECTED)
    assert tally.completed == Counter(DIAMOND)
    assert_resumed_report(outcome.report, {"a", "b", "c"})


async def interrupted_diamond(channel: Channel, tally: Tally, stop_in: str = "d") -> sp.Interrupted:
    interrupter, receiver = channel
    outcome = await diamond(Stopper(interrupter, stop_in), tally).run({"n": 1}, interrupts=receiver, run_id="first")
    assert isinstance(outcome, sp.Interrupted)
    return outcome


async def test_resume_takes_equal_inputs_and_refuses_different_ones(channel: Channel) -> None:
    tally = Tally()
    checkpoint = (await interrupted_diamond(channel, tally)).checkpoint
    before = tally.started.copy()
    flow = diamond(NO_STOP, tally)
    for inputs in ({"n": 2}, {"n": "1"}, {}, {"n": 1, "extra": 0}):
        with pytest.raises(sp.CheckpointMismatch, match=r"inputs differ from the checkpoint's \(.*'(n|extra)'"):
            await flow.run(inputs, resume=checkpoint)
    assert tally.started == before  # nothing ran
    outcome = await flow.run({"n": 1}, resume=checkpoint)
    assert isinstance(outcome, sp.Completed)
    same(outcome.value, EXPECTED)


async def test_the_run_id_defaults_to_the_checkpoints_and_can_be_overridden(channel: Channel) -> None:
    interrupter, receiver = channel
    tally = Tally()
    seen: list[str] = []
    tally.on_start.append(lambda ctx: seen.append(ctx.run_id))
    first = await interrupted_diamond(channel, tally, stop_in="b")
    assert first.checkpoint.run_id == "first"
    assert set(seen) == {"first"}
    seen.clear()
    second = await diamond(Stopper(interrupter, "e"), tally).run(
        resume=first.checkpoint, run_id="second", interrupts=receiver
    )
    assert isinstance(second, sp.Interrupted)
    assert second.report.run_id == "second"
    assert second.checkpoint.run_id == "second"
    third = await diamond(NO_STOP, tally).run(resume=second.checkpoint)
    assert isinstance(third, sp.Completed)
    assert third.report.run_id == "second"
    assert set(seen) == {"second"}  # the steps see the run id in force
    assert tally.completed == Counter(DIAMOND)


async def test_resuming_a_checkpoint_where_every_step_completed_runs_nothing() -> None:
    tally = Tally()
    outputs = {"a": 2, "b": [2, 2], "c": (2, 4), "d": {"b": 4, "c": 4}, "e": "e", "f": EXPECTED}
    checkpoint = sp.Checkpoint(flow="diamond", flow_version="3", run_id="done", inputs={"n": 1}, outputs=outputs)
    flow = diamond(NO_STOP, tally)
    for candidate in (checkpoint, flow.load_checkpoint(checkpoint.to_json())):
        outcome = await flow.run(resume=candidate)
        assert isinstance(outcome, sp.Completed)
        assert outcome.value == EXPECTED
        assert_resumed_report(outcome.report, set(DIAMOND))
        assert outcome.report.finished_at is not None
    assert tally.started == Counter()


async def test_resume_with_a_checkpoint_of_another_flow_or_version_raises_checkpoint_mismatch(channel: Channel) -> None:
    tally = Tally()
    checkpoint = (await interrupted_diamond(channel, tally)).checkpoint
    before = tally.started.copy()
    with pytest.raises(sp.CheckpointMismatch, match="taken at version '3'; the flow is now version '4'"):
        await diamond(NO_STOP, tally, version="4").run(resume=checkpoint)
    with pytest.raises(sp.CheckpointMismatch, match="belongs to flow 'diamond', not 'values'"):
        await values_flow({"x": ("int", 1)}, NO_STOP).run(resume=checkpoint)
    foreign = checkpoint.model_copy(update={"outputs": {**checkpoint.outputs, "zz": 1}})
    with pytest.raises(sp.CheckpointMismatch, match="'zz'"):
        await diamond(NO_STOP, tally).run(resume=foreign)
    assert tally.started == before


async def test_resume_needs_a_checkpoint(channel: Channel) -> None:
    tally = Tally()
    first = await interrupted_diamond(channel, tally)
    checkpoint = first.checkpoint
    flow = diamond(NO_STOP, tally)
    before = tally.started.copy()
    for wrong in (checkpoint.to_json(), checkpoint.model_dump(), first, json.loads(checkpoint.to_json())):
        with pytest.raises(TypeError, match="resume must be a Checkpoint"):
            await flow.run(resume=wrong)  # type: ignore[arg-type]
    assert tally.started == before


async def test_the_resumed_report_and_checkpoint_of_an_interrupted_resume(channel: Channel) -> None:
    """A resumed attempt that is interrupted again lists the reused steps as resumed, and its
    checkpoint holds the reused outputs as well as the new ones."""
    interrupter, receiver = channel
    tally = Tally()
    first = await interrupted_diamond(channel, tally, stop_in="d")
    second = await diamond(Stopper(interrupter, "f"), tally).run(resume=first.checkpoint, interrupts=receiver)
    assert isinstance(second, sp.Interrupted)
    steps = second.report.steps
    assert {n for n, s in steps.items() if s.resumed} == {"a", "b", "c"}
    assert [n for n in DIAMOND if steps[n].status is sp.StepStatus.COMPLETED] == ["a", "b", "c", "d", "e"]
    assert steps["f"].status is sp.StepStatus.INTERRUPTED
    assert not steps["f"].resumed
    assert set(second.checkpoint.outputs) == {"a", "b", "c", "d", "e"}
    assert second.checkpoint.outputs["c"] == (2, 4)


# -- 5. nested flows -----------------------------------------------------------------------------------


def nested_flows(stopper: Stopper, tally: Tally, inner_version: str = "1") -> sp.Flow:
    """prepare -> include(inner: x -> y -> z) -> finish; values typed by annotations at each level."""
    inner = sp.Flow("inner", version=inner_version)

    @inner.step
    async def x(ctx: sp.StepContext, prepare: Point, factor: int) -> Point:
        assert type(prepare) is Point
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return Point(prepare.x * factor, prepare.y * factor)

    @inner.step
    async def y(ctx: sp.StepContext, x: Point) -> tuple[int, int]:
        assert type(x) is Point
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return (x.x, x.y)

    @inner.step
    async def z(ctx: sp.StepContext, y: tuple[int, int]) -> Address:
        assert type(y) is tuple
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return Address(street=str(y[0]), city=str(y[1]))

    outer = sp.Flow("outer")

    @outer.step
    async def prepare(ctx: sp.StepContext, base: int) -> Point:
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return Point(base, base + 1)

    outer.include(inner)

    @outer.step
    async def finish(ctx: sp.StepContext, inner: Address) -> str:
        assert type(inner) is Address
        tally.start(ctx)
        await stopper(ctx)
        tally.done(ctx)
        return f"{inner.street}/{inner.city}"

    return outer


NESTED_LEAVES = ("prepare", "x", "y", "z", "finish")
NESTED_INPUTS = {"base": 2, "factor": 3}  # prepare = Point(2, 3), x = Point(6, 9), y = (6, 9), z = Address(6, 9)


@pytest.mark.parametrize("via_json", [False, True], ids=["in-memory", "json-fresh-flow"])
@pytest.mark.parametrize("stop_in", NESTED_LEAVES)
async def test_a_nested_flow_resumes_inside_the_included_flow(channel: Channel, stop_in: str, via_json: bool) -> None:
    interrupter, receiver = channel
    tally = Tally()
    stopper = Stopper(interrupter, stop_in)
    first = await nested_flows(stopper, tally).run(NESTED_INPUTS, interrupts=receiver)
    assert isinstance(first, sp.Interrupted)
    checkpoint = first.checkpoint
    inner_report = first.report.steps["inner"].nested
    inner_done = set(inner_report.completed) if inner_report is not None else set()
    outer_done = set(first.report.completed)
    assert set(checkpoint.outputs) == outer_done
    if "inner" in outer_done or not inner_done:
        assert checkpoint.nested == {}
    else:
        # The include step did not complete: its completed inner steps are kept under its name.
        assert first.report.steps["inner"].status is sp.StepStatus.INTERRUPTED
        nested = checkpoint.nested["inner"]
        assert (nested.flow, nested.run_id) == ("inner", checkpoint.run_id)
        assert set(nested.outputs) == inner_done
        assert nested.inputs == {"prepare": Point(2, 3), "factor": 3}

    if via_json:
        flow = nested_flows(stopper, tally)
        checkpoint = flow.load_checkpoint(checkpoint.to_json())
        assert checkpoint == first.checkpoint
        if "inner" in checkpoint.outputs:
            same(checkpoint.outputs["inner"], Address(street="6", city="9"))  # typed by z's annotation
        if "prepare" in checkpoint.outputs:
            same(checkpoint.outputs["prepare"], Point(2, 3))
        if checkpoint.nested:
            nested = checkpoint.nested["inner"]
            same(nested.inputs["prepare"], Point(2, 3))
            expected_inner: dict[str, Any] = {"x": Point(6, 9), "y": (6, 9)}
            for name in nested.outputs:
                same(nested.outputs[name], expected_inner[name])
    else:
        flow = nested_flows(stopper, tally)

    second = await flow.run(resume=checkpoint, interrupts=receiver)
    assert isinstance(second, sp.Completed)
    assert second.value == "6/9"
    assert tally.completed == Counter(NESTED_LEAVES)
    assert tally.started == Counter(NESTED_LEAVES) + Counter([stop_in])
    steps = second.report.steps
    assert {n for n, s in steps.items() if s.resumed} == outer_done
    assert steps["inner"].status is sp.StepStatus.COMPLETED
    if "inner" not in outer_done:
        nested_report = steps["inner"].nested
        assert nested_report is not None
        assert nested_report.completed == ["x", "y", "z"]
        assert {n for n, s in nested_report.steps.items() if s.resumed} == inner_done


async def test_a_nested_flow_interrupted_twice_resumes_twice(channel: Channel) -> None:
    interrupter, receiver = channel
    tally = Tally()
    stopper = Stopper(interrupter, "y", "z")
    outcome = await nested_flows(stopper, tally).run(NESTED_INPUTS, interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert set(outcome.checkpoint.nested["inner"].outputs) == {"x"}
    flow = nested_flows(stopper, tally)
    outcome = await flow.run(resume=flow.load_checkpoint(outcome.checkpoint.to_json()), interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    nested = outcome.checkpoint.nested["inner"]
    assert set(nested.outputs) == {"x", "y"}
    nested_report = outcome.report.steps["inner"].nested
    assert nested_report is not None
    assert nested_report.steps["x"].resumed
    assert not nested_report.steps["y"].resumed
    assert nested_report.stopped == ["z"]
    flow = nested_flows(stopper, tally)
    outcome = await flow.run(resume=flow.load_checkpoint(outcome.checkpoint.to_json()), interrupts=receiver)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "6/9"
    nested_report = outcome.report.steps["inner"].nested
    assert nested_report is not None
    assert {n for n, s in nested_report.steps.items() if s.resumed} == {"x", "y"}
    assert tally.completed == Counter(NESTED_LEAVES)


async def test_a_failed_inner_step_keeps_the_inner_outputs_for_the_resume() -> None:
    tally = Tally()
    stopper = Stopper()
    stopper.fail.add("z")
    with pytest.raises(sp.StepFailed) as info:
        await nested_flows(stopper, tally).run(NESTED_INPUTS)
    assert info.value.step == "inner"
    checkpoint = info.value.checkpoint
    assert set(checkpoint.outputs) == {"prepare"}
    assert set(checkpoint.nested["inner"].outputs) == {"x", "y"}
    flow = nested_flows(stopper, tally)
    outcome = await flow.run(resume=flow.load_checkpoint(checkpoint.to_json()))
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "6/9"
    assert tally.completed == Counter(NESTED_LEAVES)


async def test_two_levels_of_nesting_round_trip_and_resume(channel: Channel) -> None:
    interrupter, receiver = channel
    tally = Tally()
    stopper = Stopper(interrupter, "y")

    def build() -> sp.Flow:
        top = sp.Flow("top")
        top.include(nested_flows(stopper, tally), name="middle")
        return top

    first = await build().run(NESTED_INPUTS, interrupts=receiver)
    assert isinstance(first, sp.Interrupted)
    middle = first.checkpoint.nested["middle"]
    assert middle.flow == "outer"
    assert set(middle.outputs) == {"prepare"}
    assert set(middle.nested["inner"].outputs) == {"x"}
    flow = build()
    loaded = flow.load_checkpoint(first.checkpoint.to_json())
    same(loaded.nested["middle"].outputs["prepare"], Point(2, 3))
    same(loaded.nested["middle"].nested["inner"].outputs["x"], Point(6, 9))
    second = await flow.run(resume=loaded)
    assert isinstance(second, sp.Completed)
    assert second.value == "6/9"
    assert tally.completed == Counter(NESTED_LEAVES)
    middle_report = second.report.steps["middle"].nested
    assert middle_report is not None
    assert middle_report.steps["prepare"].resumed
    inner_report = middle_report.steps["inner"].nested
    assert inner_report is not None
    assert {n for n, s in inner_report.steps.items() if s.resumed} == {"x"}


def test_a_nested_checkpoint_of_another_inner_version_is_refused_on_load() -> None:
    doc = checkpoint_doc(
        nested_flows(NO_STOP, Tally()),
        inputs=NESTED_INPUTS,
        outputs={"prepare": {"x": 2, "y": 3}},
        nested={"inner": checkpoint_doc(nested_flows(NO_STOP, Tally()), flow="inner", outputs={"x": {"x": 6, "y": 9}})},
    )
    loaded = nested_flows(NO_STOP, Tally()).load_checkpoint(json.dumps(doc))
    same(loaded.nested["inner"].outputs["x"], Point(6, 9))
    with pytest.raises(
        sp.CheckpointMismatch, match="flow 'inner' was taken at version '1'; the flow is now version '2'"
    ):
        nested_flows(NO_STOP, Tally(), inner_version="2").load_checkpoint(json.dumps(doc))
    doc["nested"]["inner"]["outputs"]["w"] = 1
    with pytest.raises(sp.CheckpointMismatch, match="'w'"):
        nested_flows(NO_STOP, Tally()).load_checkpoint(json.dumps(doc))
    doc["nested"]["inner"]["outputs"] = {"x": {"x": "six"}}
    with pytest.raises(sp.CheckpointError, match="the output of step 'x'"):
        nested_flows(NO_STOP, Tally()).load_checkpoint(json.dumps(doc))


# -- 6. with a store (a fake one: the real stores are tested elsewhere) ------------------------------------


class FakeStore:
    """A `Store` in a dict. It yields inside `save()` (as a real store's I/O does) and only then
    commits, so a step that started during a save would see the old state."""

    def __init__(self, fail_on_save: int | None = None) -> None:
        self.saves = 0
        self.fail_on_save = fail_on_save
        self.runs: dict[tuple[str, str], sp.StoredRun] = {}
        self.committed: list[dict[str, Any]] = []  # each committed checkpoint, as JSON data

    async def save(self, checkpoint: sp.Checkpoint, report: sp.RunReport) -> None:
        self.saves += 1
        text = checkpoint.to_json()
        await anyio.lowlevel.checkpoint()
        if self.saves == self.fail_on_save:
            raise sp.StoreError("disk full")
        key = (checkpoint.flow, checkpoint.run_id)
        old = self.runs.get(key)
        now = datetime.now(UTC)
        record = sp.RunRecord(
            flow=checkpoint.flow,
            run_id=checkpoint.run_id,
            flow_version=checkpoint.flow_version,
            status=run_status(report),
            started_at=old.record.started_at if old else report.started_at,
            updated_at=now,
            finished_at=report.finished_at,
        )
        self.runs[key] = sp.StoredRun(record=record, checkpoint_json=text, report_json=report.model_dump_json())
        self.committed.append(json.loads(text))

    async def load(self, flow: str, run_id: str) -> sp.StoredRun | None:
        await anyio.lowlevel.checkpoint()
        return self.runs.get((flow, run_id))

    async def list_runs(self, flow: str | None = None) -> list[sp.RunRecord]:
        return [run.record for (name, _), run in self.runs.items() if flow is None or name == flow]

    async def delete(self, flow: str, run_id: str) -> None:
        self.runs.pop((flow, run_id), None)

    def status(self, flow: str, run_id: str) -> sp.RunStatus:
        return self.runs[(flow, run_id)].record.status


def durability_check(
    store: FakeStore, graph: dict[str, tuple[str, ...]], violations: list[str]
) -> Callable[[sp.StepContext], None]:
    """A `Tally.on_start` hook: every step a starting step waits for is in the last committed checkpoint."""

    def check(ctx: sp.StepContext) -> None:
        last = store.committed[-1] if store.committed else {"outputs": {}, "nested": {}}
        level = last if ctx.flow != "inner" else last["nested"].get("inner", {"outputs": {}})
        missing = [name for name in graph[ctx.step] if name not in level["outputs"]]
        if missing:
            violations.append(f"{ctx.step} started before {missing} were committed")

    return check


async def test_a_completed_output_is_committed_before_any_dependant_starts() -> None:
    tally = Tally()
    store = FakeStore()
    assert isinstance(store, sp.BasicStore)
    assert not isinstance(store, sp.Store)  # whole saves: the path of a store of stoppoint 0.1
    flow = diamond(NO_STOP, tally)
    violations: list[str] = []
    tally.on_start.append(durability_check(store, flow.graph(), violations))
    outcome = await flow.run({"n": 1}, store=store, run_id="durable")
    assert isinstance(outcome, sp.Completed)
    assert violations == []
    assert tally.started == Counter(DIAMOND)
    stored = store.runs[("diamond", "durable")]
    assert stored.record.status is sp.RunStatus.COMPLETED
    assert set(json.loads(stored.checkpoint_json)["outputs"]) == set(DIAMOND)


async def test_inner_outputs_are_committed_before_inner_dependants_start() -> None:
    tally = Tally()
    store = FakeStore()
    flow = nested_flows(NO_STOP, tally)
    inner_graph = {"x": (), "y": ("x",), "z": ("y",)}
    violations: list[str] = []
    tally.on_start.append(durability_check(store, {**flow.graph(), **inner_graph}, violations))
    outcome = await flow.run(NESTED_INPUTS, store=store, run_id="nested")
    assert isinstance(outcome, sp.Completed)
    assert violations == []
    # while the inner flow ran, its completed steps were saved under the include step
    assert any(set(c["nested"].get("inner", {}).get("outputs", {})) == {"x", "y"} for c in store.committed)


@pytest.mark.parametrize(("fail_on_save", "started"), [(1, []), (2, ["a"])])
async def test_a_failing_save_raises_the_store_error_and_no_dependant_starts(
    fail_on_save: int, started: list[str]
) -> None:
    tally = Tally()
    store = FakeStore(fail_on_save=fail_on_save)
    with pytest.raises(sp.StoreError, match="disk full"):
        await diamond(NO_STOP, tally).run({"n": 1}, store=store, run_id="broken")
    assert tally.started == Counter(started)
    assert store.saves == fail_on_save  # no save after the failed one


async def test_a_stored_completed_run_returns_its_typed_value_without_running() -> None:
    store = FakeStore()
    first = await diamond(NO_STOP, Tally()).run({"n": 1}, store=store, run_id="done")
    assert isinstance(first, sp.Completed)
    tally = Tally()
    for inputs in (None, {"n": 1}):
        again = await diamond(NO_STOP, tally).run(inputs, store=store, run_id="done")  # a fresh flow
        assert isinstance(again, sp.Completed)
        same(again.value, EXPECTED)
        assert again.report.run_id == "done"
        assert again.report.completed == list(DIAMOND)
    with pytest.raises(sp.CheckpointMismatch, match="'n'"):
        await diamond(NO_STOP, tally).run({"n": 5}, store=store, run_id="done")
    assert tally.started == Counter()


async def test_a_stored_interrupted_run_resumes_with_the_same_run_id(channel: Channel) -> None:
    interrupter, receiver = channel
    store = FakeStore()
    tally = Tally()
    stopper = Stopper(interrupter, "d")
    first = await diamond(stopper, tally).run({"n": 1}, store=store, run_id="again", interrupts=receiver)
    assert isinstance(first, sp.Interrupted)
    assert store.status("diamond", "again") is sp.RunStatus.INTERRUPTED
    second = await diamond(stopper, tally).run(store=store, run_id="again")
    assert isinstance(second, sp.Completed)
    same(second.value, EXPECTED)
    assert_resumed_report(second.report, {"a", "b", "c"})
    assert tally.completed == Counter(DIAMOND)
    assert store.status("diamond", "again") is sp.RunStatus.COMPLETED


# -- found in review: each failed before its fix -------------------------------------------------------------


def test_an_unresolvable_parameter_annotation_does_not_untype_the_return_value() -> None:
    flow = sp.Flow("hinted")

    @flow.step
    async def home(ctx: StepContext) -> Address:
        return Address(street="s", city="c")  # pragma: no cover

    loaded = flow.load_checkpoint(json.dumps(checkpoint_doc(flow, outputs={"home": {"street": "s", "city": "c"}})))
    same(loaded.outputs["home"], Address(street="s", city="c"))


async def test_resume_refuses_a_nested_checkpoint_of_another_inner_version(channel: Channel) -> None:
    interrupter, receiver = channel
    tally = Tally()
    first = await nested_flows(Stopper(interrupter, "y"), tally).run(NESTED_INPUTS, interrupts=receiver)
    assert isinstance(first, sp.Interrupted)
    assert first.checkpoint.nested["inner"].flow_version == "1"
    with pytest.raises(sp.CheckpointMismatch, match="version"):
        await nested_flows(NO_STOP, tally, inner_version="2").run(resume=first.checkpoint)


async def test_resume_refuses_a_nested_checkpoint_with_unknown_inner_steps() -> None:
    flow = nested_flows(NO_STOP, Tally())
    inner = sp.Checkpoint(flow="inner", flow_version="1", run_id="r", inputs={}, outputs={"x": Point(6, 9), "gone": 1})
    checkpoint = sp.Checkpoint(
        flow="outer",
        flow_version="1",
        run_id="r",
        inputs=NESTED_INPUTS,
        outputs={"prepare": Point(2, 3)},
        nested={"inner": inner},
    )
    with pytest.raises(sp.CheckpointMismatch, match="'gone'"):
        await flow.run(resume=checkpoint)


async def test_a_str_output_with_a_surrogate_round_trips_or_is_refused_at_to_json(channel: Channel) -> None:
    interrupter, receiver = channel
    name = os.fsdecode(b"caf\xe9.txt")  # a Latin-1 file name listed on a UTF-8 system
    values: dict[str, tuple[str | None, Any]] = {"filename": ("str", name)}
    checkpoint = await interrupted_values(receiver, interrupter, values)
    error: sp.CheckpointError | None = None
    try:
        text = checkpoint.to_json()
    except sp.CheckpointError as exc:
        error = exc
    if error is not None:
        assert "step 'filename'" in str(error)  # refused, and said where: acceptable
        return
    text.encode()  # a file or a store needs it as bytes
    assert values_flow(values, NO_STOP).load_checkpoint(text).outputs["filename"] == name


# -- at the end on purpose: a forward reference resolved when the steps' annotations are read -------------


class Later(BaseModel):
    person: Person
    trip: Trip


async def test_inputs_equal_as_json_count_as_the_same_on_resume(channel: Channel) -> None:
    """An unannotated tuple input comes back from JSON as a list: giving the tuple again is not a mismatch."""
    interrupter, receiver = channel
    flow = sp.Flow("pairs")

    @flow.step
    async def first(pair) -> int:  # type: ignore[no-untyped-def]  # deliberately unannotated
        interrupter.interrupt()
        return int(sum(pair))

    @flow.step
    async def second(first: int) -> int:
        return first * 2

    outcome = await flow.run({"pair": (1, 2)}, interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    loaded = flow.load_checkpoint(outcome.checkpoint.to_json())
    assert loaded.inputs == {"pair": [1, 2]}
    resumed = await flow.run({"pair": (1, 2)}, resume=loaded)
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == 6
    with pytest.raises(sp.CheckpointMismatch, match="'pair'"):
        await flow.run({"pair": (1, 3)}, resume=loaded)
