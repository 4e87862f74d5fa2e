"""Checkpoint: what a resume needs, carried by every `Interrupted` and `StepFailed`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Checkpoint"]


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
