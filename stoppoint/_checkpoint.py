"""Checkpoint: what a resume needs, carried by every `Interrupted` and `StepFailed`.

On disk a checkpoint is JSON, never pickle: `to_json()` turns each output into JSON with pydantic,
and `Flow.load_checkpoint()` validates each one back into its step's return type, so a tampered
or foreign file gives a `CheckpointError`, not code execution.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, PrivateAttr, PydanticSchemaGenerationError, ValidationError

from ._errors import CheckpointError, CheckpointMismatch
from ._plan import Plan
from ._types import Unresolved, adapter, input_type, output_type, type_name

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointFile",
    "check_belongs",
    "input_refusal",
    "same_value",
    "saved_json",
    "typed",
    "validate_saved",
]

FORMAT = "stoppoint.checkpoint"
FORMAT_VERSION = 2
"""The checkpoint format written: 2 added `progress` (saved state of unfinished steps); 1 is still read."""


class Checkpoint(BaseModel):
    """The state a later run needs to go on where this one stopped.

    Attributes:
        flow: Name of the flow.
        flow_version: The flow's `version` when the checkpoint was taken.
        run_id: The run that produced it.
        inputs: The run's inputs.
        outputs: Outputs of the steps that completed, by step name.
        nested: For an include step (`Flow.include`) that started but did not complete, the
            included flow's own checkpoint (its completed steps), by include step name.
        progress: The state each unfinished step of this level last saved (`StepContext.save()`), as
            JSON values, by step name; a step's entry is dropped when it completes. A resumed step
            reads it with `StepContext.restored()`.
    """

    model_config = ConfigDict(frozen=True)

    flow: str
    flow_version: str
    run_id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    nested: dict[str, Checkpoint] = {}
    progress: dict[str, Any] = {}

    # The values of this run a save found shallow enough to read back (a runtime's checkpoints
    # share their level's dict; see `_too_deep`); None for a checkpoint built otherwise.
    _fit: dict[Any, Any] | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        # The fields alone: `_fit` is the run's cache, not part of what the checkpoint says.
        if not isinstance(other, Checkpoint):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def to_json(self) -> str:
        """The checkpoint as JSON text, for `Flow.load_checkpoint()` (in this or another process).

        Outputs and inputs are serialised with pydantic: models, dataclasses, builtins, dates,
        UUIDs, enums and the like. Nothing is pickled.

        Returns:
            The JSON text (use this, not `model_dump_json()`, which lacks the format header and
            that `load_checkpoint()` refuses).

        Raises:
            CheckpointError: An output or input cannot be turned into JSON that reads back: it
                cannot be serialised, holds text UTF-8 cannot encode or an int longer than
                `sys.get_int_max_str_digits()`, or is nested deeper than pydantic's JSON parser
                reads where it sits (the message names it); or the run id holds such text.
        """
        try:
            text = _dumps(self._jsonable())
        except ValueError as exc:  # an int longer than str() writes (sys.get_int_max_str_digits())
            self._name_unstorable()
            raise CheckpointError(f"checkpoint of flow {self.flow!r}, run {self.run_id!r}: {exc}") from exc
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                self._name_unstorable()
                raise CheckpointError(
                    f"checkpoint of flow {self.flow!r}, run {self.run_id!r}: its run id or a name in it holds text "
                    f"that is not valid Unicode ({exc.reason}); it cannot be stored"
                ) from exc
        # The parser stops at a nesting depth for the whole document, so a value deep enough is
        # written but never read back. There are never more levels than brackets: counting them
        # is cheap, and only a checkpoint with that many is looked at closer.
        if text.count("[") + text.count("{") > parse_depth() and self._too_deep(text):
            self._name_unstorable()
            raise CheckpointError(
                f"checkpoint of flow {self.flow!r}, run {self.run_id!r}: its JSON is nested deeper than "
                f"{parse_depth()} levels, which pydantic's JSON parser cannot read back"
            )
        return text

    def _too_deep(self, text: str) -> bool:
        """Whether `text`, this checkpoint's JSON, nests deeper than the parser reads. A checkpoint
        the runtime built shares its run's `_fit`: each value is walked once, when a save first
        holds it, not again at every save (parsing the whole text each time cost a save of 30 KB
        two fifths more). Any other checkpoint is parsed."""
        if self._fit is None:
            return not _reads_back(text)
        return self._holds_too_deep(0)

    def _holds_too_deep(self, level: int) -> bool:
        room = parse_depth() - 2 - 2 * level
        fit = self._fit
        values = [(("input", n), v) for n, v in self.inputs.items()] + list(self.outputs.items())
        for key, value in values:
            if fit is not None and key in fit and fit[key] is value:
                continue
            if _depth(pydantic_core.to_jsonable_python(value)) > room:
                return True
            if fit is not None:
                fit[key] = value  # the value itself, not a copy: `is` above tells it is the same one
        return any(checkpoint._holds_too_deep(level + 1) for checkpoint in self.nested.values())

    def _name_unstorable(self, level: int = 0) -> None:
        """Raise a CheckpointError naming the first input or output that cannot be stored: one
        holding text UTF-8 cannot carry (a lone surrogate, as `os.fsdecode()` makes of undecodable
        file names), an int too long to write, or one nested too deep to read back (`level`: how
        many include steps deep this checkpoint sits in the document)."""
        values = [(f"input {n!r}", v) for n, v in self.inputs.items()]
        values += [(f"the output of step {n!r}", v) for n, v in self.outputs.items()]
        values += [(f"the state step {n!r} saved", v) for n, v in self.progress.items()]
        for what, value in values:
            self._check(what, self._value(what, value), level)
        for checkpoint in self.nested.values():
            checkpoint._name_unstorable(level + 1)

    def _check(self, what: str, jsonable: Any, level: int) -> None:
        """Raise a CheckpointError naming `what` if its JSON value cannot be stored at `level`."""
        problem = json_problem(jsonable, level)[0]
        if problem is not None:
            raise CheckpointError(f"checkpoint of flow {self.flow!r}, run {self.run_id!r}: {what} {problem}")

    def unstorable(self, level: int = 0) -> dict[str, CheckpointError]:
        """The outputs of this level (not of `nested`) that `to_json()` cannot write, by step name,
        each with the error that names it (empty if every output can be stored). `level`: how many
        include steps deep this checkpoint sits in the top-level run's (deeper values fit less deep)."""
        errors: dict[str, CheckpointError] = {}
        for name, value in self.outputs.items():
            what = f"the output of step {name!r}"
            try:
                self._check(what, self._value(what, value), level)
            except CheckpointError as exc:
                errors[name] = exc
        return errors

    def _jsonable(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "flow": self.flow,
            "flow_version": self.flow_version,
            "run_id": self.run_id,
            "inputs": {name: self._value(f"input {name!r}", v) for name, v in self.inputs.items()},
            "outputs": {name: self._value(f"the output of step {name!r}", v) for name, v in self.outputs.items()},
            "nested": {name: checkpoint._jsonable() for name, checkpoint in self.nested.items()},
            "progress": {name: self._value(f"the state step {name!r} saved", v) for name, v in self.progress.items()},
        }

    def _value(self, what: str, value: Any) -> Any:
        try:
            return pydantic_core.to_jsonable_python(value)
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint of flow {self.flow!r}, run {self.run_id!r}: {what} ({type(value).__name__}) cannot "
                f"be serialised to JSON: {exc}; return a pydantic model, a dataclass or builtin values"
            ) from exc


