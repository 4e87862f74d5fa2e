"""Running flows: scheduling, stopping between and inside steps, failures (API.md §1, §3-§5).

Every interruption here is deterministic: a step sends the interrupt itself, or another task
sends it when an anyio Event says the step reached a given stopping point.
"""

from __future__ import annotations

import inspect
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import stoppoint as sp

from .conftest import Channel, line_after

pytestmark = pytest.mark.anyio


def make_chain(ran: list[str], stop_after: str | None, interrupter: sp.Interrupter | None) -> sp.Flow:
    """a -> b -> c -> d; the step named `stop_after` interrupts the run and returns."""
    flow = sp.Flow("chain")

    def body(name: str) -> Any:
        async def step(ctx: sp.StepContext, **_: Any) -> str:
            ran.append(name)
            if name == stop_after:
                assert interrupter is not None
                assert interrupter.interrupt(f"after {name}", source="test")
            return name.upper()

        return step

    for previous, name in [(None, "a"), ("a", "b"), ("b", "c"), ("c", "d")]:
        fn = body(name)
        # Each step takes the previous step's output: give it a real signature for the resolver.
        params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY)]
        if previous:
            params.append(inspect.Parameter(previous, inspect.Parameter.KEYWORD_ONLY))
        fn.__signature__ = inspect.Signature(params)
        flow.step(name=name)(fn)
    return flow


async def test_completed_chain_passes_outputs_and_reports() -> None:
    ran: list[str] = []
    flow = make_chain(ran, None, None)
    outcome = await flow.run()
    match outcome:
        case sp.Completed(value, report):
            assert value == "D"
            assert report.completed == ["a", "b", "c", "d"]
            assert report.stopped == report.not_started == report.failed == report.cancelled == []
            assert report.interrupts == []
            assert report.flow == "chain"
            assert report.started_at <= report.finished_at  # type: ignore[operator]
            for step in report.steps.values():
                assert step.status is sp.StepStatus.COMPLETED
                assert step.started_at is not None
                assert step.finished_at is not None
                assert step.duration_s is not None
                assert step.duration_s >= 0
        case _:
            pytest.fail(f"expected Completed, got {outcome!r}")
    assert ran == ["a", "b", "c", "d"]


async def test_interrupt_before_the_first_step(channel: Channel) -> None:
    ran: list[str] = []
    interrupter, receiver = channel
    assert interrupter.interrupt("too early", source="test")
    outcome = await make_chain(ran, None, interrupter).run(interrupts=receiver, run_id="r1")
    assert isinstance(outcome, sp.Interrupted)
    assert ran == []
    assert outcome.signal.reason == "too early"
    assert outcome.forced is False
    assert outcome.report.not_started == ["a", "b", "c", "d"]
    assert outcome.report.run_id == outcome.checkpoint.run_id == "r1"
    assert outcome.checkpoint.outputs == {}
    assert [s.reason for s in outcome.report.interrupts] == ["too early"]


async def test_signal_on_a_raw_stream_before_run_starts() -> None:
    send, receive = anyio.create_memory_object_stream[sp.InterruptSignal](4)
    with send, receive:
        send.send_nowait(sp.InterruptSignal(reason="raw", source="test"))
        ran: list[str] = []
        outcome = await make_chain(ran, None, None).run(interrupts=receive)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.reason == "raw"
    assert ran == []


@pytest.mark.parametrize("stop_after", ["a", "b", "c"])
@pytest.mark.parametrize("strategy", [sp.AtCheckpoint(), sp.FinishCurrent()])
async def test_interrupt_between_every_pair_of_steps(stop_after: str, strategy: sp.Strategy, channel: Channel) -> None:
    ran: list[str] = []
    interrupter, receiver = channel
    outcome = await make_chain(ran, stop_after, interrupter).run(interrupts=receiver, strategy=strategy)
    assert isinstance(outcome, sp.Interrupted)
    done = ["a", "b", "c", "d"][: "abc".index(stop_after) + 1]
    assert ran == done  # a step that interrupts and returns is followed by no other step
    assert outcome.report.completed == done
    assert outcome.report.not_started == ["a", "b", "c", "d"][len(done) :]
    assert outcome.report.stopped == []
    assert outcome.signal.reason == f"after {stop_after}"
    assert outcome.checkpoint.outputs == {name: name.upper() for name in done}


