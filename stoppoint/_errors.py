"""The exceptions stoppoint raises.

The tree::

    Exception
     +-- StoppointError                 every error stoppoint raises on purpose
          +-- FlowDefinitionError       a flow or step is declared wrongly (raised at decoration time)
          +-- FlowInputError            run() got missing, unknown or invalid inputs (before any step starts)
          +-- StepFailed                a step raised; __cause__ is the step's exception
          +-- CheckpointError           a checkpoint cannot be read or used
          |    +-- CheckpointMismatch   a checkpoint of another flow, version or inputs
          +-- StoreError                a store cannot be read or written
          |    +-- RunOwned             another live owner holds the run's lease
          |    +-- LeaseLost            this process lost the run's lease (another may own it now)
          +-- StepTimeout               an attempt of a step ran over its `timeout=` (also a TimeoutError)

    BaseException
     +-- StopRequested                  not an error: how a stopping point unwinds a step
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime

    from ._checkpoint import Checkpoint
    from ._outcome import RunReport

__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "FlowDefinitionError",
    "FlowInputError",
    "LeaseLost",
    "RunOwned",
    "StepFailed",
    "StepTimeout",
    "StopRequested",
    "StoppointError",
    "StoreError",
]


class StoppointError(Exception):
    """Base class of every error stoppoint raises on purpose."""


class FlowDefinitionError(StoppointError):
    """A flow or one of its steps is declared wrongly.

    Raised when the offending declaration is made (at decoration time), and the message names the
    flow, the step and the offending name.
    """


class FlowInputError(StoppointError):
    """`Flow.run()` was given missing, unknown or invalid inputs, missing or unknown resources, or a
    run id no store can keep; raised before any step starts or anything is stored.

    An input is invalid when a resume could not read it back as given: it does not validate as the
    annotation of the step parameter that takes it (pydantic, as `load_checkpoint` does), would be
    read back as another value (`"5"` for an `int` is read back as `5`), or, with a store, cannot
    be written as JSON that reads back.

    Attributes:
        flow: The flow's name.
        missing: Required inputs that were not given, in declaration order.
        unknown: Given names that are not inputs of the flow, sorted.
        invalid: Given inputs a resume could not read back as given, each with why.
        invalid_run_id: The run id, when it is what was refused (text UTF-8 cannot encode), else None.
        missing_resources: Resources the flow's steps take (`Resource[T]`) that were not given.
        unknown_resources: Given resource names that no step of the flow takes, sorted.
    """

    def __init__(
        self,
        flow: str,
        missing: tuple[str, ...] = (),
        unknown: tuple[str, ...] = (),
        invalid: dict[str, str] | None = None,
        invalid_run_id: str | None = None,
        *,
        missing_resources: tuple[str, ...] = (),
        unknown_resources: tuple[str, ...] = (),
    ) -> None:
        self.flow = flow
        self.missing = missing
        self.unknown = unknown
        self.invalid = dict(invalid or {})
        self.invalid_run_id = invalid_run_id
        self.missing_resources = missing_resources
        self.unknown_resources = unknown_resources
        parts = []
        if invalid_run_id is not None:
            parts.append(
                f"run id {invalid_run_id!r} holds a lone surrogate, which UTF-8 cannot encode (a str decoded with "
                "surrogateescape, as os.fsdecode does?), so no checkpoint or store can keep it"
            )
        if missing:
            parts.append("missing input(s) " + ", ".join(repr(n) for n in missing))
        if unknown:
            parts.append("unknown input(s) " + ", ".join(repr(n) for n in unknown))
        parts.extend(f"input {name!r}: {why}" for name, why in self.invalid.items())
        if missing_resources:
            parts.append(
                "missing resource(s) "
                + ", ".join(repr(n) for n in missing_resources)
                + " (live objects its steps take as Resource[...]: give them as resources={name: object}, "
                "on every run and resume)"
            )
        if unknown_resources:
            parts.append("unknown resource(s) " + ", ".join(repr(n) for n in unknown_resources))
        super().__init__(f"flow {flow!r}: " + "; ".join(parts))


class StepFailed(StoppointError):
    """A step raised an exception, so the run was abandoned.

    Steps still running at that moment were cancelled (reported `CANCELLED`); steps that had not
    started are `NOT_STARTED`. The step's own exception is the `__cause__`.

    Attributes:
        step: Name of the step that raised.
        report: The run's final report.
        checkpoint: What a resume needs: the outputs of the steps that did complete.
    """

    def __init__(self, step: str, report: RunReport, checkpoint: Checkpoint) -> None:
        self.step = step
        self.report = report
        self.checkpoint = checkpoint
        error = report.steps[step].error
        super().__init__(f"step {step!r} of flow {report.flow!r} failed: {error}")


class CheckpointError(StoppointError):
    """A checkpoint cannot be read or used."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint belongs to another flow, another flow version, or other inputs."""


