"""Saved progress inside a step: `ctx.save(state)` and `ctx.restored(type_, default)` (API.md §11).

Every rule, without a store (the checkpoint of an `Interrupted` or `StepFailed` carries it) and on every store
(memory, SQLite, PostgreSQL: committed, fenced, before `save()` returns), on asyncio and trio.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import stoppoint as sp
from stoppoint.testing import check_resumable, interrupt_at

from . import save_flow
from .conftest import until
from .hooks import BasicOnly

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


class Position(BaseModel):
    done: int
    total: int


def counting_flow(seen: list[Any], n: int = 6) -> sp.Flow:
    """Flow "count": step `count` sums 0..n-1, one item per stopping point, saving its position and sum after
    each item and noting in `seen` what each attempt restored; step `after` doubles the sum."""
    flow = sp.Flow("count")

    @flow.step
    async def count(ctx: sp.StepContext, n: int) -> int:
        position = ctx.restored(Position, default=Position(done=0, total=0))
        seen.append(position)
        for i in range(position.done, n):
            await ctx.checkpoint()
            position = Position(done=i + 1, total=position.total + i)
            await ctx.save(position)
        return position.total

    @flow.step
    async def after(ctx: sp.StepContext, count: int) -> int:
        await ctx.checkpoint()
        return 2 * count

    return flow


def progress_of(stored: sp.StoredRun | None) -> dict[str, Any]:
    assert stored is not None
    return dict(json.loads(stored.checkpoint_json).get("progress", {}))


# -- without a store ---------------------------------------------------------------------------------------


async def test_an_interrupted_checkpoint_carries_the_last_save_and_a_resume_restores_it() -> None:
    seen: list[Any] = []
    flow = counting_flow(seen)
    outcome = await flow.run({"n": 6}, interrupts=interrupt_at("count", 4))
    assert isinstance(outcome, sp.Interrupted)
    # Stopped at its 4th stopping point: three items were done and saved.
    assert outcome.checkpoint.progress == {"count": {"done": 3, "total": 3}}
    resumed = await flow.run(resume=flow.load_checkpoint(outcome.checkpoint.to_json()))
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == 2 * sum(range(6))
    assert seen == [Position(done=0, total=0), Position(done=3, total=3)]


async def test_the_saved_state_is_dropped_when_the_step_completes() -> None:
    flow = counting_flow([])
    outcome = await flow.run({"n": 3}, interrupts=interrupt_at("after", 1))
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.checkpoint.outputs == {"count": 3}
    assert outcome.checkpoint.progress == {}
    assert json.loads(outcome.checkpoint.to_json())["progress"] == {}


async def test_a_failed_step_keeps_its_saved_state_in_the_step_failed_checkpoint() -> None:
    flow = sp.Flow("fails")
    attempts: list[int | None] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        done = ctx.restored(int)
        attempts.append(done)
        await ctx.save(7)
        if done is None:
            raise RuntimeError("boom")
        return done

    with pytest.raises(sp.StepFailed) as caught:
        await flow.run()
    checkpoint = caught.value.checkpoint
    assert checkpoint is not None
    assert checkpoint.progress == {"work": 7}
    outcome = await flow.run(resume=flow.load_checkpoint(checkpoint.to_json()))
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 7
    assert attempts == [None, 7]


async def test_restored_is_what_earlier_attempts_saved_not_this_one() -> None:
    flow = sp.Flow("own")
    reads: list[Any] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> str:
        reads.append(ctx.restored(str, default="nothing"))
        await ctx.save("first")
        reads.append(ctx.restored(str, default="nothing"))
        await ctx.save("second")
        await ctx.checkpoint()
        return "done"

    outcome = await flow.run(interrupts=interrupt_at("work", 1))
    assert isinstance(outcome, sp.Interrupted)
    assert reads == ["nothing", "nothing"]
    assert outcome.checkpoint.progress == {"work": "second"}  # each save replaces the last
    await flow.run(resume=outcome.checkpoint)
    assert reads[2:] == ["second", "second"]


async def test_a_retry_attempt_continues_from_what_the_failed_attempt_saved(store: sp.Store) -> None:
    """A retried step's next attempt restores the last state the failed one saved (committed, with a store), and
    what it saves itself is not restored within the attempt; the completed step's saved state is dropped."""
    flow = sp.Flow("again")
    reads: list[Any] = []

    @flow.step(retry=sp.Retry(attempts=3, delay=0))
    async def work(ctx: sp.StepContext) -> list[int]:
        done: list[int] = ctx.restored(list[int], default=[])
        reads.append(list(done))
        for page in range(len(done), 4):
            if page == 2 and len(reads) == 1:
                raise ConnectionError("page 2: connection reset")  # the first attempt fails there
            done.append(page)
            await ctx.save(done)
        reads.append(ctx.restored(list[int], default=[]))  # (this attempt's own saves are not restored)
        return done

    outcome = await flow.run(store=store, run_id="r1")
    assert isinstance(outcome, sp.Completed), outcome
    assert outcome.value == [0, 1, 2, 3]
    assert reads == [[], [0, 1], [0, 1]]  # the second attempt went on from page 2
    step = outcome.report.steps["work"]
    assert (step.attempts, step.errors) == (2, ["ConnectionError: page 2: connection reset"])
    stored = await store.load("again", "r1")
    assert stored is not None
    assert json.loads(stored.checkpoint_json).get("progress", {}) == {}  # dropped once the step completed


