"""Launching a run: check `run()`'s options, look up a stored run, and set up its first attempt.

Everything here happens before any step starts, so a bad option raises before anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from pydantic import ValidationError

from ._attempt import Attempt
from ._checkpoint import Checkpoint, CheckpointFile, check_belongs, input_refusal, same_value, typed
from ._control import Control, _to_the_end
from ._errors import CheckpointMismatch, FlowInputError, StoreError
from ._events import EventCallback
from ._executor import Run
from ._lease import Claim, Lease, process_owner
from ._observers import Observers
from ._outcome import Completed, RunReport, StepReport, StepStatus
from ._persist import Leased, WholeSaves
from ._plan import Plan
from ._signal import InterruptSignal
from ._store import BasicStore, RunState, RunStatus, Store, StoredRun
from ._strategy import AtCheckpoint, Strategy

__all__ = ["RunOptions", "check_options", "check_resources", "new_state", "open_run", "prepare", "submit"]

_DEFAULT_STRATEGY = AtCheckpoint()  # strategies are frozen: one instance serves every run


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The options of one run, as `Flow.run` and `Flow.start` take them (see `Flow.run`), unchecked.

    The fields are in the order of `run()`'s parameters, so that both build it positionally.
    """

    inputs: Mapping[str, Any] | None = None
    interrupts: MemoryObjectReceiveStream[InterruptSignal] | None = None
    strategy: Strategy = _DEFAULT_STRATEGY
    resume: Checkpoint | None = None
    store: BasicStore | None = None
    run_id: str | None = None
    grace: float | None = None
    deadline: float | None = None
    on_event: EventCallback | None = None
    claim: Claim | None = None  # a worker's: the run is claimed already (the store is a Store)
    resources: Mapping[str, Any] | None = None  # live objects for the steps' Resource[T] parameters


async def open_run(plan: Plan, options: RunOptions) -> Attempt | Completed[Any]:
    """Check the options of one run of the flow of `plan` and set it up, not started (claimed, with a
    `Store`); or, when the store holds that run completed, its stored outcome."""
    flow, store, run_id, resume = plan.flow, options.store, options.run_id, options.resume
    # The run's id is the given one, else the checkpoint's, else a new hex id: checked here, before
    # a store is asked for it, and only here.
    _check_run_id(flow, run_id)
    if isinstance(resume, Checkpoint):
        _check_run_id(flow, resume.run_id)
    # Resources first: a run without them must not touch the store (nor claim, nor resume).
    options = replace(options, resources=check_resources(plan, options.resources))
    if store is not None and (isinstance(store, type) or not isinstance(store, BasicStore)):
        raise TypeError(
            f"flow {flow!r}: store must implement the Store protocol (such as SQLiteStore(path)), or at least "
            f"save, load, list_runs and delete; got {type(store).__name__}"
        )
    if store is not None and resume is not None and isinstance(resume, Checkpoint):
        # Resuming a checkpoint into a store: refuse to overwrite a stored run that got further.
        stored = await store.load(flow, run_id if isinstance(run_id, str) and run_id else resume.run_id)
        if stored is not None:
            ahead = set(_load(plan, stored.checkpoint_json).outputs) - set(resume.outputs)
            if ahead or stored.record.status is RunStatus.COMPLETED:
                raise CheckpointMismatch(
                    f"flow {flow!r}, run {stored.record.run_id!r}: the store holds this run "
                    f"{stored.record.status.value}"
                    + (f", with steps the checkpoint lacks ({', '.join(sorted(ahead))})" if ahead else "")
                    + "; run it with store= and run_id= alone to go on from there"
                )
    if isinstance(store, Store):
        return await _claimed(plan, store, options)
    if store is not None and resume is None and isinstance(run_id, str) and run_id:
        stored = await store.load(flow, run_id)
        if stored is not None:
            checkpoint = _load(plan, stored.checkpoint_json)
            # A flow that gained steps at the same version: the stored run is not complete for it.
            if stored.record.status is RunStatus.COMPLETED and set(checkpoint.outputs) == set(plan.specs):
                _check_resume_inputs(plan, options.inputs, checkpoint)
                try:
                    report = RunReport.model_validate_json(stored.report_json)
                except ValidationError as exc:
                    raise StoreError(
                        f"flow {flow!r}, run {run_id!r}: the stored report does not validate: {exc}"
                    ) from exc
                return Completed(checkpoint.outputs[plan.result], report)
            options = replace(options, resume=checkpoint)
    return prepare(plan, options)


