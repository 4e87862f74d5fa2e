"""Checkpoint: what a resume needs, carried by every `Interrupted` and `StepFailed`.

On disk a checkpoint is JSON, never pickle: `to_json()` turns each output into JSON with pydantic,
and `Flow.load_checkpoint()` validates each one back into its step's return type, so a tampered
or foreign file gives a `CheckpointError`, not code execution.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, PydanticSchemaGenerationError, TypeAdapter, ValidationError

from ._errors import CheckpointError, CheckpointMismatch
from ._plan import Plan
from ._types import Unresolved, input_type, output_type, type_name

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointFile", "check_belongs", "same_value", "typed"]

FORMAT = "stoppoint.checkpoint"
FORMAT_VERSION = 1


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
    """

    model_config = ConfigDict(frozen=True)

    flow: str
    flow_version: str
    run_id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    nested: dict[str, Checkpoint] = {}

    def to_json(self) -> str:
        """The checkpoint as JSON text, for `Flow.load_checkpoint()` (in this or another process).

        Outputs and inputs are serialised with pydantic: models, dataclasses, builtins, dates,
        UUIDs, enums and the like. Nothing is pickled.

        Returns:
            The JSON text (use this, not `model_dump_json()`, which lacks the format header and
            that `load_checkpoint()` refuses).

        Raises:
            CheckpointError: An output or input cannot be turned into JSON (the message names it).
        """
        text = json.dumps(self._jsonable(), ensure_ascii=False, separators=(",", ":"))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            self._name_unencodable()
            raise
        return text

    def _name_unencodable(self) -> None:
        """Raise a CheckpointError naming the value that holds text UTF-8 cannot carry (a lone
        surrogate, as `os.fsdecode()` makes of undecodable file names)."""
        values = [(f"input {n!r}", v) for n, v in self.inputs.items()]
        values += [(f"the output of step {n!r}", v) for n, v in self.outputs.items()]
        for what, value in values:
            self._encode(what, pydantic_core.to_jsonable_python(value))
        for checkpoint in self.nested.values():
            checkpoint._name_unencodable()

    def _encode(self, what: str, jsonable: Any) -> None:
        """Raise a CheckpointError naming `what` if its JSON value holds text UTF-8 cannot carry."""
        try:
            json.dumps(jsonable, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CheckpointError(
                f"checkpoint of flow {self.flow!r}, run {self.run_id!r}: {what} holds text that is not "
                f"valid Unicode ({exc.reason}: {exc.object[exc.start : exc.end]!r}); it cannot be stored"
            ) from exc

    def unstorable(self) -> dict[str, CheckpointError]:
        """The outputs of this level (not of `nested`) that `to_json()` cannot write, by step name,
        each with the error that names it (empty if every output can be stored)."""
        errors: dict[str, CheckpointError] = {}
        for name, value in self.outputs.items():
            what = f"the output of step {name!r}"
            try:
                self._encode(what, self._value(what, value))
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
    format_version: Literal[1]
    flow: str
    flow_version: str
    run_id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    nested: dict[str, CheckpointFile] = {}

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
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: {what} does not validate as {type_name(annotation)}: {exc}") from exc
    except PydanticSchemaGenerationError:  # an annotation pydantic cannot check: keep the JSON value
        return value
    except Exception as exc:  # a user validator raising TypeError, a model not fully defined, ...
        raise CheckpointError(f"{where}: {what} cannot be validated as {type_name(annotation)}: {exc!r}") from exc


def same_value(given: Any, other: Any) -> bool:
    """Equal, or equal as JSON: an unannotated tuple comes back from a checkpoint as a list, and a
    NaN is not equal to itself but is the same JSON."""
    if given == other:
        return True
    try:
        given_json = pydantic_core.to_jsonable_python(given)
        other_json = pydantic_core.to_jsonable_python(other)
        return bool(given_json == other_json or pydantic_core.to_json(given_json) == pydantic_core.to_json(other_json))
    except Exception:  # a value that cannot be turned into JSON is the same only if it is equal
        return False
