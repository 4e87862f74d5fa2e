"""The scheduler: run one level of a flow's steps, each behind its stopping point.

One `_Run` holds one level's mutable state (the top-level flow, or a flow it includes); the `Plan`
is only read, and the `Control` (signals, strategy, escalation, saves) is shared by every level.
Steps of a chain cost no task: the task that finished a step goes on with the next ready one and
spawns tasks only for the others, so a linear flow runs in the caller's task and a fan-out spawns
one task per extra branch. How a run begins and ends at the top (listening, timers, its outcome
and events) is `_attempt.py`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from time import perf_counter as _perf_counter
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from ._checkpoint import Checkpoint
from ._context import YIELD_INTERVAL, StepContext, yield_to_others
from ._control import Control, cancellation_in_effect
from ._endings import StepEndings
from ._errors import StopRequested
from ._observers import step_ended, step_started
from ._outcome import StepStatus
from ._plan import Plan
from ._retry import run_guarded
from ._signal import InterruptSignal
from ._timeline import StepRecord, Timeline

__all__ = ["Run"]

_new_context = StepContext._for_step

# Reading an Enum member off its class costs ~90 ns on CPython 3.11 (a descriptor call); the
# per-step hot path reads these module globals instead.
_COMPLETED = StepStatus.COMPLETED


class Run(StepEndings):
    """One level of one run: its ready steps, outputs and records, and the loop that drives them.

    An include step runs the included flow as another `Run` sharing the same `Control`.
    """

    # Slots: with 30 attributes an instance dict reaches CPython 3.11's limit for shared keys, past
    # which every attribute read on the per-step path slows down (a chain step cost 10% more).
    __slots__ = (
        "active",
        "cancelled_exc",
        "completed",
        "control",
        "decided",
        "drained",
        "entries",
        "fit",
        "head",
        "includes",
        "inputs",
        "is_top",
        "limit",
        "name",
        "observers",
        "outputs",
        "partial",
        "path",
        "persist",
        "plan",
        "progress",
        "ready",
        "records",
        "run_id",
        "task_group",
        "timeline",
        "unstarted",
        "waiting",
    )

    def __init__(
        self,
        plan: Plan,
        inputs: dict[str, Any],
        control: Control,
        run_id: str,
        *,
        signals: list[InterruptSignal],
        resume: Checkpoint | None = None,
    ) -> None:
        self.plan = plan
        self.name = plan.flow
        self.entries = plan.entries
        self.limit = plan.limit
        self.inputs = inputs
        self.control = control
        self.observers = control.observers
        self.run_id = run_id
        self.timeline = Timeline(run_id, plan.flow, plan.steps, signals)
        self.records = self.timeline.records
        self.completed = self.timeline.completed
        self.persist = control.store is not None  # save after each completed step
        # Values a save found shallow enough to read back: not walked again (Checkpoint._too_deep).
        self.fit: dict[Any, Any] | None = {} if self.persist else None
        self.includes: dict[str, Run] = {}  # include steps running: their inner runs
        if resume is None:
            self.waiting = dict(plan.counted)  # steps waiting for one step alone need no count
            self.ready = list(plan.roots)
            self.outputs: dict[str, Any] = {}
            self.partial: dict[str, Checkpoint] = {}  # include steps left unfinished: their checkpoints
            self.progress: dict[str, Any] = {}  # unfinished steps: the state each last saved (ctx.save)
        else:
            # Completed steps do not run again: their outputs come from the checkpoint.
            self.outputs = dict(resume.outputs)
            self.partial = dict(resume.nested)
            self.progress = dict(resume.progress)
            self.timeline.resumed = frozenset(self.outputs)
            self.waiting, self.ready, self.entries = plan.resumed(self.outputs)
        # The ready queue is ready[head:]: a list and an index take a tenth of the memory of a
        # deque, which every run would hold for as long as it lasts.
        self.head = 0
        # After an interrupt (PollNextN): whether a handed-out step may start, decided in hand-out order.
        self.decided: dict[str, bool] = {}
        # Handed out together with others (in that order), not at their stopping point yet.
        self.unstarted: dict[str, None] = {}
        self.active = 0  # steps handed to a worker and not finished
        self.drained: asyncio.Future[None] | None = None  # done when `active` is back to 0, if drive() waits
        StepEndings.__init__(self)  # halted, failure, fatal: whether and why this level is abandoned
        self.cancelled_exc = anyio.get_cancelled_exc_class()
        self.task_group: TaskGroup | None = None
        self.is_top = False  # the top level: its end makes the run idle
        # The include steps leading to this level (stoppoint.testing names points by it).
        self.path: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------------------
    # Scheduling: which step starts when
    # ------------------------------------------------------------------------------------------------

    def may_start(self, name: str, counted: bool) -> bool:
        """The stopping point before step `name`: may it start now? (`counted`: a step of its own,
        which counts towards `PollNextN(n)`; an include step only opens the included flow, whose
        steps count.) `run_step` inlines the common case: no interrupt, nothing halting.

        With `PollNextN(n)` the n steps that still start must be the first handed out, whatever
        order the scheduler runs their tasks in (trio picks at random): the steps handed out
        after the interrupt were decided as they were handed out (`next_step`), and those handed
        out together with others before it are decided here, in the order they were handed out.
        """
        control, unstarted = self.control, self.unstarted
        if self.halted or control.shut:
            unstarted.pop(name, None)
            return False
        if not counted:
            unstarted.pop(name, None)
            return not control.closed
        if control.first is None:
            unstarted.pop(name, None)
            return not control.closed  # (closed without a signal: the run is being cancelled)
        decided = self.decided
        for other in unstarted:
            if other not in decided and self.plan.specs[other].fn is not None:
                decided[other] = control.count_start()
        unstarted.pop(name, None)
        if name in decided:
            return decided.pop(name)
        return control.count_start()

    def next_step(self) -> str | None:
        """Hand out ready steps: one for the calling worker, a new task for each other one."""
        control = self.control
        if self.halted or control.closed:
            return None
        take: str | None = None
        ready = self.ready
        head = self.head
        while head < len(ready) and self.active < self.limit:
            name = ready[head]
            if control.probe is not None and self.entries[name][0].fn is not None:
                # stoppoint.testing: the stopping point before the step, told as the step is handed
                # out, in ready order, so that an interrupt there decides the same on every backend.
                control.probe.reached(self.path, self.name, name, 0)
            if control.first is not None and self.entries[name][0].fn is not None:
                # After the interrupt, the steps that may still start (PollNextN) are chosen as
                # they are handed out, in the order they became ready.
                if not control.count_start():
                    break
                self.decided[name] = True
            head += 1
            self.active += 1
            if take is None:
                take = name
            else:
                if not self.unstarted or take not in self.unstarted:
                    self.unstarted[take] = None  # handed out first: decided first, see may_start()
                self.unstarted[name] = None
                assert self.task_group is not None
                self.task_group.start_soon(self.work, name, name=f"stoppoint {self.name}.{name}")
        if head == len(ready):
            ready.clear()
            head = 0
        self.head = head
        return take

    async def work(self, name: str | None) -> None:
        """Run `name`, then whatever becomes ready, until nothing is left for this worker."""
        control = self.control
        if control.task_group is not None and control.task_group.cancel_scope.cancel_called:
            # A new task in a run whose task group was cancelled (forced, or on a native cancel of
            # the caller's task): anyio cancels it only at its first await; no step may start.
            control.close()
        last_yield = time.perf_counter()
        while name is not None:
            await self.run_step(name)
            # Back-to-back steps in one task would never let other tasks run; yield now and then,
            # between two steps (holding none, so the next is taken, and starts, after the yield).
            # Not when no step is ready: this worker is about to end, and the last one to end must
            # see the run idle before any timer (grace, deadline) gets a turn to act on it.
            now = time.perf_counter()
            if now - last_yield >= YIELD_INTERVAL and self.head < len(self.ready):
                last_yield = now
                await yield_to_others()
            name = self.next_step()
        if not self.active:
            if self.is_top:
                control.idle()
            if self.drained is not None and not self.drained.done():
                self.drained.set_result(None)

    # ------------------------------------------------------------------------------------------------
    # Running one step: the per-step hot path
    # ------------------------------------------------------------------------------------------------

    async def run_step(self, name: str) -> None:
        try:
            spec, dependants = self.entries[name]
            control = self.control
            if control.polled is not None:
                control.poll()
            # The stopping point before the step: may_start()'s common case inline.
            if control.first is None and not self.halted and not control.closed:
                if self.unstarted:
                    self.unstarted.pop(name, None)
            elif not self.may_start(name, spec.fn is not None):
                return
            # The step's keyword arguments: outputs it depends on, inputs it takes (an include
            # step's are the included flow's inputs), resources it takes. The only place they are built.
            kwargs: dict[str, Any] = {}
            outputs = self.outputs
            for dependency in spec.dependencies:
                kwargs[dependency] = outputs[dependency]
            inputs = self.inputs
            for item in spec.inputs:
                if item.param in inputs:
                    kwargs[item.param] = inputs[item.param]
            if spec.resources:  # (one attribute read for the steps that take none)
                resources = control.resources
                for resource in spec.resources:
                    kwargs[resource] = resources[resource]
            fn = spec.fn
            if fn is None:
                assert spec.include is not None
                if not await self.run_include(name, spec.include, kwargs):
                    return
            elif spec.guarded:  # a retry policy or a timeout: its own path, off this one
                if not await run_guarded(self, name, spec, kwargs):
                    return
            else:
                ctx: StepContext | None = None
                running = control.running
                started = _perf_counter()
                if spec.context_param is not None:
                    ctx = _new_context(self.run_id, self.name, name, started)
                    if control.epoch:
                        ctx._epoch = control.epoch
                    ctx._level = self
                    if control.probe is not None:
                        ctx._probe = control.probe.counter(self.path, self.name, name)
                    kwargs[spec.context_param] = ctx
                    running.add(ctx)
                self.records[name] = record = StepRecord(started, ctx)
                tell = self.observers.tell
                if tell is not None:
                    tell(step_started(self.timeline, name, started))
                now = started
                try:
                    value = await fn(**kwargs)
                except StopRequested as stop:
                    self.stopped(name, record, ctx, stop, stop)
                except self.cancelled_exc as exc:
                    if self.cancelled_exc is asyncio.CancelledError and not cancellation_in_effect():
                        # asyncio: the step raised CancelledError (say, from a cancelled future)
                        # while nobody cancelled it. Raising it on would cancel the caller: it is
                        # a failure.
                        self.failed(name, record, exc)
                        return
                    record.finish(StepStatus.CANCELLED)
                    raise
                except BaseExceptionGroup as group:
                    self.ended_in_group(name, record, ctx, group)
                except Exception as exc:
                    self.failed(name, record, exc)
                except BaseException as exc:
                    self.fatal_error(record, exc)
                else:
                    now = _perf_counter()
                    record.status = _COMPLETED
                    record.finished = now
                    outputs[name] = value
                    if self.progress:
                        self.progress.pop(name, None)  # its saved state is dropped: its output replaces it
                    if self.persist:
                        # Durability: the output is committed before any step that needs it starts.
                        record.duration = now - started  # (the saved report reads the record)
                        await self.commit_step(name)
                    if ctx is not None and ctx._shielded and cancellation_in_effect():
                        # A shield let the step finish while the run was being cancelled (say,
                        # its task group was): its output is kept, but no further step may start.
                        # Only after a shield, because the check costs more than a whole step.
                        control.close()
                finally:
                    if ctx is not None:
                        running.discard(ctx)
                        if ctx._open and record.status is not _COMPLETED:
                            await self.close_iterations(name, record, ctx)
                        # A record may outlive its step (the report reads it); its context need not.
                        record.progress = ctx._progress
                        record.ctx = None
                    if record.status is _COMPLETED and record.progress is None:
                        del self.records[name]
                        self.completed.append((name, started, now))  # see Timeline.completed
                    else:
                        if record.status is _COMPLETED:
                            record.duration = now - started
                        record.told = True
                    tell = self.observers.tell  # (someone may have begun listening meanwhile)
                    if tell is not None:
                        if ctx is not None:
                            ctx._tell_progress(self, True)  # a progress event that waited: the last one
                        tell(step_ended(self.timeline, name, record, now))
                if record.status is not _COMPLETED:
                    return
            # Completed: ready the steps that waited for it (the only place they are released).
            for dependant, alone in dependants:
                if alone:
                    self.ready.append(dependant)
                else:
                    waiting = self.waiting
                    left = waiting[dependant] - 1
                    waiting[dependant] = left
                    if not left:
                        self.ready.append(dependant)
        finally:
            self.active -= 1

    async def save_progress(self, name: str) -> None:
        """Commit the state step `name` just saved (`StepContext.save()`; it is in `self.progress`)."""
        persist = self.control.persist
        if persist is not None:
            await self.control.save(partial(persist.step, self, name))

    async def commit_step(self, name: str) -> None:
        """Save after step `name` completed. The save is shielded, so a cancellation of the run may
        have come meanwhile unseen: then no further step may start."""
        persist = self.control.persist
        assert persist is not None
        await self.control.save(partial(persist.step, self, name))
        if cancellation_in_effect():
            self.control.close()

    async def run_include(self, name: str, plan: Plan, inputs: dict[str, Any]) -> bool:
        """Run an included flow as one step, its steps stopping points of this run under the same
        signals and strategy; True if it completed (its output saved)."""
        control = self.control
        inner = Run(plan, inputs, control, self.run_id, signals=[], resume=self.partial.pop(name, None))
        inner.path = (*self.path, name)
        self.records[name] = record = StepRecord(_perf_counter())
        record.nested = inner.timeline
        self.includes[name] = inner
        tell = self.observers.tell
        if tell is not None:
            tell(step_started(self.timeline, name, record.started))
        try:
            done, value = await inner.run_nested()
        except self.cancelled_exc:
            self.cancelled_include(name, record, inner)
            raise
        except BaseExceptionGroup as group:
            if group.split(self.cancelled_exc)[1] is not None:
                self.failed(name, record, group)
            else:
                self.cancelled_include(name, record, inner)
                raise
        except Exception as exc:  # StepFailed of the included flow
            self.failed(name, record, exc)
        except BaseException as exc:
            self.fatal_error(record, exc)
        else:
            stopped_at = inner.timeline.stopped_at()
            if done:
                record.finish(StepStatus.COMPLETED)
                self.outputs[name] = value
                del self.includes[name]
                if self.persist:
                    await self.commit_step(name)
            elif control.forced and stopped_at is None:
                record.finish(StepStatus.CANCELLED)  # forced: it did not stop at a stopping point
            else:
                record.finish(StepStatus.INTERRUPTED)
                record.stopped_at = stopped_at
        finally:
            self.includes.pop(name, None)
            if record.status is not StepStatus.COMPLETED and (inner.outputs or inner.partial or inner.progress):
                self.partial[name] = inner.checkpoint()
            record.told = True
            tell = self.observers.tell
            if tell is not None:
                tell(step_ended(self.timeline, name, record))
        return record.status is StepStatus.COMPLETED

    # ------------------------------------------------------------------------------------------------
    # A level from start to end
    # ------------------------------------------------------------------------------------------------

    async def drive(self, begin: Callable[[TaskGroup], object] | None = None) -> None:
        """Run this level's steps in a task group of its own (`begin`: called once it is up)."""
        try:
            async with anyio.create_task_group() as task_group:
                self.task_group = task_group
                if begin is not None:
                    begin(task_group)
                try:
                    await self.work(self.next_step())
                    if self.active and not self.is_top and self.cancelled_exc is asyncio.CancelledError:
                        # An included flow waits for its other workers here, not in its task group's
                        # exit: a native Task.cancel() of this task would cancel this level alone
                        # there, unseen by the levels above until it is raised out to them.
                        self.drained = asyncio.get_running_loop().create_future()
                        await self.drained
                except self.cancelled_exc:
                    if not self.halted and cancellation_in_effect():
                        # The run is being cancelled, and a native cancel reaches the levels above
                        # this one only once raised out of it (after its steps ended): no step may
                        # start at any level meanwhile.
                        self.control.close()
                    raise
        finally:
            self.timeline.ended = time.perf_counter()

    async def run_nested(self) -> tuple[bool, Any]:
        """Run as an included flow: (True, result) when every step completed, else (False, None).

        Raises:
            StepFailed: One of its steps failed.
        """
        await self.drive()
        if self.fatal is not None:
            raise self.fatal
        await self.let_cancellation_through()
        if self.failure is not None:
            raise self.step_failed()
        if self.finished:
            return True, self.outputs[self.plan.result]
        return False, None

    def checkpoint(self) -> Checkpoint:
        checkpoint = Checkpoint(
            flow=self.name,
            flow_version=self.plan.version,
            run_id=self.run_id,
            inputs=dict(self.inputs),
            outputs=dict(self.outputs),
            nested={**self.partial, **{name: inner.checkpoint() for name, inner in self.includes.items()}},
            progress=dict(self.progress),
        )
        checkpoint._fit = self.fit
        return checkpoint