@dataclass
class Page:
    number: int
    cursor: str


async def test_restored_validates_into_the_type_asked_for() -> None:
    flow = sp.Flow("typed")
    got: list[Any] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        got.append(ctx.restored(Page))
        got.append(ctx.restored(list[int], default=[]))
        await ctx.save(Page(3, "c3"))
        await ctx.checkpoint()
        return 1

    outcome = await flow.run(interrupts=interrupt_at("work", 1))
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.checkpoint.progress == {"work": {"number": 3, "cursor": "c3"}}  # JSON, as stored
    # A resume from the JSON text, as a store keeps it: restored() types it back.
    with pytest.raises(sp.StepFailed, match=r"CheckpointError: .*the state step 'work' saved does not validate"):
        await flow.run(resume=flow.load_checkpoint(outcome.checkpoint.to_json()))
    assert got[0] is None
    assert got[1] == []
    assert got[2] == Page(3, "c3")


async def test_a_state_that_cannot_be_serialised_raises_checkpoint_error_naming_the_step() -> None:
    flow = sp.Flow("bad")

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        await ctx.save({"ok": 1})
        with pytest.raises(sp.CheckpointError, match=r"the state step 'work' saved \(dict\) cannot be serialised"):
            await ctx.save({"lock": anyio.Lock()})
        deep: Any = 0
        for _ in range(199):  # deeper than a checkpoint reads back
            deep = [deep]
        with pytest.raises(sp.CheckpointError, match="the state step 'work' saved is nested"):
            await ctx.save(deep)
        await ctx.checkpoint()
        return 1

    outcome = await flow.run(interrupts=interrupt_at("work", 1))
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.checkpoint.progress == {"work": {"ok": 1}}  # the refused saves left the last one


async def test_a_save_is_a_copy_taken_at_once() -> None:
    flow = sp.Flow("copy")

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        items = [1]
        await ctx.save(items)
        items.append(2)  # after the save: not saved
        await ctx.checkpoint()
        return len(items)

    outcome = await flow.run(interrupts=interrupt_at("work", 1))
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.checkpoint.progress == {"work": [1]}


async def test_a_context_made_by_hand_checks_saves_and_restores_nothing() -> None:
    ctx = sp.StepContext(run_id="r", flow="f", step="s")
    await ctx.save([1, 2])
    assert ctx.restored(list[int], default=[]) == []
    with pytest.raises(sp.CheckpointError, match="the state step 's' saved"):
        await ctx.save(object())


async def test_an_included_flows_steps_keep_their_progress_in_its_nested_checkpoint() -> None:
    seen: list[Any] = []
    inner = counting_flow(seen)
    outer = sp.Flow("outer")
    outer.include(inner, name="sub")

    outcome = await outer.run({"n": 5}, interrupts=interrupt_at("count", 3))
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.checkpoint.progress == {}
    assert outcome.checkpoint.nested["sub"].progress == {"count": {"done": 2, "total": 1}}
    resumed = await outer.run(resume=outer.load_checkpoint(outcome.checkpoint.to_json()))
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == 2 * sum(range(5))
    assert seen[-1] == Position(done=2, total=1)


async def test_a_version_1_checkpoint_still_reads_and_resumes() -> None:
    flow = counting_flow([])
    v1 = {
        "format": "stoppoint.checkpoint",
        "format_version": 1,
        "flow": "count",
        "flow_version": flow.version,
        "run_id": "old",
        "inputs": {"n": 4},
        "outputs": {"count": 6},
        "nested": {},
    }
    checkpoint = flow.load_checkpoint(json.dumps(v1))
    assert checkpoint.progress == {}
    outcome = await flow.run(resume=checkpoint)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 12
    assert json.loads(checkpoint.to_json())["format_version"] == 2


async def test_progress_for_a_step_the_flow_lacks_is_a_mismatch() -> None:
    flow = counting_flow([])
    doc = {
        "format": "stoppoint.checkpoint",
        "format_version": 2,
        "flow": "count",
        "flow_version": flow.version,
        "run_id": "r",
        "inputs": {"n": 4},
        "outputs": {},
        "nested": {},
        "progress": {"gone": 1},
    }
    with pytest.raises(sp.CheckpointMismatch, match="saved progress for 'gone'"):
        flow.load_checkpoint(json.dumps(doc))


