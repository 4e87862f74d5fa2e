"""Compare the hot paths of the working tree with those of an earlier revision, in one process.

    python -m benchmarks.compare REV [--backend trio] [--rounds 40]

Timings on a shared machine drift by tens of percent between runs, so two separate runs of
`python -m benchmarks` cannot show a 10% change. This loads the package as it was at `REV` (via
`git archive`, under another name) next to the working tree's, alternates the two in the same
process, and prints the best time of each and their ratio.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio

import stoppoint


def load_revision(rev: str, into: Path) -> ModuleType:
    """Import the `stoppoint` package of git revision `rev` as `stoppoint_at_rev`."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", rev, "stoppoint"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "stoppoint").rename(into / "stoppoint_at_rev")  # its imports are relative: any name works
    sys.path.insert(0, str(into))
    return importlib.import_module("stoppoint_at_rev")


def chain(sp: Any, steps: int, with_ctx: bool) -> Any:
    if with_ctx:

        async def step(ctx: Any) -> None:  # named ctx: it gets the step's context
            pass

    else:

        async def step() -> None:  # type: ignore[misc]
            pass

    flow = sp.Flow("chain")
    for i in range(steps):
        flow.step(name=f"s{i}", after=(f"s{i - 1}",) if i else ())(step)
    return flow


def checkpoints(sp: Any, n: int) -> Callable[[], Awaitable[None]]:
    async def loop() -> None:
        ctx = sp.StepContext(run_id="r", flow="f", step="s")
        for _ in range(n):
            await ctx.checkpoint()

    return loop


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


def iterations(sp: Any, n: int, source: Callable[[int], Any], through: str) -> Callable[[], Awaitable[None]]:
    """A loop over `source(n)` through `ctx.iterate()` (every=1) or `sp.interruptible()` (no interrupts)."""

    async def loop() -> None:
        if through == "iterate":
            items = sp.StepContext(run_id="r", flow="f", step="s").iterate(source(n))
        else:
            items = sp.interruptible(source(n), None)
        async for _ in items:
            pass

    return loop


async def compare(old: ModuleType, rounds: int) -> None:
    steps, points = 5_000, 200_000
    cases: dict[str, tuple[float, Callable[[Any], Callable[[], Awaitable[Any]]]]] = {
        "chain step, steps take ctx": (steps, lambda sp: chain(sp, steps, True).run),
        "chain step, steps take nothing": (steps, lambda sp: chain(sp, steps, False).run),
        "await ctx.checkpoint()": (points, lambda sp: checkpoints(sp, points)),
        "ctx.iterate(range), per item": (points, lambda sp: iterations(sp, points, range, "iterate")),
        "ctx.iterate(async gen), per item": (points, lambda sp: iterations(sp, points, numbers, "iterate")),
        "interruptible(range), per item": (points, lambda sp: iterations(sp, points, range, "interruptible")),
        "interruptible(async gen), per item": (points, lambda sp: iterations(sp, points, numbers, "interruptible")),
    }
    for label, (count, make) in cases.items():
        runs = {"rev": make(old), "tree": make(stoppoint)}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                await run()
                best[name] = min(best[name], time.perf_counter() - start)
        rev, tree = (best[k] / count * 1e6 for k in ("rev", "tree"))
        print(f"  {label:34} rev {rev:7.3f} µs   tree {tree:7.3f} µs   tree/rev {tree / rev:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="git revision to compare the working tree with")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(args.rev, Path(tmp))
        print(f"backend: {args.backend}; best of {args.rounds} alternating rounds; working tree vs {args.rev}")
        anyio.run(compare, old, args.rounds, backend=args.backend)


if __name__ == "__main__":
    main()
