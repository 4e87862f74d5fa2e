"""run(store=..., run_id=...) on the real SQLite store: persist, resume, and return what is done (API.md §6)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

import stoppoint as sp

from .conftest import Channel

pytestmark = pytest.mark.anyio


class Quote(BaseModel):
    item: str
    price: float


def build(calls: list[str], stop_in: str | None, interrupter: sp.Interrupter | None) -> sp.Flow:
    """A fresh definition each time, as a new process would build it."""
    flow = sp.Flow("shop", version="3")

    @flow.step
    async def quote(item: str) -> Quote:
        calls.append("quote")
        return Quote(item=item, price=9.5)

    @flow.step
    async def pay(ctx: sp.StepContext, quote: Quote) -> str:
        calls.append("pay")
        if stop_in == "pay":
            assert interrupter is not None
            interrupter.interrupt("closing time")
        await ctx.checkpoint()
        return f"paid {quote.price:.2f} for {quote.item}"

    @flow.step
    async def ship(pay: str, quote: Quote) -> str:
        calls.append("ship")
        return f"{pay}; shipped {quote.item}"

    return flow


async def test_an_interrupted_run_resumes_from_the_file_and_a_completed_one_runs_nothing(
    tmp_path: Path, channel: Channel
) -> None:
    interrupter, receiver = channel
    path = tmp_path / "runs.db"
    calls: list[str] = []
    async with sp.SQLiteStore(path) as store:
        first = await build(calls, "pay", interrupter).run(
            {"item": "kettle"}, interrupts=receiver, store=store, run_id="order-1"
        )
        assert isinstance(first, sp.Interrupted)
        [record] = await store.list_runs("shop")
        assert (record.run_id, record.status, record.flow_version) == ("order-1", sp.RunStatus.INTERRUPTED, "3")
    assert calls == ["quote", "pay"]

    calls.clear()
    async with sp.SQLiteStore(path) as store:  # "tomorrow": a new store object on the same file
        second = await build(calls, None, None).run(store=store, run_id="order-1")
        assert isinstance(second, sp.Completed)
        assert second.value == "paid 9.50 for kettle; shipped kettle"
        assert calls == ["pay", "ship"]  # quote came back from the file, typed
        assert [n for n, s in second.report.steps.items() if s.resumed] == ["quote"]
        [record] = await store.list_runs("shop")
        assert record.status is sp.RunStatus.COMPLETED

        calls.clear()
        third = await build(calls, None, None).run({"item": "kettle"}, store=store, run_id="order-1")
        assert isinstance(third, sp.Completed)
        assert calls == []  # finished: nothing runs
        assert third.value == second.value
        assert third.report == second.report


async def test_a_stored_run_refuses_other_inputs(tmp_path: Path) -> None:
    calls: list[str] = []
    async with sp.SQLiteStore(tmp_path / "runs.db") as store:
        await build(calls, None, None).run({"item": "kettle"}, store=store, run_id="order-2")
        with pytest.raises(sp.CheckpointMismatch, match="'item'"):
            await build(calls, None, None).run({"item": "toaster"}, store=store, run_id="order-2")


async def test_a_stored_run_of_another_version_is_refused(tmp_path: Path, channel: Channel) -> None:
    interrupter, receiver = channel
    async with sp.SQLiteStore(tmp_path / "runs.db") as store:
        await build([], "pay", interrupter).run({"item": "x"}, interrupts=receiver, store=store, run_id="o")
        newer = sp.Flow("shop", version="4")

        @newer.step
        async def quote(item: str) -> str:  # pragma: no cover - never runs
            return item

        with pytest.raises(sp.CheckpointMismatch, match="version '3'"):
            await newer.run(store=store, run_id="o")


async def test_a_run_without_run_id_is_stored_under_a_new_id(tmp_path: Path) -> None:
    async with sp.SQLiteStore(tmp_path / "runs.db") as store:
        outcome = await build([], None, None).run({"item": "x"}, store=store)
        [record] = await store.list_runs()
        assert record.run_id == outcome.report.run_id
        assert record.status is sp.RunStatus.COMPLETED


async def test_a_store_that_cannot_be_used_fails_the_run_before_any_step(tmp_path: Path) -> None:
    path = tmp_path / "not-a-store.db"
    path.write_bytes(b"these are not the bytes of an SQLite file" * 10)
    calls: list[str] = []
    with pytest.raises(sp.StoreError, match="is not a SQLite database"):
        await build(calls, None, None).run({"item": "x"}, store=sp.SQLiteStore(path), run_id="o")
    assert calls == []
    assert path.read_bytes() == b"these are not the bytes of an SQLite file" * 10


async def test_a_step_output_that_cannot_be_stored_fails_the_run_naming_it(tmp_path: Path) -> None:
    flow = sp.Flow("odd")
    ran: list[str] = []

    @flow.step
    async def make() -> object:
        return object()

    @flow.step
    async def use(make: object) -> None:  # pragma: no cover - must not start: `make` is not committed
        ran.append("use")

    async with sp.SQLiteStore(tmp_path / "runs.db") as store:
        with pytest.raises(sp.CheckpointError, match="the output of step 'make'"):
            await flow.run(store=store, run_id="o")
    assert ran == []


async def test_store_argument_is_checked() -> None:
    flow = build([], None, None)
    with pytest.raises(TypeError, match="store must implement the Store protocol"):
        await flow.run({"item": "x"}, store="runs.db")  # type: ignore[arg-type]


async def test_an_annotation_that_does_not_resolve_is_an_error_not_a_silent_dict(
    tmp_path: Path, channel: Channel
) -> None:
    """A model defined inside a function cannot be found again when the checkpoint is read back."""
    interrupter, receiver = channel

    class Local(BaseModel):
        n: int

    flow = sp.Flow("local")

    @flow.step
    async def make() -> Local:
        interrupter.interrupt()
        return Local(n=1)

    @flow.step
    async def use(make: Local) -> int:  # pragma: no cover - never runs
        return make.n

    outcome = await flow.run(interrupts=receiver)
    assert isinstance(outcome, sp.Interrupted)
    with pytest.raises(sp.CheckpointError, match="annotation 'Local' does not resolve"):
        flow.load_checkpoint(outcome.checkpoint.to_json())


async def test_a_store_class_instead_of_a_store_is_refused() -> None:
    with pytest.raises(TypeError, match="store must implement the Store protocol"):
        await build([], None, None).run({"item": "x"}, store=sp.MemoryStore)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_store_methods_want_str_names(tmp_path: Path, kind: str) -> None:
    store: sp.MemoryStore | sp.SQLiteStore = sp.MemoryStore() if kind == "memory" else sp.SQLiteStore(tmp_path / "r.db")
    with pytest.raises(TypeError, match=r"load\(\): flow must be a str, got NoneType"):
        await store.load(None, "r")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"delete\(\): run_id must be a str, got int"):
        await store.delete("f", 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"list_runs\(\): flow must be a str, got int"):
        await store.list_runs(5)  # type: ignore[arg-type]
    assert await store.list_runs() == []
    if isinstance(store, sp.SQLiteStore):
        await store.aclose()


async def test_resuming_a_checkpoint_into_a_store_never_overwrites_a_run_that_got_further(
    tmp_path: Path, channel: Channel
) -> None:
    interrupter, receiver = channel
    async with sp.SQLiteStore(tmp_path / "runs.db") as store:
        first = await build([], "pay", interrupter).run({"item": "x"}, interrupts=receiver, store=store, run_id="o")
        assert isinstance(first, sp.Interrupted)
        # The stored run is where the checkpoint is: resuming it into the store is fine.
        calls: list[str] = []
        done = await build(calls, None, None).run(resume=first.checkpoint, store=store)
        assert isinstance(done, sp.Completed)
        assert calls == ["pay", "ship"]
        # Now the store holds it completed: the old checkpoint must not run it again over it.
        with pytest.raises(sp.CheckpointMismatch, match="the store holds this run completed"):
            await build(calls, None, None).run(resume=first.checkpoint, store=store)