async def _claimed(plan: Plan, store: Store, options: RunOptions) -> Attempt | Completed[Any]:
    """Claim the run (unless a worker did) and set it up under its lease; or its stored outcome."""
    flow, claim, resume = plan.flow, options.claim, options.resume
    check_options(plan, options)  # before the claim: a bad option must leave the store as it was
    if claim is None:
        run_id = options.run_id
        if run_id is None:
            run_id = resume.run_id if isinstance(resume, Checkpoint) else uuid.uuid4().hex
        elif not isinstance(run_id, str) or not run_id:
            raise TypeError(f"flow {flow!r}: run_id must be a non-empty str, got {run_id!r}")
        options = replace(options, run_id=run_id)
        if resume is None:
            # What can be checked of a stored run is checked before claiming it: a claim given up
            # leaves it stored running, for a worker to resume, which a mistyped input must not do.
            found = await store.load(flow, run_id)
            if found is not None:
                checkpoint = _load(plan, found.checkpoint_json)
                _check_resume_inputs(plan, options.inputs, checkpoint)
                if found.record.status is RunStatus.COMPLETED and set(checkpoint.outputs) == set(plan.specs):
                    return _stored_outcome(plan, options, found, checkpoint)
        # A new run is created by the claim itself, so its inputs must be complete and storable now;
        # a stored run needs none (it has its own), so their absence only counts if there is none.
        refusal: FlowInputError | None = None
        try:
            new = new_state(plan, run_id, resume.inputs if isinstance(resume, Checkpoint) else options.inputs)
        except FlowInputError as exc:
            new, refusal = None, exc
        claim = await _claim(store, flow, run_id, new=new)
        if claim is None:
            assert refusal is not None
            raise refusal
    lease, stored = claim.lease, claim.stored
    if lease is None:  # completed
        assert stored is not None
        checkpoint = _load(plan, stored.checkpoint_json)
        if set(checkpoint.outputs) == set(plan.specs):
            return _stored_outcome(plan, options, stored, checkpoint)
        # A flow that gained steps at the same version: the stored run is not complete for it.
        claim = await _claim(store, flow, stored.record.run_id, reopen=True)
        assert claim is not None
        assert claim.lease is not None
        lease, stored = claim.lease, claim.stored
    try:
        from_store = stored is not None and resume is None  # its step rows are in the store already
        if stored is not None and from_store:
            options = replace(options, resume=_load(plan, stored.checkpoint_json))
        return prepare(plan, options, lease, rows_stored=from_store)
    except BaseException:
        if options.claim is None:  # a worker's claim is the worker's to give up (it stores why it could not run)
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(StoreError):  # the lease expires anyway
                    await store.release(lease)
        raise


async def _claim(store: Store, flow: str, run_id: str, **how: Any) -> Claim | None:
    """`store.claim(...)` for this process, never cut off: a claim that took effect but whose answer a
    cancellation dropped would hold the run, running, until its lease expired. Shielded from anyio
    cancellation (the attempt then sees it, and ends at once, writing its end); on asyncio, a native
    `Task.cancel()` (which no anyio shield stops) lets the claim finish, then gives the run up marked
    interrupted (as a run cancelled before its first step is), and the cancellation goes on."""
    work = store.claim(flow, run_id, process_owner(), **how)
    with anyio.CancelScope(shield=True):
        if anyio.get_cancelled_exc_class() is not asyncio.CancelledError:
            claim = await work
        else:
            task = asyncio.ensure_future(work)
            try:
                claim = await asyncio.shield(task)
            except asyncio.CancelledError:
                await _to_the_end(_give_up(store, task))
                raise
    return claim


async def _give_up(store: Store, task: asyncio.Future[Claim | None]) -> None:
    """A claim whose caller was cancelled: once it is made, release it and mark the run interrupted."""
    await asyncio.wait([task])
    claim = None if task.cancelled() or task.exception() is not None else task.result()
    if claim is None or claim.lease is None:
        return
    lease = claim.lease
    with contextlib.suppress(StoreError):  # a lease left behind expires anyway
        await store.release(lease)
        await store.interrupt(
            lease.flow, lease.run_id, "the task running the flow was cancelled", force=True, source="cancel"
        )


def new_state(plan: Plan, run_id: str, inputs: Mapping[str, Any] | None) -> RunState:
    """The head of a new run of the flow of `plan`, as a claim or a submit creates it: its inputs,
    checked (a resume must read them back), and every step pending.

    Raises:
        FlowInputError: An input is missing, unknown, or one a resume could not read back.
        TypeError: `inputs` is not a mapping.
    """
    given = _check_inputs(plan, inputs, True)
    started = datetime.now(UTC)
    report = RunReport.model_construct(
        run_id=run_id,
        flow=plan.flow,
        started_at=started,
        finished_at=None,
        steps={name: StepReport.model_construct(name=name, status=StepStatus.PENDING) for name in plan.steps},
        interrupts=[],
    )
    head = Checkpoint(flow=plan.flow, flow_version=plan.version, run_id=run_id, inputs=given, outputs={})
    return RunState(
        flow_version=plan.version,
        status=RunStatus.RUNNING,
        started_at=started,
        finished_at=None,
        checkpoint_json=head.to_json(),
        report_json=report.model_dump_json(),
    )


