"""Checkpoint: what a resume needs, carried by every `Interrupted` and `StepFailed`.

On disk a checkpoint is JSON, never pickle: `to_json()` turns each output into JSON with pydantic,
and `Flow.load_checkpoint()` validates each one back into its step's return type, so a tampered
or foreign file gives a `CheckpointError`, not code execution.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError

from ._errors import CheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointFile"]

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

        Raises:
            CheckpointError: An output or input cannot be turned into JSON (the message names it).
        """
        return json.dumps(self._jsonable(), ensure_ascii=False, separators=(",", ":"))

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