async def test_interrupt_after_the_last_step_changes_nothing(channel: Channel) -> None:
    ran: list[str] = []
    interrupter, receiver = channel
    outcome = await make_chain(ran, "d", interrupter).run(interrupts=receiver)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "D"
    assert [s.reason for s in outcome.report.interrupts] == ["after d"]


async def test_raw_stream_signal_is_seen_within_a_loop_turn() -> None:
    """A raw anyio stream is read by the run's own receiver: one extra stopping point is allowed."""
    send, receive = anyio.create_memory_object_stream[sp.InterruptSignal](4)
    flow = sp.Flow("raw")
    ran: list[str] = []

    @flow.step
    async def a() -> None:
        ran.append("a")
        send.send_nowait(sp.InterruptSignal(reason="raw"))

    @flow.step(after="a")
    async def b(ctx: sp.StepContext) -> None:
        ran.append("b")
        await anyio.lowlevel.checkpoint()  # one loop turn: the run's receiver takes the signal
        await anyio.lowlevel.checkpoint()
        await ctx.checkpoint()
        ran.append("b done")

    @flow.step(after="b")
    async def c() -> None:
        ran.append("c")

    with send, receive:
        outcome = await flow.run(interrupts=receive)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.reason == "raw"
    assert ran in (["a"], ["a", "b"])
    assert outcome.report.not_started[-1] == "c"


@pytest.mark.parametrize("k", [1, 2, 5])
async def test_step_stops_at_its_kth_checkpoint(k: int, channel: Channel) -> None:
    """Another task interrupts when the step has passed k checkpoints; the next one stops it."""
    interrupter, receiver = channel
    reached, resume = anyio.Event(), anyio.Event()
    passed: list[int] = []
    stop_line: list[int] = []
    flow = sp.Flow("long")

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        for i in range(1, 11):
            stop_line[:] = [line_after()]
            await ctx.checkpoint()
            passed.append(i)
            if i == k:
                reached.set()
                await resume.wait()
        return len(passed)

    @flow.step
    async def after(work: int) -> int:
        return work

    async def interrupt_when_reached() -> None:
        await reached.wait()
        assert interrupter.interrupt("enough", source="test")
        resume.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupt_when_reached)
        outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert passed == list(range(1, k + 1))
    report = outcome.report
    assert report.stopped == ["work"]
    assert report.not_started == ["after"]
    assert report.steps["work"].stopped_at == f"test_executor.py:{stop_line[0]}"
    assert outcome.checkpoint.outputs == {}


async def test_finish_current_lets_the_step_finish(channel: Channel) -> None:
    interrupter, receiver = channel
    seen: list[bool] = []
    flow = sp.Flow("long")

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        for i in range(5):
            if i == 2:
                interrupter.interrupt()
            await ctx.checkpoint()
            seen.append(ctx.stop_requested)
        return 5

    @flow.step
    async def after(work: int) -> int:
        return work

    outcome = await flow.run(interrupts=receiver, strategy=sp.FinishCurrent())
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.completed == ["work"]
    assert outcome.report.not_started == ["after"]
    assert seen == [False] * 5  # the strategy lets the step finish, so nothing is "requested"
    assert outcome.checkpoint.outputs == {"work": 5}


async def test_stop_requested_flips_under_at_checkpoint(channel: Channel) -> None:
    interrupter, receiver = channel
    flags: list[bool] = []
    flow = sp.Flow("cpu")

    @flow.step
    async def crunch(ctx: sp.StepContext) -> int:
        flags.append(ctx.stop_requested)
        interrupter.interrupt()
        flags.append(ctx.stop_requested)
        return 1  # winds down by itself: completes

    @flow.step
    async def after(crunch: int) -> int:
        return crunch

    outcome = await flow.run(interrupts=receiver)
    assert flags == [False, True]
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.completed == ["crunch"]
    assert outcome.report.not_started == ["after"]


