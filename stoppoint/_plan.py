"""Plan: what a frozen flow hands the runtime, compiled once per flow.

The runtime (launching, scheduling, checkpoints, the command, the test helpers) reads a flow only
through its `Plan`, never through `Flow`'s attributes. This module imports nothing else of stoppoint,
so anything may import it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._retry import Retry

__all__ = ["Input", "Plan", "StepSpec", "compile_plan"]


@dataclass(frozen=True, slots=True)
class Input:
    """A parameter of a step that takes a flow input."""

    param: str
    required: bool


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One declared step: how to call it and what it waits for."""

    name: str
    fn: Callable[..., Awaitable[Any]] | None  # None for an include step
    include: Plan | None  # the included flow's plan, for an include step
    context_param: str | None
    dependencies: tuple[str, ...]  # steps whose outputs are parameters (parameter name == step name)
    after: tuple[str, ...]  # ordering-only edges
    inputs: tuple[Input, ...]
    waits_for: tuple[str, ...]  # every step that must complete first: data edges, then `after=`
    resources: tuple[str, ...] = ()  # parameters annotated `Resource[T]`: given by the run, never stored
    retry: Retry | None = None  # how a failed attempt is tried again (_retry.py)
    timeout: float | None = None  # seconds per attempt
    # A retry policy or a timeout: the step runs on _retry.py's path, not the executor's own.
    guarded: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything every run of one frozen flow needs, derived once from its steps."""

    flow: str  # the flow's name
    version: str
    specs: dict[str, StepSpec]  # in declaration order
    steps: tuple[str, ...]  # the step names, in declaration order
    limit: int  # at most this many steps of the flow run at once
    result: str  # the step whose output is the flow's result
    required_inputs: tuple[str, ...]  # in order of first use
    input_users: dict[str, str]  # every input -> the first step that takes it
    all_inputs: frozenset[str]
    # step -> (its spec, ((dependant, whether it waits for this step alone), ...)): what running
    # and finishing a step need, in one lookup. A dependant that waits for nothing else is ready
    # at once, with no count to keep, so a chain touches no count: past the CPU caches (100,000
    # steps) every operation on a dict that size is a cache miss.
    entries: dict[str, tuple[StepSpec, tuple[tuple[str, bool], ...]]]
    counted: dict[str, int]  # step -> how many steps it waits for, if more than one (each run counts down a copy)
    roots: tuple[str, ...]  # steps that wait for nothing, in declaration order
    # Every resource a run of the flow needs (its included flows' too), in order of first use.
    resources: tuple[str, ...] = ()

    def resumed(
        self, completed: Mapping[str, object]
    ) -> tuple[dict[str, int], list[str], dict[str, tuple[StepSpec, tuple[tuple[str, bool], ...]]]]:
        """What a run resuming with the steps `completed` starts from: how many steps each other step
        still waits for, the steps ready at once, and `entries` without the completed steps as
        dependants (a completed step is never made ready again, even when a step it waits for runs
        now: a flow that gained a prerequisite at the same version)."""
        waiting = {
            name: sum(other not in completed for other in spec.waits_for)
            for name, spec in self.specs.items()
            if name not in completed
        }
        entries = {
            name: (spec, tuple(item for item in dependants if item[0] not in completed))
            for name, (spec, dependants) in self.entries.items()
        }
        return waiting, [name for name, left in waiting.items() if not left], entries


def compile_plan(
    flow: str,
    version: str,
    max_concurrency: int | None,
    specs: Mapping[str, StepSpec],
    result: str,
    input_users: Mapping[str, str],
    required_inputs: tuple[str, ...],
    resources: tuple[str, ...] = (),
) -> Plan:
    """The plan of a flow whose steps are `specs` (checked by `Flow` as they were declared)."""
    dependants: dict[str, list[str]] = {name: [] for name in specs}
    for name, spec in specs.items():
        for other in spec.waits_for:
            dependants[other].append(name)
    waiting = {name: len(spec.waits_for) for name, spec in specs.items()}
    return Plan(
        flow=flow,
        version=version,
        specs=dict(specs),
        steps=tuple(specs),
        limit=max_concurrency or len(specs),
        result=result,
        required_inputs=required_inputs,
        input_users=dict(input_users),
        all_inputs=frozenset(input_users),
        entries={
            name: (spec, tuple((other, waiting[other] == 1) for other in dependants[name]))
            for name, spec in specs.items()
        },
        counted={name: left for name, left in waiting.items() if left > 1},
        roots=tuple(name for name, spec in specs.items() if not spec.waits_for),
        resources=resources,
    )
