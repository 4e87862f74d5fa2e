"""How to test your own flow with stoppoint.testing: run it with `pytest examples/testing_my_flow.py`.

The fixtures `interrupter` and `interrupt_receiver` come from stoppoint's pytest plugin (installed with
stoppoint); they work under anyio's pytest plugin (shown here) and under pytest-asyncio alike.
"""

from __future__ import annotations

import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

import stoppoint as sp
from stoppoint.testing import check_resumable, count_stopping_points, interrupt_at

invoice = sp.Flow("invoice")


@invoice.step
async def lines(customer: str) -> list[int]:
    return [120, 80, 45]


@invoice.step
async def priced(ctx: sp.StepContext, lines: list[int]) -> list[int]:
    out = []
    async for amount in ctx.iterate(lines):
        out.append(round(amount * 1.2))
    return out


@invoice.step
async def total(priced: list[int]) -> int:
    return sum(priced)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_stopping_before_pricing_keeps_the_lines(anyio_backend: str) -> None:
    outcome = await invoice.run({"customer": "acme"}, interrupts=interrupt_at("priced"))
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.checkpoint.outputs == {"lines": [120, 80, 45]}


@pytest.mark.anyio
async def test_every_stopping_point_resumes_to_the_same_total(anyio_backend: str) -> None:
    assert await count_stopping_points(invoice, {"customer": "acme"}) == 6  # 3 steps + 3 items
    report = await check_resumable(invoice, {"customer": "acme"})
    assert report.value == 294


@pytest.mark.anyio
async def test_an_operator_stop_from_another_task(
    anyio_backend: str, interrupter: sp.Interrupter, interrupt_receiver: MemoryObjectReceiveStream[sp.InterruptSignal]
) -> None:
    interrupter.interrupt("operator", source="test")  # waiting in the stream: the run stops before its first step
    outcome = await invoice.run({"customer": "acme"}, interrupts=interrupt_receiver)
    assert isinstance(outcome, sp.Interrupted)
    assert outcome.report.not_started == ["lines", "priced", "total"]


@pytest.mark.asyncio
async def test_the_fixtures_under_pytest_asyncio(
    interrupter: sp.Interrupter, interrupt_receiver: MemoryObjectReceiveStream[sp.InterruptSignal]
) -> None:
    interrupter.interrupt("operator", source="test")
    outcome = await invoice.run({"customer": "acme"}, interrupts=interrupt_receiver)
    assert isinstance(outcome, sp.Interrupted)