async def submit(
    plan: Plan,
    store: object,
    inputs: Mapping[str, Any] | None,
    run_id: str | None,
    queue: str,
    labels: Mapping[str, str] | None = None,
) -> str:
    """Queue a run of the flow of `plan` in `store` for a worker (see `Flow.submit`); its run id.

    The inputs of a new run are checked as `run()` checks them, before anything is stored. A stored run
    of that id keeps its checkpoint (it must be one of this flow and version) and its inputs (given
    ones must be the same), as a resume does.
    """
    flow = plan.flow
    if isinstance(store, type) or not isinstance(store, Store):
        kind = "a BasicStore (whole saves, no leases)" if isinstance(store, BasicStore) else type(store).__name__
        raise TypeError(
            f"flow {flow!r}: submit() needs a Store, with leases and queues (such as SQLiteStore(path) or "
            f"MemoryStore()); got {kind}"
        )
    if not isinstance(queue, str) or not queue:
        raise TypeError(f"flow {flow!r}: queue must be a non-empty str, got {queue!r}")
    given_id = run_id is not None
    if run_id is None:
        run_id = uuid.uuid4().hex
    elif not isinstance(run_id, str) or not run_id:
        raise TypeError(f"flow {flow!r}: run_id must be a non-empty str, got {run_id!r}")
    _check_run_id(flow, run_id)
    refusal: FlowInputError | None = None
    try:
        new: RunState | None = new_state(plan, run_id, inputs)
    except FlowInputError as exc:
        new, refusal = None, exc
    if given_id:  # only a given id can be stored already
        stored = await store.load(flow, run_id)
        if stored is not None:
            checkpoint = _load(plan, stored.checkpoint_json)
            _check_resume_inputs(plan, inputs, checkpoint)
            if new is None:  # inputs omitted: the stored run's (the store keeps its own head anyway)
                new = new_state(plan, run_id, checkpoint.inputs)
    if new is None:
        assert refusal is not None
        raise refusal
    await store.submit(flow, run_id, replace(new, status=RunStatus.QUEUED), queue=queue, labels=labels)
    return run_id


def _stored_outcome(plan: Plan, options: RunOptions, stored: StoredRun, checkpoint: Checkpoint) -> Completed[Any]:
    """The outcome of a run the store holds completed: its stored result and report, nothing run."""
    _check_resume_inputs(plan, options.inputs, checkpoint)
    try:
        report = RunReport.model_validate_json(stored.report_json)
    except ValidationError as exc:
        raise StoreError(
            f"flow {plan.flow!r}, run {stored.record.run_id!r}: the stored report does not validate: {exc}"
        ) from exc
    return Completed(checkpoint.outputs[plan.result], report)


def _load(plan: Plan, text: str) -> Checkpoint:
    return typed(plan, CheckpointFile.parse(text))


def check_options(plan: Plan, options: RunOptions) -> tuple[float | None, float | None]:
    """Check the options that need no store (all but the inputs); (grace, deadline) as floats.

    Raises:
        TypeError: A bad strategy, interrupts, resume or on_event.
        CheckpointMismatch: `resume` is a checkpoint of another flow or version, or of other inputs.
        ValueError: A bad grace or deadline.
    """
    flow, strategy, interrupts, resume = plan.flow, options.strategy, options.interrupts, options.resume
    if not isinstance(strategy, Strategy) or type(strategy) is Strategy:
        raise TypeError(
            f"flow {flow!r}: strategy must be one of AtCheckpoint(), FinishCurrent(), PollNextN(n), "
            f"IgnoreInterruptions(); got {strategy!r}"
        )
    if interrupts is not None and not isinstance(interrupts, MemoryObjectReceiveStream):
        raise TypeError(
            f"flow {flow!r}: interrupts must be an anyio MemoryObjectReceiveStream[InterruptSignal], "
            f"got {type(interrupts).__name__}"
        )
    if resume is not None:
        if not isinstance(resume, Checkpoint):
            raise TypeError(f"flow {flow!r}: resume must be a Checkpoint, got {type(resume).__name__}")
        check_belongs(plan, resume)
        _check_resume_inputs(plan, options.inputs, resume)
    on_event = options.on_event
    if on_event is not None and not callable(on_event):
        raise TypeError(f"flow {flow!r}: on_event must be a callable taking an event, got {on_event!r}")
    return _seconds(flow, "grace", options.grace), _seconds(flow, "deadline", options.deadline)