class StoreError(StoppointError):
    """A store cannot be opened, read or written."""


class RunOwned(StoreError):
    """The run is held by a live lease: another attempt (in this process or another) is running it.

    Attributes:
        flow: The flow's name.
        run_id: The run's id.
        owner: Who holds it (`host:pid/token`, as `RunRecord.owner` shows it).
        since: When the owner claimed it (UTC), if the store tells.
    """

    def __init__(self, flow: str, run_id: str, owner: str, since: datetime | None = None) -> None:
        self.flow, self.run_id, self.owner, self.since = flow, run_id, owner, since
        when = "" if since is None else f" since {since.isoformat(timespec='seconds')}"
        super().__init__(
            f"flow {flow!r}, run {run_id!r} is owned by {owner}{when}, whose lease is live: it is running there; "
            "interrupt it (store.interrupt or `stoppoint interrupt`) or wait for it to end"
        )


class LeaseLost(StoreError):
    """This attempt lost the run's lease: a write was refused because another claim came since (its
    `epoch` moved on), or no renewal succeeded for 0.8 of the lease. The attempt stopped at once,
    writing nothing more; whoever claimed the run after it owns what is stored.

    Attributes:
        flow: The flow's name.
        run_id: The run's id.
        epoch: The lease's epoch (the claim number this attempt held).
    """

    def __init__(self, flow: str, run_id: str, epoch: int, why: str) -> None:
        self.flow, self.run_id, self.epoch = flow, run_id, epoch
        super().__init__(f"flow {flow!r}, run {run_id!r}: lost the lease of epoch {epoch}: {why}")


class StepTimeout(StoppointError, TimeoutError):
    """An attempt of a step ran longer than its `timeout=` and was cancelled (API.md §11).

    It is also a `TimeoutError`, so `except TimeoutError` and `Retry(on=(TimeoutError,))` catch it;
    a step's `Retry` retries it when `on` matches it (the default `on=(Exception,)` does). When
    no attempt is left, the step fails with it (`StepFailed.__cause__`).

    Attributes:
        step: The step's name.
        seconds: The timeout each attempt had.
    """

    def __init__(self, step: str, seconds: float) -> None:
        self.step, self.seconds = step, seconds
        super().__init__(f"step {step!r}: the attempt ran over its timeout of {seconds:g} s and was cancelled")

    def __reduce__(self) -> tuple[type[StepTimeout], tuple[str, float]]:
        return type(self), (self.step, self.seconds)


class StopRequested(BaseException):
    """Raised by a stopping point when the run's strategy says this step must stop now.

    It derives from `BaseException` so that `except Exception:` in user code cannot swallow it,
    while `finally:` blocks and context managers still run. The executor catches it at the step
    boundary (also when it comes out of a task group the step opened) and reports the step as
    `INTERRUPTED`. User code should let it propagate.

    Attributes:
        stopped_at: `"file.py:LINE"` of the user's line whose stopping point stopped the step.
    """

    def __init__(self, stopped_at: str | None = None) -> None:
        super().__init__(stopped_at)
        self.stopped_at = stopped_at
