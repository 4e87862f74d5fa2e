"""Resources (API.md §11): step parameters annotated `sp.Resource[T]` take live objects given to the run as
`resources=` (`run`, `start`, `Worker`): not flow inputs, never serialised or stored, required on every run and
resume, checked before any step starts and before the store is touched. On both backends; on every store where
a store is involved (conftest's `store`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import stoppoint as sp
from stoppoint.testing import check_resumable, interrupt_at

if TYPE_CHECKING:
    from collections.abc import Iterator  # only for type checkers: a resource's type need not be importable

pytestmark = pytest.mark.anyio

WAIT = 10


class Client:
    """A live object no checkpoint could hold (a lock inside), recording what it was asked."""

    def __init__(self, name: str = "client") -> None:
        self.name = name
        self.lock = threading.Lock()
        self.calls: list[str] = []

    async def get(self, what: str) -> str:
        self.calls.append(what)
        return f"{self.name}:{what}"


def fetcher(name: str = "fetcher") -> sp.Flow:
    flow = sp.Flow(name)

    @flow.step
    async def first(ctx: sp.StepContext, http: sp.Resource[Client], page: str) -> str:
        return await http.get(page)

    @flow.step
    async def second(first: str, http: sp.Resource[Client]) -> str:
        return first + "|" + await http.get("next")

    return flow


async def test_a_resource_is_given_to_the_steps_that_take_it_and_is_not_an_input() -> None:
    flow = fetcher()
    assert flow.inputs == ("page",)
    assert flow.resources == ("http",)
    client = Client()
    outcome = await flow.run({"page": "a"}, resources={"http": client})
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "client:a|client:next"
    assert client.calls == ["a", "next"]


async def test_a_resource_is_not_in_the_checkpoint_nor_in_what_a_store_keeps(store: sp.Store) -> None:
    flow = fetcher()
    outcome = await flow.run({"page": "a"}, store=store, run_id="r", resources={"http": Client()})
    assert isinstance(outcome, sp.Completed)
    stored = await store.load(flow.name, "r")
    assert stored is not None
    assert "http" not in stored.checkpoint_json
    assert flow.load_checkpoint(stored.checkpoint_json).inputs == {"page": "a"}


async def test_a_missing_resource_raises_naming_it_before_anything_runs_or_is_stored(store: sp.Store) -> None:
    flow = fetcher()
    with pytest.raises(sp.FlowInputError, match=r"missing resource.*'http'") as caught:
        await flow.run({"page": "a"}, store=store, run_id="r")
    assert caught.value.missing_resources == ("http",)
    assert await store.list_runs() == []
    async with anyio.create_task_group() as tg:
        with pytest.raises(sp.FlowInputError, match="'http'"):
            await flow.start(tg, {"page": "a"}, store=store, run_id="r")
    assert await store.list_runs() == []


async def test_an_unknown_resource_raises_naming_it() -> None:
    flow = fetcher()
    with pytest.raises(sp.FlowInputError, match=r"unknown resource.*'db'") as caught:
        await flow.run({"page": "a"}, resources={"http": Client(), "db": object()})
    assert caught.value.unknown_resources == ("db",)
    with pytest.raises(TypeError, match="resources must be a mapping"):
        await flow.run({"page": "a"}, resources=[("http", Client())])  # type: ignore[arg-type]


async def test_resources_are_not_inputs_and_inputs_are_not_resources() -> None:
    flow = fetcher()
    with pytest.raises(sp.FlowInputError, match=r"unknown input.*'http'"):
        await flow.run({"page": "a", "http": Client()}, resources={"http": Client()})
    with pytest.raises(sp.FlowInputError, match=r"unknown resource.*'page'"):
        await flow.run({"page": "a"}, resources={"http": Client(), "page": "a"})


async def test_resources_are_required_again_on_resume_and_the_new_ones_are_used(store: sp.Store) -> None:
    flow = fetcher()
    old = Client("old")
    stopped = await flow.run(
        {"page": "a"}, store=store, run_id="r", resources={"http": old}, interrupts=interrupt_at("second")
    )
    assert isinstance(stopped, sp.Interrupted)
    assert "http" not in stopped.checkpoint.inputs
    assert "http" not in stopped.checkpoint.to_json()
    before = await store.load(flow.name, "r")
    assert before is not None
    with pytest.raises(sp.FlowInputError, match="'http'"):
        await flow.run(store=store, run_id="r")  # from the store
    with pytest.raises(sp.FlowInputError, match="'http'"):
        await flow.run(resume=stopped.checkpoint, store=store)  # from a checkpoint
    after = await store.load(flow.name, "r")
    assert after == before  # untouched: not claimed, nothing written
    new = Client("new")
    outcome = await flow.run(store=store, run_id="r", resources={"http": new})
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "old:a|new:next"
    assert new.calls == ["next"]


async def test_a_resume_without_a_store_needs_them_too() -> None:
    flow = fetcher()
    stopped = await flow.run({"page": "a"}, resources={"http": Client()}, interrupts=interrupt_at("second"))
    assert isinstance(stopped, sp.Interrupted)
    resumed = flow.load_checkpoint(stopped.checkpoint.to_json())
    with pytest.raises(sp.FlowInputError, match="'http'"):
        await flow.run(resume=resumed)
    outcome = await flow.run(resume=resumed, resources={"http": Client("b")})
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "client:a|b:next"


async def test_start_takes_resources() -> None:
    flow = fetcher()
    async with anyio.create_task_group() as tg:
        handle = await flow.start(tg, {"page": "a"}, resources={"http": Client()})
        outcome = await handle.outcome()
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "client:a|client:next"


async def test_an_included_flows_resources_come_from_the_including_run() -> None:
    inner = fetcher("inner")
    outer = sp.Flow("outer")

    @outer.step
    async def prefix(db: sp.Resource[Client]) -> str:
        return await db.get("p")

    outer.include(inner)

    @outer.step
    async def join(prefix: str, inner: str) -> str:
        return prefix + "+" + inner

    assert outer.resources == ("db", "http")
    assert outer.inputs == ("page",)
    with pytest.raises(sp.FlowInputError, match=r"missing resource.*'http'"):
        await outer.run({"page": "a"}, resources={"db": Client("db")})
    stopped = await outer.run(
        {"page": "a"},
        resources={"db": Client("db"), "http": Client()},
        interrupts=interrupt_at("second", flow="inner"),
    )
    assert isinstance(stopped, sp.Interrupted)
    outcome = await outer.run(resume=stopped.checkpoint, resources={"db": Client("db"), "http": Client("h2")})
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == "db:p+client:a|h2:next"


async def test_check_resumable_takes_resources() -> None:
    report = await check_resumable(fetcher(), {"page": "a"}, resources={"http": Client()})
    assert report.value == "client:a|client:next"


async def test_a_worker_gives_each_run_the_resources_its_flow_takes(store: sp.Store) -> None:
    fetching, counting = fetcher(), sp.Flow("counting")

    @counting.step
    async def count(n: int, db: sp.Resource[Client]) -> str:
        return await db.get(str(n))

    worker_flows = [fetching, counting]
    with pytest.raises(sp.FlowInputError, match=r"flow 'counting': missing resource.*'db'"):
        sp.Worker(store, worker_flows, resources={"http": Client()})
    first = await fetching.submit(store, {"page": "a"})
    second = await counting.submit(store, {"n": 3})
    http, db = Client("http"), Client("db")
    worker = sp.Worker(store, worker_flows, resources={"http": http, "db": db, "unused": object()})
    ended: dict[str, str] = {}
    both = anyio.Event()

    def listen(event: str, fields: dict[str, Any]) -> None:  # the worker's events (see test_worker.py)
        if event == "worker.run_ended":
            ended[fields["run_id"]] = fields["status"]
            if len(ended) == 2:
                both.set()

    worker._listener = listen
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(WAIT):
            await both.wait()
        worker.stop()
    assert ended == {first: "completed", second: "completed"}
    done = await fetching.run(store=store, run_id=first, resources={"http": Client()})  # stored: nothing runs
    assert isinstance(done, sp.Completed)
    assert done.value == "http:a|http:next"
    done = await counting.run(store=store, run_id=second, resources={"db": Client()})
    assert isinstance(done, sp.Completed)
    assert done.value == "db:3"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_declaring_resources(anyio_backend: str) -> None:
    # An annotation object (no `from __future__ import annotations`) is recognised as well as text.
    flow = sp.Flow("objects")

    async def direct(pool: Any) -> int:
        return 1

    direct.__annotations__ = {"pool": sp.Resource[Client], "return": int}
    flow.step(direct)
    assert flow.resources == ("pool",)
    assert flow.inputs == ()

    # A type imported only for type checkers: the annotation is never evaluated.
    lazy = sp.Flow("lazy")

    @lazy.step
    async def walk(items: sp.Resource[Iterator[int]]) -> int:
        return sum(items)

    assert lazy.resources == ("items",)
    outcome = await lazy.run(resources={"items": iter([1, 2])})
    assert isinstance(outcome, sp.Completed)
    assert outcome.value == 3

    bad = sp.Flow("bad")

    async def defaulted(http: sp.Resource[Client] = Client()) -> int:  # noqa: B008
        return 1

    with pytest.raises(sp.FlowDefinitionError, match="resource parameter 'http' has a default"):
        bad.step(defaulted)

    @bad.step
    async def takes(http: sp.Resource[Client]) -> int:
        return 1

    async def http() -> int:
        return 1

    with pytest.raises(sp.FlowDefinitionError, match="'http' is already a resource of earlier step 'takes'"):
        bad.step(http)

    async def as_input(http: int) -> int:
        return http

    with pytest.raises(sp.FlowDefinitionError, match=r"'http' is a resource of earlier step 'takes'.*input here"):
        bad.step(as_input)

    @bad.step
    async def plain(x: int) -> int:
        return x

    async def as_resource(x: sp.Resource[Client]) -> int:
        return 1

    with pytest.raises(sp.FlowDefinitionError, match="'x' is an input of earlier step 'plain' and a resource"):
        bad.step(as_resource)

    async def named_like_a_step(plain: sp.Resource[Client]) -> int:
        return 1

    with pytest.raises(sp.FlowDefinitionError, match="resource parameter 'plain' has the name of an earlier step"):
        bad.step(named_like_a_step)


def test_a_type_checker_sees_the_resources_type() -> None:
    api = pytest.importorskip("mypy.api")
    target = Path(__file__).with_name("typing_resources.py")
    stdout, stderr, status = api.run(["--strict", "--no-error-summary", str(target)])
    assert status == 0, stdout + stderr