# -- check_resumable ---------------------------------------------------------------------------------------


async def test_check_resumable_passes_a_flow_that_saves_consistently() -> None:
    report = await check_resumable(counting_flow([]), {"n": 5})
    assert report.restored > 0
    assert report.value == 2 * sum(range(5))


async def test_check_resumable_catches_a_step_that_saves_before_doing_the_work() -> None:
    flow = sp.Flow("early")

    @flow.step
    async def collect(ctx: sp.StepContext) -> list[int]:
        done = ctx.restored(int, default=0)
        items: list[int] = []
        for i in range(done, 4):
            await ctx.save(i + 1)  # saved as done before it is: a stop at the next stopping point loses item i
            await ctx.checkpoint()
            items.append(i)
        return items

    with pytest.raises(AssertionError, match="resumed to"):
        await check_resumable(flow)


async def test_check_resumable_catches_a_step_that_saves_part_of_its_state() -> None:
    flow = sp.Flow("partial")

    @flow.step
    async def total(ctx: sp.StepContext) -> int:
        done = ctx.restored(int, default=0)
        acc = 0  # the running sum is not saved: a resume loses it
        for i in range(done, 4):
            await ctx.checkpoint()
            acc += i
            await ctx.save(i + 1)
        return acc

    with pytest.raises(AssertionError, match=r"partial\.total#\d+.*resumed to"):
        await check_resumable(flow)


# -- with a store ------------------------------------------------------------------------------------------


async def test_each_save_is_committed_before_it_returns(store: sp.Store) -> None:
    flow = sp.Flow("committed")
    stored: list[dict[str, Any]] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        for i in range(3):
            await ctx.save({"i": i})
            stored.append(progress_of(await store.load("committed", "r")))
        return 3

    outcome = await flow.run(store=store, run_id="r")
    assert isinstance(outcome, sp.Completed)
    assert stored == [{"work": {"i": 0}}, {"work": {"i": 1}}, {"work": {"i": 2}}]
    assert progress_of(await store.load("committed", "r")) == {}  # dropped: the output replaced it
    assert json.loads((await store.load("committed", "r")).checkpoint_json)["outputs"] == {"work": 3}  # type: ignore[union-attr]


async def test_an_interrupted_run_resumes_from_the_store_at_its_last_save(store: sp.Store) -> None:
    seen: list[Any] = []
    flow = counting_flow(seen)
    outcome = await flow.run({"n": 6}, store=store, run_id="r", interrupts=interrupt_at("count", 5))
    assert isinstance(outcome, sp.Interrupted)
    assert progress_of(await store.load("count", "r")) == {"count": {"done": 4, "total": 6}}
    report = json.loads((await store.load("count", "r")).report_json)  # type: ignore[union-attr]
    assert report["steps"]["count"]["status"] == "interrupted"
    resumed = await flow.run(store=store, run_id="r")
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == 2 * sum(range(6))
    assert seen == [Position(done=0, total=0), Position(done=4, total=6)]
    assert progress_of(await store.load("count", "r")) == {}


async def test_a_failed_step_keeps_its_saved_state_in_the_store(store: sp.Store) -> None:
    flow = sp.Flow("fails")
    attempts: list[int | None] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        done = ctx.restored(int)
        attempts.append(done)
        await ctx.save(5 if done is None else done + 1)
        if done is None:
            raise RuntimeError("boom")
        return done

    with pytest.raises(sp.StepFailed):
        await flow.run(store=store, run_id="r")
    assert progress_of(await store.load("fails", "r")) == {"work": 5}
    outcome = await flow.run(store=store, run_id="r")
    assert isinstance(outcome, sp.Completed)
    assert attempts == [None, 5]


async def test_an_included_steps_save_is_committed_in_its_include_row(store: sp.Store) -> None:
    inner = counting_flow([])
    outer = sp.Flow("outer")
    outer.include(inner, name="sub")
    outcome = await outer.run({"n": 4}, store=store, run_id="r", interrupts=interrupt_at("count", 3))
    assert isinstance(outcome, sp.Interrupted)
    stored = await store.load("outer", "r")
    assert stored is not None
    nested = json.loads(stored.checkpoint_json)["nested"]["sub"]
    assert nested["progress"] == {"count": {"done": 2, "total": 1}}
    resumed = await outer.run(store=store, run_id="r")
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == 2 * sum(range(4))