@pytest.mark.parametrize("strategy", [sp.AtCheckpoint(), sp.FinishCurrent()])
async def test_diamond_with_one_branch_mid_step(strategy: sp.Strategy, channel: Channel) -> None:
    """top -> (left, right) -> bottom; right interrupts while left waits at its 2nd checkpoint."""
    interrupter, receiver = channel
    left_at_2, go = anyio.Event(), anyio.Event()
    left_passed: list[int] = []
    flow = sp.Flow("diamond")

    @flow.step
    async def top() -> int:
        return 1

    @flow.step
    async def left(ctx: sp.StepContext, top: int) -> int:
        for i in range(1, 5):
            await ctx.checkpoint()
            left_passed.append(i)
            if i == 2:
                left_at_2.set()
                await go.wait()
        return top + 10

    @flow.step
    async def right(top: int) -> int:
        await left_at_2.wait()
        interrupter.interrupt("right saw enough", source="test")
        go.set()
        return top + 20

    @flow.step
    async def bottom(left: int, right: int) -> int:
        return left + right

    outcome = await flow.run(interrupts=receiver, strategy=strategy)
    assert isinstance(outcome, sp.Interrupted)
    report = outcome.report
    assert report.not_started == ["bottom"]
    if strategy == sp.AtCheckpoint():
        assert left_passed == [1, 2]
        assert report.completed == ["top", "right"]
        assert report.stopped == ["left"]
        assert outcome.checkpoint.outputs == {"top": 1, "right": 21}
    else:
        assert left_passed == [1, 2, 3, 4]
        assert report.completed == ["top", "left", "right"]
        assert report.stopped == []
        assert outcome.checkpoint.outputs == {"top": 1, "left": 11, "right": 21}


async def test_closed_interrupt_stream_means_no_interrupts(channel: Channel) -> None:
    interrupter, receiver = channel
    interrupter.close()
    ran: list[str] = []
    outcome = await make_chain(ran, None, None).run(interrupts=receiver)
    assert isinstance(outcome, sp.Completed)
    assert ran == ["a", "b", "c", "d"]


async def test_closed_receiver_means_no_interrupts() -> None:
    send, receive = anyio.create_memory_object_stream[sp.InterruptSignal](4)
    receive.close()
    ran: list[str] = []
    outcome = await make_chain(ran, None, None).run(interrupts=receive)
    assert isinstance(outcome, sp.Completed)
    send.close()


async def test_stream_closed_during_the_run() -> None:
    send, receive = anyio.create_memory_object_stream[sp.InterruptSignal](4)
    flow = sp.Flow("f")

    @flow.step
    async def a() -> int:
        send.close()
        await anyio.lowlevel.checkpoint()  # the run's receiver sees the end of the stream
        return 1

    @flow.step
    async def b(a: int) -> int:
        return a + 1

    with receive:
        outcome = await flow.run(interrupts=receive)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 2


async def test_except_exception_cannot_swallow_the_stop(channel: Channel) -> None:
    interrupter, receiver = channel
    swallowed: list[BaseException] = []
    flow = sp.Flow("stubborn")

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        interrupter.interrupt()
        for _ in range(3):
            try:
                await ctx.checkpoint()
            except Exception as exc:  # what careless user code does
                swallowed.append(exc)

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["work"]
    assert swallowed == []


async def test_finally_blocks_run_when_a_step_stops(channel: Channel) -> None:
    interrupter, receiver = channel
    cleaned: list[str] = []
    flow = sp.Flow("tidy")

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        try:
            interrupter.interrupt()
            await ctx.checkpoint()
            cleaned.append("not reached")
        finally:
            cleaned.append("finally")

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert cleaned == ["finally"]


async def test_stop_inside_a_task_group_the_step_opened(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("nested")
    cancelled_sibling: list[str] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        async def sibling() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled_sibling.append("sibling ended")

        async def child() -> None:
            await anyio.lowlevel.checkpoint()
            interrupter.interrupt()
            while True:
                await ctx.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sibling)
            tg.start_soon(child)

    @flow.step
    async def after(work: None) -> None: ...

    outcome = await flow.run(interrupts=receiver)  # no ExceptionGroup escapes
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["work"]
    assert outcome.report.not_started == ["after"]
    assert outcome.report.steps["work"].stopped_at is not None
    assert outcome.report.steps["work"].stopped_at.startswith("test_executor.py:")
    assert cancelled_sibling == ["sibling ended"]


