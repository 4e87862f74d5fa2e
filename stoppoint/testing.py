"""Testing your flows: stop them at a chosen stopping point, count their stopping points, and check
that they resume to the same result from every one of them.

    outcome = await flow.run(inputs, interrupts=interrupt_at("upload", 2))
    assert isinstance(outcome, sp.Interrupted)

    report = await check_resumable(flow, inputs)   # raises AssertionError naming the failing point

A stopping point is named by its step and its number within the step: 0 is the stopping point before
the step starts, 1 its first `ctx.checkpoint()` (or `ctx.iterate()` item boundary), 2 the next, and so
on. They fire deterministically, on asyncio and trio alike: no timing is involved.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ._checkpoint import Checkpoint, same_value
from ._flow import Flow
from ._outcome import Completed, Interrupted
from ._plan import Plan
from ._probe import Probe, attach
from ._signal import InterruptSignal

__all__ = [
    "ResumabilityReport",
    "StoppingPoint",
    "check_resumable",
    "count_stopping_points",
    "interrupt_at",
    "stopping_points",
]


@dataclass(frozen=True, order=True)
class StoppingPoint:
    """One stopping point of a run: stopping point `n` of step `step` of flow `flow`, reached
    through the include steps `path` (() for the run's own steps; ("sub",) for the steps of the
    flow included as step `sub`), so that a flow included twice has distinct points."""

    flow: str
    step: str
    n: int
    path: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "".join(f"{name}/" for name in self.path) + f"{self.flow}.{self.step}#{self.n}"


class _Recorder(Probe):
    """Notes every stopping point passed; interrupts at the chosen ones (each at most once)."""

    def __init__(
        self, at: tuple[str, int, str | None, tuple[str, ...] | None] | None = None, reason: str = "test"
    ) -> None:
        self.passed: list[StoppingPoint] = []
        self.at = at
        self.reason = reason
        self.fired: StoppingPoint | None = None

    def attached(self, plan: Plan) -> None:
        """A stopping point that no step of the flow has would never fire: say so, before the run."""
        if self.at is None:
            return
        step, _, flow_name, _ = self.at
        found = set(_steps(plan))
        if any(name == step and flow_name in (None, owner) for name, owner in found):
            return
        if step in _include_steps(plan):
            raise ValueError(
                f"interrupt_at({step!r}): {step!r} is an include step of flow {plan.flow!r}, which has no stopping "
                "point of its own; name a step of the included flow"
            )
        known = ", ".join(sorted({name for name, _ in found}))
        where = f" in flow {flow_name!r}" if flow_name is not None else ""
        raise ValueError(f"interrupt_at({step!r}): flow {plan.flow!r} has no step {step!r}{where} (its steps: {known})")

    def reached(self, path: tuple[str, ...], flow: str, step: str, n: int) -> None:
        point = StoppingPoint(flow, step, n, path)
        self.passed.append(point)
        if self.at is not None and self.fired is None:
            step_name, number, flow_name, at_path = self.at
            if step == step_name and n == number and flow_name in (None, flow) and at_path in (None, path):
                self.fired = point
                self.interrupt(InterruptSignal(reason=self.reason, source="test"))


def _steps(plan: Plan) -> Iterator[tuple[str, str]]:
    """(step, its flow's name) for every step with stopping points, included flows' too."""
    for name, spec in plan.specs.items():
        if spec.include is not None:
            yield from _steps(spec.include)
        else:
            yield name, plan.flow


def _holds_progress(checkpoint: Checkpoint) -> bool:
    """Whether a step of `checkpoint`, at any level, saved state that a resume restores."""
    return bool(checkpoint.progress) or any(_holds_progress(inner) for inner in checkpoint.nested.values())


def _include_steps(plan: Plan) -> set[str]:
    names = set()
    for name, spec in plan.specs.items():
        if spec.include is not None:
            names.add(name)
            names |= _include_steps(spec.include)
    return names


def _probing(probe: Probe) -> MemoryObjectReceiveStream[InterruptSignal]:
    """A receiver to pass as `interrupts=`: already closed (it carries nothing and needs no
    closing), with `probe` attached to the run that listens on it."""
    send, receive = anyio.create_memory_object_stream[InterruptSignal](0)
    send.close()
    receive.close()
    attach(receive, probe)
    return receive


def interrupt_at(
    step: str,
    checkpoint: int = 0,
    *,
    reason: str = "test",
    flow: str | None = None,
    path: tuple[str, ...] | None = None,
) -> MemoryObjectReceiveStream[InterruptSignal]:
    """An interrupt source that fires when `step` reaches its stopping point number `checkpoint`.

    Pass it as `flow.run(inputs, interrupts=interrupt_at("upload", 2))`. 0 is the stopping point
    before the step starts (the step does not start), 1 its first `ctx.checkpoint()`, and so on. It
    fires at most once, with a signal of `source="test"`; the run's strategy decides what happens
    then, as for any signal. `flow` picks the flow when an included flow has a step of that name,
    and `path` the include (see `StoppingPoint.path`) when a flow is included more than once.
    Use each one for one run.

    Raises:
        ValueError: `checkpoint` is not an int >= 0, or `step` is empty.
    """
    if not isinstance(step, str) or not step:
        raise ValueError(f"interrupt_at(): step must be a step's name, got {step!r}")
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 0:
        raise ValueError(f"interrupt_at(): checkpoint must be an int >= 0, got {checkpoint!r}")
    return _probing(_Recorder((step, checkpoint, flow, path), reason))


async def stopping_points(
    flow: Flow, inputs: Mapping[str, Any] | None = None, *, resources: Mapping[str, Any] | None = None
) -> list[StoppingPoint]:
    """The stopping points an uninterrupted run of `flow` passes, in the order it passes them
    (`resources`: as for `flow.run()`).

    Raises:
        AssertionError: The run did not complete.
    """
    recorder = _Recorder()
    outcome = await flow.run(inputs, interrupts=_probing(recorder), resources=resources)
    if not isinstance(outcome, Completed):
        raise AssertionError(f"flow {flow.name!r}: an uninterrupted run did not complete: {outcome!r}")
    return recorder.passed


async def count_stopping_points(flow: Flow, inputs: Mapping[str, Any] | None = None) -> int:
    """How many stopping points an uninterrupted run of `flow` passes: one before each step, plus
    each `ctx.checkpoint()` reached."""
    return len(await stopping_points(flow, inputs))


@dataclass
class _Where:
    """Names the chain being tried, in a failure's message: "flow 'f', interrupted at f.a#1, then f.b#2"."""

    flow: str
    tried: StoppingPoint
    chain: list[StoppingPoint]

    def __str__(self) -> str:
        if not self.chain:  # the run failed before the interrupt came
            return f"flow {self.flow!r}, trying {self.tried}"
        return f"flow {self.flow!r}, interrupted at {', then '.join(map(str, self.chain))}"


@dataclass
class ResumabilityReport:
    """What `check_resumable` tried.

    Attributes:
        value: The result of the uninterrupted run, which every resumed chain reproduced.
        points: The stopping points of the uninterrupted run, each of which was tried.
        chains: For each tried point, the points the run was interrupted at, in order (the first is
            the tried point; later ones interrupted the resumed runs, up to `max_chain`).
        restored: How many of the resumes went on from state a step had saved (`StepContext.save()`):
            0 for a flow that saves nothing.
    """

    value: Any
    points: list[StoppingPoint]
    chains: dict[StoppingPoint, list[StoppingPoint]] = field(default_factory=dict)
    restored: int = 0

    @property
    def runs(self) -> int:
        """How many runs it took, the uninterrupted one included."""
        return 1 + sum(len(chain) + 1 for chain in self.chains.values())


async def check_resumable(
    flow: Flow,
    inputs: Mapping[str, Any] | None = None,
    *,
    max_chain: int = 3,
    through_json: bool = True,
    resources: Mapping[str, Any] | None = None,
) -> ResumabilityReport:
    """Prove that `flow` can be stopped at each of its stopping points and resumed to the same result.

    Runs the flow uninterrupted, then, for every stopping point it passed: runs it again (with the
    same run id, which a step may use), interrupted there; resumes from the checkpoint, through its
    JSON as a store would keep it (unless `through_json=False`, for flows whose inputs are live
    objects and that only ever resume in the same process); interrupts the resumed run again at its
    next stopping point of the original run, up to `max_chain` interrupts in all; and resumes to the
    end. Each chain must end `Completed` with a value equal to the uninterrupted one, and no step a
    checkpoint holds completed may run again. `resources` are given to every run and resume.

    Saved progress is covered: a step that saved (`ctx.save()`) before the interrupt resumes from
    what it saved (`ctx.restored()`), read back from the checkpoint's JSON as from a store, so a step
    whose saved state does not match the work it did (saved before doing it, or missing part of what
    it returns) resumes to another result and fails the check. A resumed step that restores its state
    passes fewer stopping points than the uninterrupted run: the later interrupts of a chain are
    counted in the resumed run's own stopping points of that step.

    Returns:
        What was tried.

    Raises:
        AssertionError: A chain failed; the message names the stopping point and what went wrong.
        ValueError: `max_chain` is not an int >= 1.
    """
    if isinstance(max_chain, bool) or not isinstance(max_chain, int) or max_chain < 1:
        raise ValueError(f"check_resumable(): max_chain must be an int >= 1, got {max_chain!r}")
    baseline = _Recorder()
    first = await flow.run(inputs, interrupts=_probing(baseline), resources=resources)
    if not isinstance(first, Completed):
        raise AssertionError(f"flow {flow.name!r}: an uninterrupted run did not complete: {first!r}")
    run_id = first.report.run_id  # every chain is this run again
    points = baseline.passed
    report = ResumabilityReport(first.value, list(points))
    for index, point in enumerate(points):
        chain = report.chains[point] = []
        where = _Where(flow.name, point, chain)
        target: StoppingPoint | None = point
        checkpoint = None
        later = points[index + 1 :]
        while True:
            recorder = _Recorder((target.step, target.n, target.flow, target.path) if target is not None else None)
            try:
                if checkpoint is None:
                    outcome = await flow.run(inputs, interrupts=_probing(recorder), run_id=run_id, resources=resources)
                else:
                    outcome = await flow.run(resume=checkpoint, interrupts=_probing(recorder), resources=resources)
            except Exception as exc:  # StepFailed: a step that cannot be run again, say
                raise AssertionError(f"{where}: the {'resumed ' if checkpoint else ''}run raised {exc!r}") from exc
            if checkpoint is not None:
                again = {p.step for p in recorder.passed if p.n == 0 and not p.path} & set(checkpoint.outputs)
                if again:
                    raise AssertionError(f"{where}: resuming ran completed step(s) again: {', '.join(sorted(again))}")
            if isinstance(outcome, Completed):
                if not same_value(outcome.value, first.value):
                    raise AssertionError(
                        f"{where}: resumed to {outcome.value!r}, but the uninterrupted run gave {first.value!r}"
                    )
                break
            if not isinstance(outcome, Interrupted):  # pragma: no cover - run() returns one of the two
                raise AssertionError(f"{where}: unexpected outcome {outcome!r}")
            if recorder.fired is not None:
                chain.append(recorder.fired)
            try:
                checkpoint = flow.load_checkpoint(outcome.checkpoint.to_json()) if through_json else outcome.checkpoint
            except Exception as exc:  # CheckpointError: an output or input JSON cannot hold
                raise AssertionError(f"{where}: its checkpoint cannot go through JSON: {exc}") from exc
            if _holds_progress(checkpoint):
                report.restored += 1
            # The next interrupt of the chain: the next point of the original run that belongs to a
            # step the checkpoint does not hold completed (a step resumed runs again from its start).
            target = None
            if len(chain) < max_chain:
                outputs = checkpoint.outputs
                for position, candidate in enumerate(later):
                    if candidate.path or candidate.step not in outputs:
                        target, later = candidate, later[position + 1 :]
                        break
    return report