class Stealable:
    """A store (any of the three, `inner`) whose run can be taken from under its owner: it keeps the lease
    of the last claim, and neither renews (the owner's own fence stays content) nor polls for interrupts,
    so the store's fencing of the next write is what notices."""

    def __init__(self, inner: sp.Store) -> None:
        self.inner = inner
        self.claimed: sp.Lease | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        claim = await self.inner.claim(*args, **kwargs)
        if claim is not None and claim.lease is not None:
            self.claimed = claim.lease
        return claim

    async def renew(self, lease: sp.Lease) -> sp.Lease:
        return lease

    async def interrupts(self, lease: sp.Lease, after: int = 0) -> list[tuple[int, sp.InterruptSignal]]:
        return []


async def test_a_save_after_the_lease_was_lost_raises_lease_lost_and_writes_nothing(store: sp.Store) -> None:
    proxy = Stealable(store)
    flow = sp.Flow("stolen")
    after: list[str] = []

    @flow.step
    async def work(ctx: sp.StepContext) -> int:
        await ctx.save("mine")
        assert proxy.claimed is not None
        await store.release(proxy.claimed)  # given up, then claimed by another process
        claim = await store.claim("stolen", "r", "thief:1/x")
        assert claim is not None
        try:
            await ctx.save("too late")
        except sp.LeaseLost:
            after.append("raised")
            raise
        after.append("returned")  # pragma: no cover
        return 1

    with pytest.raises(sp.LeaseLost):
        await flow.run(store=proxy, run_id="r")  # type: ignore[arg-type]
    assert after == ["raised"]
    assert progress_of(await store.load("stolen", "r")) == {"work": "mine"}
    record = (await store.list_runs("stolen"))[0]
    assert (record.owner, record.epoch) == ("thief:1/x", 2)


async def test_a_basic_store_gets_a_whole_save_at_each_save() -> None:
    store = BasicOnly()
    seen: list[Any] = []
    flow = counting_flow(seen)
    outcome = await flow.run({"n": 4}, store=store, run_id="r", interrupts=interrupt_at("count", 3))
    assert isinstance(outcome, sp.Interrupted)
    assert progress_of(await store.load("count", "r")) == {"count": {"done": 2, "total": 1}}
    stored = await store.load("count", "r")
    assert stored is not None
    resumed = await flow.run(resume=flow.load_checkpoint(stored.checkpoint_json), store=store)
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == 12
    assert seen[-1] == Position(done=2, total=1)


async def test_a_checkpoint_given_to_a_store_run_puts_its_progress_in_the_store(store: sp.Store) -> None:
    seen: list[Any] = []
    flow = counting_flow(seen)
    outcome = await flow.run({"n": 5}, interrupts=interrupt_at("count", 3), run_id="given")
    assert isinstance(outcome, sp.Interrupted)
    again = await flow.run(resume=outcome.checkpoint, store=store, interrupts=interrupt_at("count", 0))
    assert isinstance(again, sp.Interrupted)
    assert progress_of(await store.load("count", "given")) == {"count": {"done": 2, "total": 1}}
    done = await flow.run(store=store, run_id="given")
    assert isinstance(done, sp.Completed)
    assert done.value == 20
    assert seen[-1] == Position(done=2, total=1)


# -- a real crash --------------------------------------------------------------------------------------------


def _saved_lines(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("SAVED")]


def kill_mid_step(db: Path, log: Path, after: int, backend: str) -> None:
    """Run tests/save_flow.py in a child process and SIGKILL it once `after` of its saves returned."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-u", "-m", "tests.save_flow", str(db), str(log), backend],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        seen = 0
        while seen < after:  # the child prints a line after each save returned: kill it mid-step
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"the child ended early: {child.stderr.read() if child.stderr else ''}")
            seen += line.startswith("SAVED")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("after", [3, 40])
async def test_sigkill_mid_step_then_resume_continues_from_the_last_committed_save(
    tmp_path: Path, after: int, anyio_backend: str
) -> None:
    db, log = tmp_path / "runs.db", tmp_path / "side.log"
    kill_mid_step(db, log, after, anyio_backend)
    logged = _saved_lines(log)
    assert len(logged) >= after
    last = logged[-1]  # the last save the child saw committed (a later one may have committed unlogged)

    flow = save_flow.make_flow(str(log))
    with anyio.fail_after(60):
        async with sp.SQLiteStore(db, lease=save_flow.LEASE) as store:

            async def not_held() -> bool:
                return all(record.status is not sp.RunStatus.RUNNING for record in await store.list_runs())

            await until(not_held)
            outcome = await flow.run(store=store, run_id=save_flow.RUN_ID)
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == save_flow.expected()
    restored = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("RESTORED")]
    assert restored[0] == 0  # the child's attempt began from nothing
    assert restored[-1] in (last, last + 1), f"resumed from {restored[-1]}, the last committed save was {last}"
    assert len(restored) == 2
