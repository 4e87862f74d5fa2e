"""Checkpoint: what a resume needs, carried by every `Interrupted` and `StepFailed`.

On disk a checkpoint is JSON, never pickle: `to_json()` turns each output into JSON with pydantic,
and `Flow.load_checkpoint()` validates each one back into its step's return type, so a tampered
or foreign file gives a `CheckpointError`, not code execution.
"""

from __future__ import annotations

import json
import typing
from typing import TYPE_CHECKING, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, PydanticSchemaGenerationError, TypeAdapter, ValidationError

from ._errors import CheckpointError, CheckpointMismatch

if TYPE_CHECKING:
    from ._flow import Flow

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointFile", "check_belongs", "typed"]

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
            try:
                json.dumps(pydantic_core.to_jsonable_python(value), ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                raise CheckpointError(
                    f"checkpoint of flow {self.flow!r}, run {self.run_id!r}: {what} holds text that is not "
                    f"valid Unicode ({exc.reason}: {exc.object[exc.start : exc.end]!r}); it cannot be stored"
                ) from exc
        for checkpoint in self.nested.values():
            checkpoint._name_unencodable()

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


def check_belongs(flow: Flow, checkpoint: Checkpoint | CheckpointFile) -> None:
    """Raise `CheckpointMismatch` unless `checkpoint` is one of `flow` (name, version, step names),
    at every level of nesting.

    Raises:
        CheckpointMismatch: Another flow, another version, or steps the flow does not have.
    """
    where = f"checkpoint of run {checkpoint.run_id!r}"
    if checkpoint.flow != flow.name:
        raise CheckpointMismatch(f"{where} belongs to flow {checkpoint.flow!r}, not {flow.name!r}")
    if checkpoint.flow_version != flow.version:
        raise CheckpointMismatch(
            f"{where} of flow {flow.name!r} was taken at version {checkpoint.flow_version!r}; the flow is now "
            f"version {flow.version!r}"
        )
    specs = flow._specs
    unknown = [name for name in checkpoint.outputs if name not in specs]
    unknown += [name for name in checkpoint.nested if name not in specs or specs[name].include is None]
    if unknown:
        raise CheckpointMismatch(
            f"{where} of flow {flow.name!r} has outputs for {', '.join(map(repr, unknown))}, which the flow "
            f"has no such (include) step for (steps: {', '.join(specs)})"
        )
    strangers = [name for name in checkpoint.inputs if name not in flow._input_users]
    if strangers:
        raise CheckpointMismatch(
            f"{where} of flow {flow.name!r} has inputs {', '.join(map(repr, strangers))} the flow does not take"
        )
    for name, inner in checkpoint.nested.items():
        include = specs[name].include
        assert include is not None
        check_belongs(include, inner)


def typed(flow: Flow, file: CheckpointFile) -> Checkpoint:
    """Turn a parsed checkpoint file into a `Checkpoint` of `flow`, each value validated back into
    its type: an output into its step's return annotation, an input into its parameter's.

    Raises:
        CheckpointMismatch: The checkpoint is not one of `flow`.
        CheckpointError: A value does not validate (with pydantic's detail).
    """
    check_belongs(flow, file)
    where = f"checkpoint of flow {flow.name!r}, run {file.run_id!r}"
    outputs = {
        name: _validate(where, f"the output of step {name!r}", _output_type(flow, name), value)
        for name, value in file.outputs.items()
    }
    inputs = {
        name: _validate(where, f"input {name!r}", _input_type(flow, name), value) for name, value in file.inputs.items()
    }
    nested = {}
    for name, inner in file.nested.items():
        include = flow._specs[name].include
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


class _Unresolved:
    """An annotation that names something not reachable from the step's module."""

    def __init__(self, text: str, error: Exception) -> None:
        self.text = text
        self.error = error


def _validate(where: str, what: str, annotation: Any, value: Any) -> Any:
    if annotation is Any:
        return value
    if isinstance(annotation, _Unresolved):
        raise CheckpointError(
            f"{where}: cannot type {what} back: its annotation {annotation.text!r} does not resolve "
            f"({annotation.error!r}); define the type at module level, where the step's module can see it"
        )
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: {what} does not validate as {_name(annotation)}: {exc}") from exc
    except PydanticSchemaGenerationError:  # an annotation pydantic cannot check: keep the JSON value
        return value
    except Exception as exc:  # a user validator raising TypeError, a model not fully defined, ...
        raise CheckpointError(f"{where}: {what} cannot be validated as {_name(annotation)}: {exc!r}") from exc


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or repr(annotation)


class _Annotations:
    """Holds one annotation, so `typing.get_type_hints` resolves it alone."""

    def __init__(self, annotations: dict[str, Any]) -> None:
        self.__annotations__ = annotations


def _hint(fn: Any, name: str) -> Any:
    """The resolved annotation `name` of `fn` (`"return"` for its result), or Any.

    Each annotation is resolved alone: a parameter annotated with a name imported only under
    TYPE_CHECKING (often `StepContext`) must not cost the return annotation its type.
    """
    annotation = getattr(fn, "__annotations__", {}).get(name, Any)
    if not isinstance(annotation, str):
        return annotation
    try:
        return typing.get_type_hints(_Annotations({name: annotation}), globalns=getattr(fn, "__globals__", None))[name]
    except Exception as exc:
        # Typically a class defined inside a function, under `from __future__ import annotations`.
        # Handing back the raw JSON instead would fail later, far from the cause.
        return _Unresolved(annotation, exc)


def _output_type(flow: Flow, step: str) -> Any:
    spec = flow._specs[step]
    if spec.include is not None:
        return _output_type(spec.include, spec.include.result)
    return _hint(spec.fn, "return")


def _input_type(flow: Flow, name: str) -> Any:
    spec = flow._specs[flow._input_users[name]]
    if spec.include is not None:
        return _input_type(spec.include, name)
    return _hint(spec.fn, name)
