"""Run by `benchmarks.peers` in a subprocess: seconds per step of an N-step chain of `x + 1`
bodies, as Prefect 3 tasks in a flow and as a stoppoint flow, printed as one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from prefect import flow, task

from .peers import add_one, counting_chain


@task
async def body(x: int) -> int:
    return await add_one(x)


@flow
async def prefect_chain(n: int) -> int:
    value = 0
    for _ in range(n):
        value = await body(value)
    return value


async def main(steps: int) -> dict[str, float]:
    await prefect_chain(3)  # starts the local server: not part of the per-step cost
    t0 = time.perf_counter()
    assert await prefect_chain(steps) == steps
    prefect = (time.perf_counter() - t0) / steps

    ours = counting_chain(steps)
    await ours.run()
    t0 = time.perf_counter()
    outcome = await ours.run()
    stoppoint = (time.perf_counter() - t0) / steps
    assert outcome.value == steps  # type: ignore[union-attr]
    return {"prefect": prefect, "stoppoint": stoppoint}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
