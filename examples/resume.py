"""Stop a run today, finish it tomorrow: a persisted run interrupted in one process, resumed in another.

Run it with `python examples/resume.py`. It starts this same script twice, as two separate processes sharing one
SQLite file:

1. the first process runs a nightly report flow (`fetch -> aggregate -> render -> publish`) with a store and a
   run id; an operator stops it while `render` works through its pages, and the process exits;
2. the second process runs the flow again with the same store and run id: the store holds the run unfinished,
   so the completed steps are not run again (their outputs come back from the file, typed), `render` starts
   over, and the run completes.

Each process prints what it ran; `main()` returns both outcomes' summaries for the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

import stoppoint as sp

RUN_ID = "nightly-2026-11-27"


class Sales(BaseModel):
    """One region's sales, as fetched."""

    region: str
    amounts: list[float]


@dataclass(frozen=True)
class Totals:
    """What `aggregate` computes."""

    by_region: dict[str, float]
    grand_total: float


flow = sp.Flow("nightly-report")
ran: list[str] = []


@flow.step
async def fetch(regions: list[str]) -> list[Sales]:
    ran.append("fetch")
    return [Sales(region=r, amounts=[float(len(r)) * k for k in range(1, 4)]) for r in regions]


@flow.step
async def aggregate(fetch: list[Sales]) -> Totals:
    ran.append("aggregate")
    by_region = {s.region: sum(s.amounts) for s in fetch}
    return Totals(by_region=by_region, grand_total=sum(by_region.values()))


@flow.step
async def render(ctx: sp.StepContext, aggregate: Totals) -> list[str]:
    ran.append("render")
    pages = []
    async for region in ctx.iterate(sorted(aggregate.by_region)):
        pages.append(f"{region}: {aggregate.by_region[region]:.2f}")
        ctx.progress(len(pages), len(aggregate.by_region), region)
        if len(pages) == STOP_AFTER_PAGE:
            OPERATOR.interrupt("maintenance window", source="operator")  # the next stopping point stops
    return pages


@flow.step
async def publish(render: list[str], aggregate: Totals) -> str:
    ran.append("publish")
    return f"{len(render)} pages, total {aggregate.grand_total:.2f}"


OPERATOR: sp.Interrupter
STOP_AFTER_PAGE: int | None = None  # where the operator steps in (first process only)


async def attempt(path: Path) -> dict[str, Any]:
    """One process's attempt at the run: the store decides whether it starts or resumes."""
    global OPERATOR
    interrupter, receiver = sp.interrupt_channel()
    OPERATOR = interrupter
    inputs = {"regions": ["north", "south", "east", "west"]}
    with interrupter, receiver:
        async with sp.SQLiteStore(path) as store:
            outcome = await flow.run(inputs, interrupts=receiver, store=store, run_id=RUN_ID)
            records = await store.list_runs(flow.name)
    summary: dict[str, Any] = {
        "ran": ran,
        "resumed": [name for name, step in outcome.report.steps.items() if step.resumed],
        "stored_status": [r.status.value for r in records],
    }
    match outcome:
        case sp.Completed(value):
            summary["outcome"] = "completed"
            summary["value"] = value
        case sp.Interrupted(signal, report):
            summary["outcome"] = "interrupted"
            summary["reason"] = signal.reason
            summary["stopped_at"] = report.steps["render"].stopped_at
            summary["progress"] = report.steps["render"].progress.done if report.steps["render"].progress else None
    return summary


def in_new_process(path: Path, which: str) -> dict[str, Any]:
    """Run this script as a fresh process for one attempt and read back its summary."""
    done = subprocess.run(
        [sys.executable, __file__, which, str(path)], check=True, capture_output=True, text=True, timeout=120
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "runs.db"
        first = in_new_process(path, "first")
        print(f"process 1: ran {first['ran']}; {first['outcome']} ({first['reason']}) at {first['stopped_at']}")
        second = in_new_process(path, "second")
        print(f"process 2: reused {second['resumed']}, ran {second['ran']}; {second['outcome']}: {second['value']}")
    return {"first": first, "second": second}


if __name__ == "__main__":
    if len(sys.argv) == 3:
        STOP_AFTER_PAGE = 2 if sys.argv[1] == "first" else None
        print(json.dumps(anyio.run(attempt, Path(sys.argv[2]))))
    else:
        main()