class CheckpointFile(BaseModel):
    """The JSON layout of a checkpoint, before its values are typed (see `Flow.load_checkpoint`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["stoppoint.checkpoint"]
    format_version: Literal[1, 2]  # 1: stoppoint 0.1 and 0.2 before saved progress (no `progress`)
    flow: str
    flow_version: str
    run_id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    nested: dict[str, CheckpointFile] = {}
    progress: dict[str, Any] = {}

    @classmethod
    def parse(cls, text: str | bytes) -> CheckpointFile:
        """Parse checkpoint JSON.

        Raises:
            CheckpointError: The text is not a checkpoint (with pydantic's detail).
        """
        if not isinstance(text, str | bytes | bytearray):
            raise CheckpointError(f"a checkpoint is JSON text (str or bytes), got {type(text).__name__}")
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise CheckpointError(f"not a valid stoppoint checkpoint: {exc}") from exc


def check_belongs(plan: Plan, checkpoint: Checkpoint | CheckpointFile) -> None:
    """Raise `CheckpointMismatch` unless `checkpoint` is one of the flow of `plan` (name, version,
    step names), at every level of nesting.

    Raises:
        CheckpointMismatch: Another flow, another version, or steps the flow does not have.
    """
    where = f"checkpoint of run {checkpoint.run_id!r}"
    if checkpoint.flow != plan.flow:
        raise CheckpointMismatch(f"{where} belongs to flow {checkpoint.flow!r}, not {plan.flow!r}")
    if checkpoint.flow_version != plan.version:
        raise CheckpointMismatch(
            f"{where} of flow {plan.flow!r} was taken at version {checkpoint.flow_version!r}; the flow is now "
            f"version {plan.version!r}"
        )
    specs = plan.specs
    unknown = [name for name in checkpoint.outputs if name not in specs]
    unknown += [name for name in checkpoint.nested if name not in specs or specs[name].include is None]
    if unknown:
        raise CheckpointMismatch(
            f"{where} of flow {plan.flow!r} has outputs for {', '.join(map(repr, unknown))}, which the flow "
            f"has no such (include) step for (steps: {', '.join(specs)})"
        )
    unknown = [name for name in checkpoint.progress if name not in specs or specs[name].include is not None]
    if unknown:
        raise CheckpointMismatch(
            f"{where} of flow {plan.flow!r} has saved progress for {', '.join(map(repr, unknown))}, which the flow "
            f"has no such step for (steps: {', '.join(specs)})"
        )
    strangers = [name for name in checkpoint.inputs if name not in plan.input_users]
    if strangers:
        raise CheckpointMismatch(
            f"{where} of flow {plan.flow!r} has inputs {', '.join(map(repr, strangers))} the flow does not take"
        )
    for name, inner in checkpoint.nested.items():
        include = specs[name].include
        assert include is not None
        check_belongs(include, inner)


def typed(plan: Plan, file: CheckpointFile) -> Checkpoint:
    """Turn a parsed checkpoint file into a `Checkpoint` of the flow of `plan`, each value validated
    back into its type: an output into its step's return annotation, an input into its parameter's.

    Raises:
        CheckpointMismatch: The checkpoint is not one of that flow.
        CheckpointError: A value does not validate (with pydantic's detail).
    """
    check_belongs(plan, file)
    where = f"checkpoint of flow {plan.flow!r}, run {file.run_id!r}"
    outputs = {
        name: _validate(where, f"the output of step {name!r}", output_type(plan, name), value)
        for name, value in file.outputs.items()
    }
    inputs = {
        name: _validate(where, f"input {name!r}", input_type(plan, name), value) for name, value in file.inputs.items()
    }
    nested = {}
    for name, inner in file.nested.items():
        include = plan.specs[name].include
        assert include is not None  # check_belongs made sure (at every level: checking again is cheap)
        nested[name] = typed(include, inner)
    return Checkpoint(
        flow=file.flow,
        flow_version=file.flow_version,
        run_id=file.run_id,
        inputs=inputs,
        outputs=outputs,
        nested=nested,
        # JSON values, as saved: `StepContext.restored()` validates one into the type its step asks for.
        progress={name: value for name, value in file.progress.items() if name not in outputs},
    )


def _validate(where: str, what: str, annotation: Any, value: Any) -> Any:
    if annotation is Any:
        return value
    if isinstance(annotation, Unresolved):
        raise CheckpointError(
            f"{where}: cannot type {what} back: its annotation {annotation.text!r} does not resolve "
            f"({annotation.error!r}); define the type at module level, where the step's module can see it"
        )
    try:
        return adapter(annotation).validate_python(value)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: {what} does not validate as {type_name(annotation)}: {exc}") from exc
    except PydanticSchemaGenerationError:  # an annotation pydantic cannot check: keep the JSON value
        return value
    except Exception as exc:  # a user validator raising TypeError, a model not fully defined, ...
        raise CheckpointError(f"{where}: {what} cannot be validated as {type_name(annotation)}: {exc!r}") from exc


def same_value(given: Any, other: Any) -> bool:
    """Equal, or equal as JSON: an unannotated tuple comes back from a checkpoint as a list, and a
    NaN is not equal to itself but is the same JSON. Never raises: values that cannot be compared
    nor turned into JSON are not the same."""
    try:
        if given is other or given == other:
            return True
    except Exception:  # an __eq__ that raises, or an array whose truth is ambiguous: compare as JSON
        pass
    try:
        given_json = pydantic_core.to_jsonable_python(given)
        other_json = pydantic_core.to_jsonable_python(other)
        return bool(given_json == other_json or pydantic_core.to_json(given_json) == pydantic_core.to_json(other_json))
    except Exception:  # a value that cannot be turned into JSON is the same only if it is equal
        return False


def _dumps(jsonable: Any) -> str:
    return json.dumps(jsonable, ensure_ascii=False, separators=(",", ":"))


@functools.cache
def parse_depth() -> int:
    """How many levels of nested arrays and objects pydantic's JSON parser reads (200 in pydantic
    2.x): found by asking it, so that a pydantic with another limit is not silently wrong."""
    low, high = 1, 4096  # it reads `low` levels; `high` is more than any parser allows
    while high - low > 1:
        middle = (low + high) // 2
        # Not empty: the parser reads one more level if the innermost array is empty.
        low, high = (middle, high) if _reads_back("[" * middle + "0" + "]" * middle) else (low, middle)
    return low


def _reads_back(text: str) -> bool:
    try:
        pydantic_core.from_json(text, cache_strings=False)  # (caching its strings costs a third more)
    except ValueError:
        return False
    return True


def _depth(jsonable: Any) -> int:
    """How many levels of lists and dicts `jsonable` nests (0 for a scalar)."""
    deepest, todo = 0, [(jsonable, 1)]
    while todo:
        value, depth = todo.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


def saved_json(flow: str, run_id: str, step: str, level: int, state: Any) -> Any:
    """`state`, which step `step` saves (`StepContext.save()`), as the JSON value a checkpoint holds (a
    copy: changing `state` afterwards changes nothing saved). `level`: how many include steps deep the
    step's flow sits in the run.

    Raises:
        CheckpointError: `state` cannot be turned into JSON that reads back (naming the step).
    """
    where = f"checkpoint of flow {flow!r}, run {run_id!r}: the state step {step!r} saved"
    try:
        jsonable = pydantic_core.to_jsonable_python(state)
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{where} ({type(state).__name__}) cannot be serialised to JSON: {exc}; save a pydantic model, a "
            "dataclass or builtin values"
        ) from exc
    problem = json_problem(jsonable, level)[0]
    if problem is not None:
        raise CheckpointError(f"{where} {problem}")
    return jsonable


def validate_saved(flow: str, run_id: str, step: str, annotation: Any, value: Any) -> Any:
    """A step's saved state `value` (JSON), validated into `annotation` (`StepContext.restored()`).

    Raises:
        CheckpointError: It does not validate (naming the step).
    """
    where = f"checkpoint of flow {flow!r}, run {run_id!r}"
    return _validate(where, f"the state step {step!r} saved", annotation, value)


def json_problem(jsonable: Any, level: int) -> tuple[str | None, str]:
    """Why `jsonable` (from `to_jsonable_python`) cannot be stored in a checkpoint `level` include
    steps deep and read back (None if it can), and its JSON text.

    A checkpoint sits in the document as a value of `"nested"` of the level above (two levels per
    include step); its inputs and outputs sit two levels inside it.
    """
    try:
        text = _dumps(jsonable)
    except ValueError:  # json.dumps cannot write an int longer than sys.get_int_max_str_digits()
        return (
            f"holds an int of more than {sys.get_int_max_str_digits()} digits, which cannot be written as JSON "
            "(Python's limit on converting an int to text); store it as a str",
            "",
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"holds text that is not valid Unicode ({exc.reason}: {exc.object[exc.start : exc.end]!r}); "
                "it cannot be stored",
                text,
            )
    room = parse_depth() - 2 - 2 * level
    if text.count("[") + text.count("{") > room and (depth := _depth(jsonable)) > room:
        return (
            f"is nested {depth} levels deep; a checkpoint can hold values at most {room} levels deep there "
            f"(pydantic's JSON parser reads {parse_depth()} levels, and the checkpoint's layout takes the others)",
            text,
        )
    return None, text


def _input_level(plan: Plan, name: str) -> int:
    """How many include steps deep input `name` of the flow of `plan` goes (each included flow
    taking it holds it in its own, nested, checkpoint)."""
    deepest = 0
    for spec in plan.specs.values():
        if spec.include is not None and any(item.param == name for item in spec.inputs):
            deepest = max(deepest, 1 + _input_level(spec.include, name))
    return deepest


def input_refusal(plan: Plan, name: str, value: Any, stored: bool) -> str | None:
    """Why input `name` of the flow of `plan` must not be `value` (None if it may): a resume would
    not read it back the same, through the validation `load_checkpoint` applies. With `stored`
    (the checkpoint will be written), through its JSON text too; without, a live value pydantic
    validates in python mode is kept as it is, so it need not serialise.
    """
    annotation = input_type(plan, name)
    read = value
    if stored:
        try:
            jsonable = pydantic_core.to_jsonable_python(value)
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            return f"it ({type(value).__name__}) cannot be serialised to JSON: {exc}"
        problem, text = json_problem(jsonable, _input_level(plan, name))
        if problem is not None:
            return f"it {problem}"
        read = pydantic_core.from_json(text)
    if annotation is Any:
        return None
    if isinstance(annotation, Unresolved):
        if not stored:
            return None
        return (
            f"its annotation {annotation.text!r} does not resolve ({annotation.error!r}), so a resume could not "
            "read it back; define the type at module level"
        )
    expected = type_name(annotation)
    try:
        back = adapter(annotation).validate_python(read)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        return f"it does not validate as {expected}: {errors[0]['msg'] if len(errors) == 1 else exc}"
    except PydanticSchemaGenerationError:  # load_checkpoint keeps such a value as it is
        return None
    except Exception as exc:  # a user validator raising TypeError, say
        return f"it cannot be validated as {expected}: {exc!r}"
    if back is value or same_value(value, back):
        return None
    return (
        f"a resume would read it back as {back!r} ({type(back).__name__}), not as the "
        f"{type(value).__name__} given; pass a {expected}"
    )