async def test_tight_checkpoint_loop_lets_another_task_interrupt(channel: Channel) -> None:
    """The loop never awaits anything but checkpoints; they must yield so the interrupter runs."""
    interrupter, receiver = channel
    flow = sp.Flow("spin")
    spins = 0

    @flow.step
    async def spin(ctx: sp.StepContext) -> None:
        nonlocal spins
        while True:
            spins += 1
            await ctx.checkpoint()

    async def interrupt_soon() -> None:
        await anyio.lowlevel.checkpoint()
        interrupter.interrupt("from another task")

    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupt_soon)
        outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.stopped == ["spin"]
    assert spins > 1


async def test_back_to_back_steps_yield_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps that never await would starve other tasks; the run yields between them when due.

    With the interval at 0 a yield is due before every step, so the other task must have run
    within the first few steps (trio may order a batch either way, hence "few", not "one").
    Without the yield it would never run before the flow ends.
    """
    monkeypatch.setattr("stoppoint._executor.YIELD_INTERVAL", 0.0)
    flow = sp.Flow("busy")
    other_ran = anyio.Event()
    seen: list[bool] = []

    async def body() -> None:
        seen.append(other_ran.is_set())

    previous: tuple[str, ...] = ()
    for i in range(10):
        flow.step(name=f"s{i}", after=previous)(body)
        previous = (f"s{i}",)

    async def other() -> None:
        other_ran.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert True in seen[:3]


async def test_checkpoint_yields_when_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop of bare checkpoints lets another task run; with the interval at 0, within a few."""
    monkeypatch.setattr("stoppoint._context.YIELD_INTERVAL", 0.0)
    flow = sp.Flow("busy")
    other_ran = anyio.Event()

    @flow.step
    async def spin(ctx: sp.StepContext) -> int:
        spins = 0
        while not other_ran.is_set():
            spins += 1
            await ctx.checkpoint()
        return spins

    async def other() -> None:
        other_ran.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value <= 3


async def test_signal_arriving_during_a_checkpoints_yield_stops_there(
    monkeypatch: pytest.MonkeyPatch, channel: Channel
) -> None:
    interrupter, receiver = channel
    monkeypatch.setattr("stoppoint._context.YIELD_INTERVAL", 0.0)

    async def yield_while_interrupted() -> None:
        interrupter.interrupt("arrived during the yield")  # what another task would do meanwhile
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr("stoppoint._context._loop_yield", yield_while_interrupted)
    flow = sp.Flow("yield")
    passed: list[str] = []

    @flow.step
    async def once(ctx: sp.StepContext) -> None:
        await ctx.checkpoint()
        passed.append("past the checkpoint")

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert passed == []
    assert outcome.report.steps["once"].stopped_at is not None
    assert outcome.report.steps["once"].stopped_at.startswith("test_executor.py:")


async def test_a_busy_step_yields_long_enough_for_a_plain_streams_watcher(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """A signal sent over a plain anyio stream by a task that ran during a step's yield needs a
    second task to run (the run's watcher) before the step resumes: the yield gives it that turn,
    so the step stops at that stopping point, not one yield interval later."""
    monkeypatch.setattr("stoppoint._context.YIELD_INTERVAL", 0.0)  # every stopping point yields
    send, receive = anyio.create_memory_object_stream[sp.InterruptSignal](1)
    reached = anyio.Event()
    flow = sp.Flow("busy")
    passed: list[int] = []

    @flow.step
    async def busy(ctx: sp.StepContext) -> None:
        for i in range(100):
            if i == 5:
                reached.set()  # wakes the sender: it runs during this stopping point's yield
            await ctx.checkpoint()
            passed.append(i)

    async def sender() -> None:
        await reached.wait()
        send.send_nowait(sp.InterruptSignal(reason="from another task", source="test"))

    with send, receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            outcome = await flow.run(interrupts=receive)
    assert isinstance(outcome, sp.Interrupted)
    if anyio_backend == "asyncio":
        assert passed == [0, 1, 2, 3, 4]  # FIFO scheduling: stopped at the yield the sender ran in
    else:
        # trio runs each batch of ready tasks in a random order: the step may resume once before
        # the watcher, but never twice (with a single loop turn per yield it could).
        assert passed in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5])


