"""Queue and workers (API.md §9): `flow.submit()` stores a queued run, `sp.Worker` claims queued and orphaned
runs of its flows from its queues and runs them; interrupts from anywhere reach its runs as ordinary signals.

On `MemoryStore` (the SQLite store's are driven by the command, in test_cli_worker.py). No test sleeps to
order events: the steps wait on anyio Events, and the worker's own events (its `_listener`, which the
`stoppoint worker` command prints from) say when a run was claimed or ended.
"""

from __future__ import annotations

from typing import Any

import pytest

import stoppoint as sp

pytestmark = pytest.mark.anyio


async def record(store: sp.Store, run_id: str) -> sp.RunRecord:
    found = [record for record in await store.list_runs() if record.run_id == run_id]
    assert len(found) == 1
    return found[0]


def adder(name: str = "adder", version: str = "1") -> sp.Flow:
    flow = sp.Flow(name, version=version)

    @flow.step
    async def add(x: int, y: int = 1) -> int:
        return x + y

    return flow


class OnlyBasic:
    """A store of stoppoint 0.1: whole saves, no leases, no queue."""

    async def save(self, checkpoint: sp.Checkpoint, report: sp.RunReport) -> None: ...

    async def load(self, flow: str, run_id: str) -> sp.StoredRun | None:
        return None

    async def list_runs(self, flow: str | None = None) -> list[sp.RunRecord]:
        return []

    async def delete(self, flow: str, run_id: str) -> None: ...


# -- submit -----------------------------------------------------------------------------------------------


async def test_submit_stores_a_queued_run_nobody_holds() -> None:
    store = sp.MemoryStore()
    flow = adder()
    run_id = await flow.submit(store, {"x": 1})
    assert isinstance(run_id, str)
    assert len(run_id) == 32
    assert int(run_id, 16) >= 0  # a new hex id
    assert await flow.submit(store, {"x": 2}, run_id="mine", queue="heavy") == "mine"
    first, mine = await record(store, run_id), await record(store, "mine")
    assert (first.status, first.queue, first.owner, first.epoch) == (sp.RunStatus.QUEUED, "default", None, 0)
    assert (mine.status, mine.queue) == (sp.RunStatus.QUEUED, "heavy")
    stored = await store.load("adder", "mine")
    assert stored is not None
    checkpoint = flow.load_checkpoint(stored.checkpoint_json)
    assert (checkpoint.inputs, checkpoint.outputs) == ({"x": 2}, {})


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [(None, "missing"), ({"x": 1, "z": 2}, "unknown"), ({"x": "not a number"}, "x")],
)
async def test_submit_checks_the_inputs_as_run_does_before_anything_is_stored(
    inputs: dict[str, Any] | None, problem: str
) -> None:
    store = sp.MemoryStore()
    with pytest.raises(sp.FlowInputError, match=problem) as raised:
        await adder().submit(store, inputs, run_id="r")
    assert "adder" in str(raised.value)
    assert await store.list_runs() == []


async def test_submit_refuses_what_is_not_a_store_of_queues() -> None:
    flow = adder()
    for store in (OnlyBasic(), sp.MemoryStore, object()):
        with pytest.raises(TypeError, match="flow 'adder': submit\\(\\) needs a Store"):
            await flow.submit(store, {"x": 1})  # type: ignore[arg-type]
    store = sp.MemoryStore()
    with pytest.raises(TypeError, match="queue must be a non-empty str"):
        await flow.submit(store, {"x": 1}, queue="")
    with pytest.raises(TypeError, match="run_id must be a non-empty str"):
        await flow.submit(store, {"x": 1}, run_id="")
    with pytest.raises(sp.FlowInputError):
        await flow.submit(store, {"x": 1}, run_id="\udcff")  # UTF-8 cannot carry it
    assert await store.list_runs() == []


async def test_submit_queues_a_stored_unfinished_run_again_with_its_own_inputs() -> None:
    store = sp.MemoryStore()
    flow = sp.Flow("halting")

    @flow.step
    async def first(x: int) -> int:
        return x

    @flow.step
    async def second(ctx: sp.StepContext, first: int) -> int:
        await ctx.checkpoint()
        return first + 1

    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        interrupter.interrupt("now")  # stops before the first step
        outcome = await flow.run({"x": 5}, store=store, run_id="r", interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert (await record(store, "r")).status is sp.RunStatus.INTERRUPTED

    with pytest.raises(sp.CheckpointMismatch, match="inputs differ"):
        await flow.submit(store, {"x": 6}, run_id="r")
    assert await flow.submit(store, run_id="r", queue="later") == "r"  # its inputs: none needed
    again = await record(store, "r")
    assert (again.status, again.queue) == (sp.RunStatus.QUEUED, "later")

    other_version = sp.Flow("halting", version="2")

    @other_version.step
    async def only(x: int) -> int:
        return x

    with pytest.raises(sp.CheckpointMismatch, match="version"):
        await other_version.submit(store, run_id="r")


async def test_submit_leaves_a_completed_run_as_it_is() -> None:
    store = sp.MemoryStore()
    flow = adder()
    assert (await flow.run({"x": 1}, store=store, run_id="done")).value == 2  # type: ignore[union-attr]
    assert await flow.submit(store, {"x": 1}, run_id="done") == "done"
    assert (await record(store, "done")).status is sp.RunStatus.COMPLETED
