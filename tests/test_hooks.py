"""The hooks of `tests/hooks.py` see the writes the runtime makes, on both paths, where the old `save()` calls were."""

from __future__ import annotations

import itertools

import pytest

import stoppoint as sp

from .hooks import BasicOnly, HookedStore, Write, committed, hooked_store

pytestmark = pytest.mark.anyio


def a_b_and_an_include() -> sp.Flow:
    inner = sp.Flow("inner")

    @inner.step
    async def x() -> int:
        return 1

    outer = sp.Flow("outer")

    @outer.step
    async def a() -> int:
        return 1

    @outer.step
    async def b(a: int) -> int:
        return a + 1

    outer.include(inner, name="inc")
    return outer


def test_the_two_paths() -> None:
    assert isinstance(HookedStore(), sp.Store)
    assert isinstance(HookedStore(), sp.LabelStore)
    assert isinstance(BasicOnly(), sp.BasicStore)
    assert not isinstance(BasicOnly(), sp.Store)


@pytest.mark.parametrize("path", ["leased", "whole"])
def test_a_hooked_store_refuses_an_attribute_that_would_hide_a_store_method(path: str) -> None:
    store = hooked_store(path)
    for name in ("release", "write", "finish", "save", "load"):
        with pytest.raises(AttributeError, match=f"would hide the store's {name}"):
            setattr(store, name, object())
    store.before_hook = store.after_hook  # hooks and the test's own attributes are fine


@pytest.mark.parametrize("path", ["leased", "whole"])
async def test_each_write_is_seen_before_and_after_in_order(path: str) -> None:
    """a, b and the include's x run one after the other here: the start, a's commit, b's, x's (inside
    the include), the include's, and the end: six writes, each seen before and after, one at a time."""
    seen: list[tuple[str, Write]] = []
    store = hooked_store(path)

    async def before(write: Write) -> None:
        seen.append(("before", write))

    async def after(write: Write) -> None:
        seen.append(("after", write))

    store.before_hook, store.after_hook = before, after
    flow = sp.Flow("line")
    inner = sp.Flow("inner")

    @inner.step
    async def x(b: int) -> int:
        return b + 1

    @flow.step
    async def a() -> int:
        return 1

    @flow.step
    async def b(a: int) -> int:
        return a + 1

    flow.include(inner, name="inc")
    outcome = await flow.run(store=store, run_id="r")
    assert isinstance(outcome, sp.Completed)
    assert [when for when, _ in seen] == ["before", "after"] * 6
    writes = [write for _, write in seen[::2]]
    assert [write for _, write in seen[1::2]] == writes
    assert [write.n for write in writes] == [0, 1, 2, 3, 4, 5]
    assert store.begun == 6
    assert [(write.start, write.final) for write in writes] == [(True, False)] + [(False, False)] * 4 + [(False, True)]
    assert [(write.outputs, write.nested("inc")) for write in writes[1:5]] == (
        [({"a"}, set()), ({"b"}, set()), (set(), {"x"}), ({"inc"}, set())]
        if path == "leased"
        else [({"a"}, set()), ({"a", "b"}, set()), ({"a", "b"}, {"x"}), ({"a", "b", "inc"}, set())]
    )
    if path == "leased":
        assert [(write.kind, write.step) for write in writes] == [
            ("write", None),
            ("commit_step", "a"),
            ("commit_step", "b"),
            ("commit_step", "inc"),
            ("commit_step", "inc"),
            ("finish", None),
        ]
    else:
        assert {write.kind for write in writes} == {"save"}
    assert all(write.report is not None for write in writes if write.kind != "commit_step")


@pytest.mark.parametrize("path", ["leased", "whole"])
async def test_after_a_write_the_store_holds_what_it_committed(path: str) -> None:
    loaded: list[tuple[set[str], set[str]]] = []
    store = hooked_store(path)

    async def after(write: Write) -> None:
        checkpoint = await committed(store, "outer", "r")
        assert checkpoint is not None
        inner = checkpoint.nested.get("inc")
        loaded.append((set(checkpoint.outputs), set() if inner is None else set(inner.outputs)))
        assert write.outputs <= set(checkpoint.outputs)

    store.after_hook = after
    await a_b_and_an_include().run(store=store, run_id="r")
    outputs = [top for top, _ in loaded]
    assert outputs[0] == set()
    assert all(earlier <= later for earlier, later in itertools.pairwise(outputs))  # only ever grows
    assert outputs[-1] == {"a", "b", "inc"}
    assert any(inner == {"x"} for _, inner in loaded)  # x was committed inside the include before it completed
    assert loaded[-1][1] == set()  # the completed include's own checkpoint is dropped


async def test_a_failing_hook_writes_nothing() -> None:
    async def before(write: Write) -> None:
        if write.kind == "commit_step":
            raise sp.StoreError("disk full")

    store = HookedStore(before=before)
    with pytest.raises(sp.StoreError, match="disk full"):
        await a_b_and_an_include().run(store=store, run_id="r")
    checkpoint = await committed(store, "outer", "r")
    assert checkpoint is not None
    assert checkpoint.outputs == {}
