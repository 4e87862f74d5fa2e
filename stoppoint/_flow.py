"""Flow: declared steps, resolved by parameter name into a DAG."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from ._checkpoint import Checkpoint, CheckpointFile, typed
from ._declare import (
    INHERIT,
    check_after,
    check_kinds,
    check_new_name,
    check_retry,
    check_timeout_of,
    step_parameters,
)
from ._errors import FlowDefinitionError
from ._events import EventCallback
from ._handle import FlowRun
from ._launch import RunOptions, open_run, submit
from ._outcome import Completed
from ._plan import Input, Plan, StepSpec, compile_plan
from ._retry import Retry
from ._signal import InterruptSignal
from ._strategy import AtCheckpoint, Strategy

if TYPE_CHECKING:
    from ._outcome import Interrupted
    from ._store import BasicStore, Store

__all__ = ["Flow", "plan_of"]

StepFn = TypeVar("StepFn", bound=Callable[..., Awaitable[Any]])

_DEFAULT_STRATEGY = AtCheckpoint()


class Flow:
    """A named set of async steps; each step's parameters say what it needs.

    A parameter annotated `StepContext` (or named `ctx`) receives the step's context, a parameter
    named like an earlier step receives that step's output, and any other parameter is a flow
    input given to `run()`; a parameter annotated `Resource[T]` receives a live object given to the
    run as `resources=` (never stored). Steps may only depend on steps declared earlier, so a flow is a DAG by
    construction. The flow's result is the output of its last declared step unless `result=`
    names another.

    Args:
        name: The flow's name (used in reports, errors and checkpoints).
        version: Bumped when a change makes old checkpoints unusable.
        max_concurrency: At most this many steps run at once (None: no limit).
        result: Name of the step whose output is the flow's result (default: the last declared).
        retry: The retry policy of every step that does not give its own (`@flow.step(retry=...)`).
        timeout: Seconds each attempt of a step may run, for every step that does not give its own.

    Raises:
        FlowDefinitionError: A bad name, version, `max_concurrency`, `retry` or `timeout`.
    """

    def __init__(
        self,
        name: str,
        *,
        version: str = "1",
        max_concurrency: int | None = None,
        result: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise FlowDefinitionError(f"Flow(): name must be a non-empty str, got {name!r}")
        if not isinstance(version, str) or not version:
            raise FlowDefinitionError(f"flow {name!r}: version must be a non-empty str, got {version!r}")
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
        ):
            raise FlowDefinitionError(
                f"flow {name!r}: max_concurrency must be None or an int >= 1, got {max_concurrency!r}"
            )
        if result is not None and (not isinstance(result, str) or not result):
            raise FlowDefinitionError(f"flow {name!r}: result must be a step name, got {result!r}")
        self._retry = check_retry(f"flow {name!r}", retry)
        self._timeout = check_timeout_of(f"flow {name!r}", timeout)
        self._name = name
        self._version = version
        self._max_concurrency = max_concurrency
        self._result = result
        self._specs: dict[str, StepSpec] = {}
        # input name -> first step that uses it (to name it in errors)
        self._input_users: dict[str, str] = {}
        self._required_inputs: dict[str, None] = {}  # ordered set
        # resource name -> first step that takes it (an include step for its flow's resources)
        self._resource_users: dict[str, str] = {}
        self._plan: Plan | None = None

    # -- read-only views -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The flow's name."""
        return self._name

    @property
    def version(self) -> str:
        """The flow's version (checkpoints of another version are refused)."""
        return self._version

    @property
    def max_concurrency(self) -> int | None:
        """At most this many steps run at once; None means no limit."""
        return self._max_concurrency

    @property
    def steps(self) -> tuple[str, ...]:
        """Step names in declaration order."""
        return tuple(self._specs)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Names of the required inputs, in order of first use."""
        return tuple(self._required_inputs)

    @property
    def resources(self) -> tuple[str, ...]:
        """Names of the resources its steps take (its included flows' too), in order of first use:
        each must be given to every run as `resources={name: object}`."""
        return tuple(self._resource_users)

    @property
    def result(self) -> str:
        """Name of the step whose output is the flow's result.

        Raises:
            FlowDefinitionError: The flow has no steps, or `result=` names no step.
        """
        if not self._specs:
            raise FlowDefinitionError(f"flow {self._name!r} has no steps")
        if self._result is None:
            return next(reversed(self._specs))
        if self._result not in self._specs:
            raise FlowDefinitionError(
                f"flow {self._name!r}: result={self._result!r} is not a step (steps: {', '.join(self._specs)})"
            )
        return self._result

    def graph(self) -> dict[str, tuple[str, ...]]:
        """Each step's name mapped to the steps it waits for (data dependencies, then `after=`)."""
        return {name: spec.waits_for for name, spec in self._specs.items()}

    def __repr__(self) -> str:
        return f"<Flow {self._name!r} version={self._version!r} steps={list(self._specs)}>"

    # -- declaring steps ---------------------------------------------------------------------------

    @overload
    def step(self, fn: StepFn) -> StepFn: ...
    @overload
    def step(
        self,
        *,
        name: str | None = None,
        after: str | Iterable[str] = (),
        retry: Retry | None = ...,
        timeout: float | None = ...,
    ) -> Callable[[StepFn], StepFn]: ...
    def step(
        self,
        fn: Callable[..., Awaitable[Any]] | None = None,
        *,
        name: str | None = None,
        after: str | Iterable[str] = (),
        retry: Retry | None = INHERIT,
        timeout: float | None = INHERIT,
    ) -> Any:
        """Declare an `async def` function as a step of this flow; returns the function unchanged.

        Use as `@flow.step` or `@flow.step(name="...", after=("other",), retry=sp.Retry(attempts=3),
        timeout=30.0)`.

        Args:
            fn: The step function.
            name: The step's name (default: the function's name).
            after: Steps that must complete first although no output is passed.
            retry: How the step is tried again when it fails (`sp.Retry`). Not given: the flow's
                `retry=`; `None`: no retry, whatever the flow's default.
            timeout: Seconds each attempt may run before it is cancelled with `sp.StepTimeout`.
                Not given: the flow's `timeout=`; `None`: no timeout, whatever the flow's default.

        Raises:
            FlowDefinitionError: The declaration is invalid (the message names flow, step and problem).
        """
        if fn is not None:
            self._add(fn, name, after, retry, timeout)
            return fn

        def decorate(fn: StepFn) -> StepFn:
            self._add(fn, name, after, retry, timeout)
            return fn

        return decorate

    def _add(
        self,
        fn: Callable[..., Awaitable[Any]],
        name: str | None,
        after: str | Iterable[str],
        retry: Retry | None = INHERIT,
        timeout: float | None = INHERIT,
    ) -> None:
        if not callable(fn):
            raise FlowDefinitionError(
                f"flow {self._name!r}, step {name!r}: a step must be an `async def` function, got {type(fn).__name__}"
            )
        label = name if name is not None else getattr(fn, "__name__", None)
        if label is None:
            raise FlowDefinitionError(
                f"flow {self._name!r}: {fn!r} has no __name__ (a functools.partial?); give the step a name="
            )
        where = f"flow {self._name!r}, step {label!r}"
        if self._plan is not None:
            raise FlowDefinitionError(
                f"{where}: the flow has already run or been included; declare every step before that"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise FlowDefinitionError(f"flow {self._name!r}: step name must be a non-empty str, got {name!r}")
        if not inspect.iscoroutinefunction(fn):
            kind = "an async generator" if inspect.isasyncgenfunction(fn) else "not an `async def` function"
            raise FlowDefinitionError(f"{where}: {kind}; a step must be declared with `async def`")
        step_name: str = label
        check_new_name(where, step_name, self._specs, self._input_users, self._resource_users)
        after_names = check_after(where, after, self._specs)

        retry = self._retry if retry is INHERIT else check_retry(where, retry)
        timeout = self._timeout if timeout is INHERIT else check_timeout_of(where, timeout)

        context_param, dependencies, inputs, resources = step_parameters(where, fn, step_name, self._specs)
        check_kinds(where, (item.param for item in inputs), resources, self._input_users, self._resource_users)
        self._register(step_name, fn, None, context_param, dependencies, after_names, inputs, resources, retry, timeout)

    def include(self, other: Flow, name: str | None = None, *, after: str | Iterable[str] = ()) -> None:
        """Use the whole flow `other` as one step of this flow (a nested flow).

        The step is named after `other` unless `name=` is given, and its output is `other`'s
        result. `other`'s inputs resolve like step parameters: to an earlier step of this flow of
        that name, else to an input of this flow. Its steps run as part of this run: the same
        interrupts and strategy apply to them (with `PollNextN(n)`, they count among the `n`),
        its own `max_concurrency` holds among them, and the include step's report holds theirs
        (`StepReport.nested`). The include step ends `INTERRUPTED` when the included run stopped
        at a stopping point, `CANCELLED` when it was forced, `FAILED` (its error the included
        flow's `StepFailed`) when one of its steps failed.

        Including freezes `other`: steps can no longer be added to it.

        Args:
            other: The flow to include.
            name: The step's name (default: `other.name`).
            after: Steps of this flow that must complete first although no output is passed.

        Raises:
            FlowDefinitionError: `other` is not a flow, is this flow, has no steps, or the name
                or an input clashes as for `step()`.
        """
        if not isinstance(other, Flow):
            raise FlowDefinitionError(
                f"flow {self._name!r}: include() needs a Flow, got {type(other).__name__}; use @flow.step for functions"
            )
        step_name = other._name if name is None else name
        if name is not None and (not isinstance(name, str) or not name):
            raise FlowDefinitionError(f"flow {self._name!r}: step name must be a non-empty str, got {name!r}")
        where = f"flow {self._name!r}, step {step_name!r}"
        if other is self:
            raise FlowDefinitionError(f"{where}: a flow cannot include itself")
        if self._plan is not None:
            raise FlowDefinitionError(
                f"{where}: the flow has already run or been included; declare every step before that"
            )
        check_new_name(where, step_name, self._specs, self._input_users, self._resource_users)
        after_names = check_after(where, after, self._specs)
        dependencies: list[str] = []
        inputs: list[Input] = []
        for input_name in other._input_users:
            if input_name == step_name:
                raise FlowDefinitionError(
                    f"{where}: flow {other._name!r} has an input named {input_name!r} like the include step "
                    "itself; give the step another name="
                )
            if input_name in self._specs:
                dependencies.append(input_name)
            else:
                inputs.append(Input(input_name, input_name in other._required_inputs))
        # Its resources are the including run's: the same names, given to that run.
        resources = list(other._resource_users)
        for resource in resources:
            if resource == step_name or resource in self._specs:
                raise FlowDefinitionError(
                    f"{where}: flow {other._name!r} has a resource named {resource!r} like a step of this flow; "
                    "rename one"
                )
        check_kinds(where, (item.param for item in inputs), resources, self._input_users, self._resource_users)
        try:
            plan = other._freeze()  # last: a refused include leaves `other` open to more steps
        except FlowDefinitionError as exc:
            raise FlowDefinitionError(f"{where}: cannot include flow {other._name!r}: {exc}") from exc
        self._register(step_name, None, plan, None, dependencies, after_names, inputs, resources)

    def _register(
        self,
        step_name: str,
        fn: Callable[..., Awaitable[Any]] | None,
        include: Plan | None,
        context_param: str | None,
        dependencies: list[str],
        after: tuple[str, ...],
        inputs: list[Input],
        resources: list[str],
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> None:
        self._specs[step_name] = StepSpec(
            name=step_name,
            fn=fn,
            include=include,
            context_param=context_param,
            dependencies=tuple(dependencies),
            after=after,
            inputs=tuple(inputs),
            waits_for=tuple(dependencies) + tuple(a for a in after if a not in dependencies),
            # An include step's are its flow's steps' (given to them from the run, not by this step).
            resources=tuple(resources) if include is None else (),
            retry=retry,
            timeout=timeout,
            guarded=retry is not None or timeout is not None,
        )
        for resource in resources:
            self._resource_users.setdefault(resource, step_name)
        for item in inputs:
            self._input_users.setdefault(item.param, step_name)
            if item.required:
                self._required_inputs[item.param] = None

    # -- running -------------------------------------------------------------------------------------

    def _freeze(self) -> Plan:
        """Check what can only be checked once all steps exist, forbid further declarations, and
        return the plan every run of this flow shares."""
        if self._plan is None:
            self._plan = compile_plan(
                self._name,
                self._version,
                self._max_concurrency,
                self._specs,
                self.result,  # raises on an empty flow or a bad result=
                self._input_users,
                self.inputs,
                self.resources,
            )
        return self._plan

    def load_checkpoint(self, text: str | bytes) -> Checkpoint:
        """Read a checkpoint of this flow from JSON (`Checkpoint.to_json()`), typed again.

        Each stored output is validated back into its step's return annotation, and each input into
        its parameter's annotation, with pydantic (models, dataclasses, builtins, `None`, ...); a
        value without an annotation (or annotated `Any`) stays as JSON gave it. Like a run, it
        freezes the flow: declare every step first.

        Args:
            text: The JSON text.

        Returns:
            The checkpoint, ready for `run(resume=...)`.

        Raises:
            CheckpointError: The text is not a checkpoint, or a value does not validate (with
                pydantic's detail).
            CheckpointMismatch: A checkpoint of another flow or version, or of steps this flow
                does not have.
            FlowDefinitionError: The flow has no steps.
        """
        return typed(self._freeze(), CheckpointFile.parse(text))

    async def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        interrupts: MemoryObjectReceiveStream[InterruptSignal] | None = None,
        strategy: Strategy = _DEFAULT_STRATEGY,
        resume: Checkpoint | None = None,
        store: BasicStore | None = None,
        run_id: str | None = None,
        grace: float | None = None,
        deadline: float | None = None,
        on_event: EventCallback | None = None,
        resources: Mapping[str, Any] | None = None,
    ) -> Completed[Any] | Interrupted:
        """Run the flow until every step completed or an interrupt stopped it.

        Independent steps run concurrently (at most `max_concurrency` at once); a step starts as
        soon as the steps it waits for have completed. Before each step starts is a stopping point.

        Args:
            inputs: Values for the flow's inputs, by name, passed to the steps as given. Each must
                validate as the annotation of the step parameter that takes it and read back the
                same, as a resume reads it (with `store`, through the JSON the store keeps): see
                `FlowInputError`.
            interrupts: The receiver to watch for interrupt signals (from `interrupt_channel()`, or
                any anyio memory-object receive stream). A closed or ended stream means no more
                interrupts. The run does not close it.
            strategy: When an interrupt takes effect (default `AtCheckpoint()`).
            resume: A checkpoint of an earlier run of this flow (from `Interrupted.checkpoint`,
                `StepFailed.checkpoint` or `load_checkpoint()`): its completed steps do not run
                again, their outputs feed the steps that need them. The inputs may be omitted
                (the checkpoint's are used; given ones must be the same, as given: an optional
                input passed at its default counts as different from one not passed), and the
                run id defaults to the checkpoint's. With `store`, a stored run of that id that
                got further than the checkpoint is refused rather than overwritten.
            store: Persist the run (see `SQLiteStore`): its checkpoint is committed after every
                completed step, before any step that needs it starts, and when the run ends. With
                `run_id`, a run the store holds unfinished is resumed, and one it holds completed
                returns its stored `Completed` without running anything.
            run_id: The run's id (default: the checkpoint's, else a new random hex id). Every
                checkpoint and store carries it as UTF-8 text, so one with a lone surrogate (as
                `os.fsdecode()` makes) raises `FlowInputError`, like an input no checkpoint could
                carry, rather than a bare `UnicodeEncodeError` from the first save.
            grace: Seconds after the first interrupt after which the steps still in flight are
                cancelled, as if a forced signal had come (not under `IgnoreInterruptions`).
            deadline: Seconds after the run begins at which it interrupts itself with a signal of
                `source="deadline"` (taking effect as the strategy says, like any signal). Only
                this run sees that signal.
            on_event: Called with each event of the run (`FlowStartedEvent`, `StepStartedEvent`,
                ..., see `Event`), synchronously, in the task where the transition happens; it
                should return quickly. An exception it raises is logged and does not affect the
                run. The same events go to structlog (logger `"stoppoint"`) once the application
                has configured structlog. With neither, no event is built.
            resources: Live objects (a client, a pool) for the steps' parameters annotated
                `Resource[T]`, by parameter name: every one the flow's steps take (`flow.resources`),
                no other. They are passed to the steps as given, never serialised or stored, so a
                resume needs them again.

        Returns:
            `Completed` with the result when every step completed, else `Interrupted`.

        Raises:
            FlowDefinitionError: The flow has no steps or a bad `result=`.
            FlowInputError: Missing, unknown or invalid inputs, missing or unknown resources, or a
                `run_id` UTF-8 cannot encode (before any step starts or anything is stored).
            StepFailed: A step raised; `__cause__` is its exception.
            CheckpointMismatch: `resume` (or the stored run) is of another flow or version, or
                `inputs` differ from its inputs.
            CheckpointError: An output cannot be stored (it cannot be serialised, holds an int
                too long for JSON or is nested too deep to read back): its step fails, naming it;
                or a stored output cannot be read back.
            RunOwned: The store's run of that id is held by a live lease: it is running elsewhere (or in
                another task), before any step started here.
            LeaseLost: The run lost its lease while it ran (a write refused because another process
                claimed it, or no renewal succeeded for 0.8 of the lease): its steps were cancelled at
                once and nothing more was written.
            StoreError: The store cannot be read or written.
            TypeError: A bad `interrupts`, `strategy`, `resume`, `store` or `run_id`.
            ValueError: A bad `grace` or `deadline`.
        """
        options = RunOptions(
            inputs, interrupts, strategy, resume, store, run_id, grace, deadline, on_event, resources=resources
        )
        run = await open_run(self._freeze(), options)
        if isinstance(run, Completed):
            return run
        try:
            return await run.execute(interrupts)
        except anyio.get_cancelled_exc_class():
            run.tell_cancelled()
            raise

    async def start(
        self,
        task_group: TaskGroup,
        inputs: Mapping[str, Any] | None = None,
        *,
        interrupts: MemoryObjectReceiveStream[InterruptSignal] | None = None,
        strategy: Strategy = _DEFAULT_STRATEGY,
        resume: Checkpoint | None = None,
        store: BasicStore | None = None,
        run_id: str | None = None,
        grace: float | None = None,
        deadline: float | None = None,
        on_event: EventCallback | None = None,
        resources: Mapping[str, Any] | None = None,
    ) -> FlowRun:
        """Start a run in `task_group` and return a handle on it once it has begun.

        The options are those of `run()`, and are checked before anything starts (bad inputs
        raise here). When this returns, the run is listening for interrupts and its first steps
        may already be running (a short run may even have ended); `handle.interrupt()` stops it,
        `await handle.outcome()` gives its outcome (a `StepFailed` is raised there, never into
        `task_group`).

        Args:
            task_group: An entered anyio task group to run the flow in.
            inputs: Values for the flow's inputs, by name.
            interrupts: As for `run()`.
            strategy: As for `run()`.
            resume: As for `run()`.
            store: As for `run()` (a run the store holds completed gives a handle that is done).
            run_id: As for `run()`.
            grace: As for `run()`.
            deadline: As for `run()`.
            on_event: As for `run()`.
            resources: As for `run()`.

        Returns:
            The run's handle.

        Raises:
            FlowDefinitionError: The flow has no steps or a bad `result=`.
            FlowInputError: As for `run()`.
            CheckpointMismatch, CheckpointError, RunOwned, StoreError: As for `run()` (`LeaseLost` comes
                from `handle.outcome()`).
            TypeError: `task_group` is not an anyio task group, or a bad option as for `run()`.
            ValueError: A bad `grace` or `deadline`.
        """
        if not isinstance(task_group, TaskGroup):
            raise TypeError(
                f"flow {self._name!r}: start() needs an anyio task group (async with anyio.create_task_group() "
                f"as tg), got {type(task_group).__name__}"
            )
        options = RunOptions(
            inputs, interrupts, strategy, resume, store, run_id, grace, deadline, on_event, resources=resources
        )
        run = await open_run(self._freeze(), options)
        if isinstance(run, Completed):
            return FlowRun._finished(self._name, run)
        handle = FlowRun(run)
        await task_group.start(handle._drive, interrupts, name=f"stoppoint {self._name} run {run.run_id}")
        return handle

    async def submit(
        self,
        store: Store,
        inputs: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        queue: str = "default",
    ) -> str:
        """Queue a run of this flow in `store`, for a `Worker` serving this flow and `queue` to claim and run.

        Nothing runs here: the run is stored `QUEUED`, owned by nobody, with every step pending.
        Its inputs are checked as `run(store=...)` checks them, before anything is stored.
        Given the id of a run the store holds unfinished and nobody runs (interrupted, failed,
        orphaned, queued), that run is queued again (in `queue`), to go on from its checkpoint;
        inputs may then be omitted, and given ones must be its own. A run the store holds completed
        is left as it is (there is nothing to run).

        Args:
            store: A `Store` (leases and queues: `SQLiteStore`, `MemoryStore`); a store with only the
                `BasicStore` methods cannot queue runs.
            inputs: Values for the flow's inputs, by name, as for `run()`.
            run_id: The run's id (default: a new random hex id).
            queue: The queue's name; workers claim from the queues they serve (`Worker(queues=...)`).

        Returns:
            The run's id.

        Raises:
            FlowDefinitionError: The flow has no steps or a bad `result=`.
            FlowInputError: Missing, unknown or invalid inputs, or a `run_id` UTF-8 cannot encode;
                nothing is stored.
            CheckpointMismatch: The store holds that run at another version of the flow, or with
                other inputs.
            RunOwned: The store holds that run, and a live owner is running it.
            StoreError: A run of that id belongs to another flow, or the store cannot be used.
            TypeError: `store` is not a `Store`, or a bad `inputs`, `run_id` or `queue`.
        """
        return await submit(self._freeze(), store, inputs, run_id, queue)


def plan_of(flow: Flow) -> Plan:
    """The plan of `flow`, freezing it (what the runtime reads instead of the flow's attributes).

    Raises:
        FlowDefinitionError: The flow has no steps or a bad `result=`.
    """
    return flow._freeze()
