"""Flows the CLI tests run with `stoppoint run tests/cli_flows.py:NAME` (not a test module)."""

import anyio
from pydantic import BaseModel

import stoppoint as sp


class Settings(BaseModel):
    name: str
    retries: int


typed = sp.Flow("typed")


@typed.step
async def total(count: int, items: list[int], settings: Settings, label: str = "sum") -> str:
    return f"{label}={count + sum(items) + settings.retries} for {settings.name}"


failing = sp.Flow("failing")


@failing.step
async def fine() -> int:
    return 1


@failing.step
async def broken(fine: int) -> int:
    raise ValueError("the disk is full")


stubborn = sp.Flow("stubborn")


@stubborn.step
async def wait_long(ctx: sp.StepContext) -> None:
    await anyio.sleep_forever()  # no stopping point: only a forced stop (Ctrl-C twice) ends it


not_a_flow = 42