async def test_one_interrupter_serves_several_runs_on_clones(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("shared")
    started = [anyio.Event(), anyio.Event()]

    @flow.step
    async def wait(ctx: sp.StepContext, index: int) -> None:
        started[index].set()
        while True:
            await ctx.checkpoint()
            await anyio.lowlevel.checkpoint()

    outcomes: list[sp.Completed[Any] | sp.Interrupted] = []

    async def run(index: int, rx: Any) -> None:
        with rx:
            outcomes.append(await flow.run({"index": index}, interrupts=rx))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, 0, receiver.clone())
        tg.start_soon(run, 1, receiver.clone())
        for event in started:
            await event.wait()
        assert interrupter.interrupt("everybody stop", source="test")
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert isinstance(outcome, sp.Interrupted)
        assert outcome.signal.reason == "everybody stop"
        assert outcome.report.stopped == ["wait"]


async def test_every_signal_is_recorded_once(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("many")

    @flow.step
    async def work(ctx: sp.StepContext) -> None:
        interrupter.interrupt("one")
        interrupter.interrupt("two")
        await ctx.checkpoint()

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.signal.reason == "one"
    assert [s.reason for s in outcome.report.interrupts] == ["one", "two"]
    # Nothing is left behind in the stream for a later run.
    with pytest.raises(anyio.WouldBlock):
        receiver.receive_nowait()


async def test_independent_steps_run_concurrently() -> None:
    flow = sp.Flow("pair")
    a_started, b_started = anyio.Event(), anyio.Event()

    @flow.step
    async def a() -> str:
        a_started.set()
        await b_started.wait()  # would deadlock if b could only start after a
        return "a"

    @flow.step
    async def b() -> str:
        b_started.set()
        await a_started.wait()
        return "b"

    @flow.step
    async def both(a: str, b: str) -> str:
        return a + b

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "ab"


async def test_a_step_starts_as_soon_as_its_dependencies_complete() -> None:
    flow = sp.Flow("eager")
    fast_dependant_ran = anyio.Event()

    @flow.step
    async def fast() -> int:
        return 1

    @flow.step
    async def slow() -> int:
        await fast_dependant_ran.wait()  # only ends once `after_fast` has run
        return 2

    @flow.step
    async def after_fast(fast: int) -> int:
        fast_dependant_ran.set()
        return fast

    @flow.step
    async def end(slow: int, after_fast: int) -> int:
        return slow + after_fast

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 3


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_max_concurrency_bounds_running_steps(limit: int) -> None:
    flow = sp.Flow("wide", max_concurrency=limit)
    running = 0
    peak = 0

    async def body() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        running -= 1

    for i in range(6):
        flow.step(name=f"s{i}")(body)

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert peak == limit


async def test_fan_out_all_steps_complete() -> None:
    flow = sp.Flow("fan")

    @flow.step
    async def root() -> int:
        return 1

    for i in range(50):

        async def leaf(root: int, i: int = i) -> int:
            await anyio.lowlevel.checkpoint()
            return root + i

        flow.step(name=f"leaf{i}")(leaf)

    @flow.step(after=tuple(f"leaf{i}" for i in range(50)))
    async def join() -> str:
        return "joined"

    outcome = await flow.run()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "joined"
    assert len(outcome.report.completed) == 52


async def test_inputs_reach_steps_and_defaults_apply() -> None:
    flow = sp.Flow("inputs")

    @flow.step
    async def greet(name: str, punctuation: str = "!") -> str:
        return f"hello {name}{punctuation}"

    outcome = await flow.run({"name": "ada"})
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "hello ada!"
    outcome = await flow.run({"name": "ada", "punctuation": "?"})
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "hello ada?"
    assert outcome.report.run_id  # a fresh id was made


async def test_missing_and_unknown_inputs_before_any_step() -> None:
    flow = sp.Flow("deploy")
    ran: list[str] = []

    @flow.step
    async def server(host: str, port: int) -> None:
        ran.append("server")

    with pytest.raises(sp.FlowInputError, match=r"flow 'deploy': missing input\(s\) 'host', 'port'$"):
        await flow.run()
    with pytest.raises(
        sp.FlowInputError, match=r"flow 'deploy': missing input\(s\) 'host', 'port'; unknown input\(s\) 'hots'"
    ):
        await flow.run({"hots": "x"})
    with pytest.raises(sp.FlowInputError, match=r"flow 'deploy': unknown input\(s\) 'extra', 'more'$") as info:
        await flow.run({"host": "h", "port": 1, "more": 1, "extra": 2})
    assert info.value.unknown == ("extra", "more")
    assert info.value.missing == ()
    assert ran == []


async def test_bad_run_arguments() -> None:
    flow = sp.Flow("deploy")

    @flow.step
    async def server() -> None: ...

    with pytest.raises(TypeError, match=r"flow 'deploy': strategy must be one of AtCheckpoint\(\)"):
        await flow.run(strategy="at-checkpoint")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"flow 'deploy': interrupts must be an anyio MemoryObjectReceiveStream"):
        await flow.run(interrupts=[])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"flow 'deploy': inputs must be a mapping"):
        await flow.run([("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"flow 'deploy': run_id must be a non-empty str"):
        await flow.run(run_id="")


async def test_running_an_empty_flow_is_a_definition_error() -> None:
    with pytest.raises(sp.FlowDefinitionError, match=r"flow 'empty' has no steps"):
        await sp.Flow("empty").run()


async def test_a_flow_is_frozen_once_it_ran() -> None:
    flow = sp.Flow("frozen")

    @flow.step
    async def a() -> None: ...

    await flow.run()
    with pytest.raises(sp.FlowDefinitionError, match=r"flow 'frozen', step 'b': the flow has already run"):

        @flow.step
        async def b() -> None: ...


async def test_foreign_object_on_the_stream_is_a_clear_error() -> None:
    send, receive = anyio.create_memory_object_stream[Any](4)
    flow = sp.Flow("f")

    @flow.step
    async def a() -> None: ...

    with send, receive:
        send.send_nowait("stop!")
        with pytest.raises(TypeError, match=r"the interrupt stream carried str 'stop!'; only InterruptSignal"):
            await flow.run(interrupts=receive)


async def test_failing_step_cancels_running_siblings() -> None:
    flow = sp.Flow("failing")
    sibling_running = anyio.Event()
    sibling_cleanup: list[str] = []

    @flow.step
    async def root() -> int:
        return 1

    @flow.step
    async def sibling(root: int) -> None:
        sibling_running.set()
        try:
            await anyio.sleep_forever()
        finally:
            sibling_cleanup.append("cancelled")

    @flow.step
    async def broken(root: int) -> None:
        await sibling_running.wait()
        raise ValueError("disk full")

    @flow.step
    async def after(broken: None, sibling: None) -> None: ...

    with pytest.raises(sp.StepFailed, match=r"step 'broken' of flow 'failing' failed: ValueError: disk full") as info:
        await flow.run()
    failure = info.value
    assert isinstance(failure, sp.StoppointError)
    assert failure.step == "broken"
    assert isinstance(failure.__cause__, ValueError)
    report = failure.report
    assert report.completed == ["root"]
    assert report.failed == ["broken"]
    assert report.cancelled == ["sibling"]
    assert report.not_started == ["after"]
    assert report.steps["broken"].error == "ValueError: disk full"
    assert failure.checkpoint.outputs == {"root": 1}
    assert sibling_cleanup == ["cancelled"]


async def test_failure_inside_the_steps_own_task_group() -> None:
    flow = sp.Flow("grouped")

    @flow.step
    async def work() -> None:
        async def bad() -> None:
            raise KeyError("gone")

        async with anyio.create_task_group() as tg:
            tg.start_soon(bad)

    with pytest.raises(sp.StepFailed) as info:
        await flow.run()
    assert isinstance(info.value.__cause__, BaseExceptionGroup)
    assert info.value.report.failed == ["work"]


async def test_step_raising_stop_requested_unasked_is_a_failure() -> None:
    flow = sp.Flow("rogue")

    @flow.step
    async def work() -> None:
        raise sp.StopRequested()

    with pytest.raises(sp.StepFailed, match=r"step 'work' of flow 'rogue' failed: StopRequested"):
        await flow.run()


async def test_cancelling_the_caller_cancels_the_run() -> None:
    flow = sp.Flow("cancel me")
    running = anyio.Event()
    states: list[str] = []

    @flow.step
    async def work() -> None:
        running.set()
        try:
            await anyio.sleep_forever()
        finally:
            states.append("cleaned up")

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await flow.run()
            states.append("not reached: the cancellation propagates out of run()")

        tg.start_soon(run)
        await running.wait()
        tg.cancel_scope.cancel()
    assert states == ["cleaned up"]


async def test_iterate_stops_before_every_nth_item(channel: Channel) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("batch")
    handed: list[int] = []

    @flow.step
    async def batch(ctx: sp.StepContext) -> int:
        async for item in ctx.iterate(range(10), every=3):
            handed.append(item)
            if item == 4:
                interrupter.interrupt()
        return len(handed)

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert handed == [0, 1, 2, 3, 4, 5]  # the stopping point before item 6 stops it
    assert outcome.report.stopped == ["batch"]


@pytest.mark.parametrize(
    ("interrupt_after", "handed", "completed"),
    [
        (None, [], False),  # interrupted before iterating: the stopping point before item 0 stops it
        (0, [0, 1], False),
        (3, [0, 1, 2, 3], False),
        (5, [0, 1, 2, 3, 4, 5], False),
        (6, [0, 1, 2, 3, 4, 5, 6], True),  # 7 items, every=2: no stopping point after the last one
    ],
)
async def test_iterate_async_source_stopping_points(
    interrupt_after: int | None, handed: list[int], completed: bool, channel: Channel
) -> None:
    interrupter, receiver = channel
    flow = sp.Flow("stream")
    got: list[int] = []

    async def numbers(n: int) -> Any:
        for i in range(n):
            await anyio.lowlevel.checkpoint()
            yield i

    @flow.step
    async def consume(ctx: sp.StepContext) -> list[int]:
        if interrupt_after is None:
            interrupter.interrupt()
        async for item in ctx.iterate(numbers(7), every=2):  # stopping points before taking 0, 2, 4, 6
            got.append(item)
            if item == interrupt_after:
                interrupter.interrupt()
        return got

    outcome = await flow.run(interrupts=receiver)
    assert got == handed
    assert isinstance(outcome, sp.Completed) is completed
    if not completed:
        assert isinstance(outcome, sp.Interrupted)
        assert outcome.report.steps["consume"].stopped_at is not None
        assert outcome.report.steps["consume"].stopped_at.startswith("test_executor.py:")


@pytest.mark.parametrize(("sized", "completed"), [(True, True), (False, False)])
async def test_iterate_end_of_source(sized: bool, completed: bool, channel: Channel) -> None:
    """Interrupted during the last item: a sized source ends; another source stops before its end."""
    interrupter, receiver = channel
    flow = sp.Flow("end")

    @flow.step
    async def consume(ctx: sp.StepContext) -> int:
        source = [1, 2, 3] if sized else (x for x in [1, 2, 3])
        total = 0
        async for item in ctx.iterate(source):
            total += item
            if item == 3:
                interrupter.interrupt()
        return total

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Completed) is completed


async def test_iterate_never_drops_a_taken_item(channel: Channel) -> None:
    """The stopping point comes before an item is taken, so a one-shot source keeps the rest."""
    interrupter, receiver = channel
    queue_send, queue_receive = anyio.create_memory_object_stream[int](10)
    for i in range(5):
        queue_send.send_nowait(i)
    queue_send.close()
    flow = sp.Flow("queue")
    processed: list[int] = []

    @flow.step
    async def drain(ctx: sp.StepContext) -> None:
        async for item in ctx.iterate(queue_receive):
            processed.append(item)
            if item == 1:
                interrupter.interrupt()

    with queue_receive:
        outcome = await flow.run(interrupts=receiver)
        assert isinstance(outcome, sp.Interrupted)
        assert processed == [0, 1]
        assert [queue_receive.receive_nowait() for _ in range(3)] == [2, 3, 4]


async def test_iterate_rejects_bad_arguments() -> None:
    ctx = sp.StepContext(run_id="r", flow="f", step="s")
    with pytest.raises(ValueError, match=r"step 's': iterate\(every=\) must be an int >= 1, got 0"):
        ctx.iterate([1], every=0)
    with pytest.raises(TypeError, match=r"step 's': iterate\(\) needs an iterable or async iterable, got int"):
        ctx.iterate(5)  # type: ignore[call-overload]