def prepare(plan: Plan, options: RunOptions, lease: Lease | None = None, *, rows_stored: bool = False) -> Attempt:
    """Check the options of one run of the flow of `plan` and set it up, not started (`lease`: its
    claim, with a `Store`; `rows_stored`: it resumes what the store holds, whose step rows need no
    writing again)."""
    grace, deadline = check_options(plan, options)
    flow, inputs, resume, run_id, store = plan.flow, options.inputs, options.resume, options.run_id, options.store
    if resume is not None:
        if inputs is None:
            inputs = resume.inputs
        if run_id is None:
            run_id = resume.run_id
    if run_id is None:
        run_id = uuid.uuid4().hex
    elif not isinstance(run_id, str) or not run_id:
        raise TypeError(f"flow {flow!r}: run_id must be a non-empty str, got {run_id!r}")
    # (open_run checked the run id already: the given one, or the checkpoint's)
    control = Control(flow, run_id, options.strategy, grace, store, Observers(options.on_event))
    if options.resources:
        control.resources = dict(options.resources)
    inputs = _check_inputs(plan, inputs, store is not None)
    level = Run(plan, inputs, control, run_id, signals=control.signals, resume=resume)
    if lease is not None:
        assert isinstance(store, Store)
        control.persist = Leased(level, store, lease, rows_stored)
    elif store is not None:
        control.persist = WholeSaves(level, store)
    return Attempt(level, control, deadline)


def check_resources(plan: Plan, resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """The resources of one run of the flow of `plan`, checked: every one its steps take given, no other.

    Raises:
        FlowInputError: A resource is missing or unknown.
        TypeError: `resources` is not a mapping of names.
    """
    if resources is None:
        given: dict[str, Any] = {}
    elif isinstance(resources, Mapping):
        given = dict(resources)
    else:
        raise TypeError(
            f"flow {plan.flow!r}: resources must be a mapping of resource names to objects, "
            f"got {type(resources).__name__}"
        )
    missing = tuple(name for name in plan.resources if name not in given)
    unknown = tuple(sorted(str(name) for name in given if name not in plan.resources))
    if missing or unknown:
        raise FlowInputError(plan.flow, missing_resources=missing, unknown_resources=unknown)
    return given


def _check_resume_inputs(plan: Plan, inputs: Mapping[str, Any] | None, checkpoint: Checkpoint) -> None:
    if inputs is None:
        return
    if not isinstance(inputs, Mapping):
        return  # _check_inputs says what is wrong
    differing = sorted(
        str(name)
        for name in set(inputs) | set(checkpoint.inputs)
        if name not in inputs or name not in checkpoint.inputs or not same_value(inputs[name], checkpoint.inputs[name])
    )
    if differing:
        raise CheckpointMismatch(
            f"flow {plan.flow!r}, run {checkpoint.run_id!r}: the inputs differ from the checkpoint's "
            f"({', '.join(map(repr, differing))}); omit inputs to use the checkpoint's"
        )


def _seconds(flow: str, option: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:  # `not >=` catches NaN
        raise ValueError(f"flow {flow!r}: {option} must be None or a number of seconds >= 0, got {value!r}")
    return float(value)


def _check_run_id(flow: str, run_id: object) -> None:
    """A run id goes into every checkpoint and store: refuse one UTF-8 cannot encode (a lone surrogate)."""
    if isinstance(run_id, str) and not run_id.isascii():
        try:
            run_id.encode("utf-8")
        except UnicodeEncodeError:
            raise FlowInputError(flow, invalid_run_id=run_id) from None


def _invalid(plan: Plan, given: Mapping[str, Any], stored: bool) -> dict[str, str]:
    """The given inputs of the flow that a resume could not read back as given, each with why."""
    invalid = {}
    for name, value in given.items():
        if name in plan.all_inputs and (why := input_refusal(plan, name, value, stored)) is not None:
            invalid[name] = why
    return invalid


def _check_inputs(plan: Plan, inputs: Mapping[str, Any] | None, stored: bool) -> dict[str, Any]:
    """The inputs as a dict, checked: none missing or unknown, each one a resume can read back as
    given (`stored`: through the JSON a store keeps). Once per run, never per step."""
    if inputs is None:
        given: dict[str, Any] = {}
    elif isinstance(inputs, Mapping):
        given = dict(inputs)
    else:
        raise TypeError(
            f"flow {plan.flow!r}: inputs must be a mapping of input names to values, got {type(inputs).__name__}"
        )
    missing = tuple(name for name in plan.required_inputs if name not in given)
    unknown = tuple(sorted(str(name) for name in given if name not in plan.all_inputs))
    invalid = _invalid(plan, given, stored)
    if missing or unknown or invalid:
        raise FlowInputError(plan.flow, missing, unknown, invalid)
    return given
