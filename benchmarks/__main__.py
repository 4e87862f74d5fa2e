"""stoppoint's benchmarks: every scenario reported with a ratio against a baseline measured in
the same run, and the targets of issue 5 (Performance) printed as met / not met.

    python -m benchmarks                 # full run, a few minutes
    python -m benchmarks --quick         # smoke run for CI: seconds; timings printed, never asserted
    python -m benchmarks --backend trio  # the in-process scenarios on trio (latency covers all backends)
    python -m benchmarks --markdown      # the tables as Markdown (docs/benchmarks.md)

Absolute times on shared machines are noisy (tens of percent between runs); the ratios are what
the targets use. Peers (Prefect 3) and asyncio+uvloop need the `bench` extra:
`pip install -e '.[bench]'`; without it they are skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
from importlib import metadata

import anyio

from . import across, dashboard, latency, peers, persisted, postgres, saves, scale, steps, stopping_point
from ._measure import Report

SECTIONS = [
    "stopping-point",
    "steps",
    "latency",
    "scale",
    "peers",
    "persisted",
    "saves",
    "across",
    "postgres",
    "dashboard",
]


def _versions() -> str:
    names = ["anyio", "trio", "pydantic", "uvloop", "prefect"]
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return f"CPython {platform.python_version()} on {platform.machine()} ({platform.system()}); " + ", ".join(found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this group of scenarios (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    backend = args.backend

    only = set(args.only or SECTIONS)

    report = Report()
    n, repeats = (20_000, 3) if quick else (1_000_000, 7)
    chain_steps, width = (1_000, 100) if quick else (10_000, 1_000)
    flows, step_sizes, flow_counts = (
        (500, [100, 1_000], [100, 1_000]) if quick else (10_000, [1_000, 10_000, 100_000], [1_000, 10_000])
    )
    if "stopping-point" in only:
        anyio.run(stopping_point.measure, report, n, repeats, backend=backend)
    if "steps" in only:
        anyio.run(steps.measure, report, chain_steps, width, repeats, backend=backend)
    if "latency" in only:
        latency.measure(report, 10 if quick else 300)
    if "scale" in only:
        anyio.run(scale.measure, report, flows, step_sizes, flow_counts, 3 if quick else 7, backend=backend)
    if "peers" in only:
        anyio.run(peers.measure, report, chain_steps, repeats, not quick, backend=backend)
    if "persisted" in only:
        sizes = [20, 1_000] if quick else [20, 1_000, 10_000]
        # quick: whole saves (0.1, quadratic) at 20 steps only, to keep the smoke run short
        anyio.run(persisted.measure, report, sizes, 1 if quick else 3, 20 if quick else 1_000, backend=backend)
    if "saves" in only:
        anyio.run(saves.measure, report, 100 if quick else 2_000, 1 if quick else 5, backend=backend)
    if "across" in only:
        anyio.run(across.measure, report, 1 if quick else 5, 1 if quick else 3, backend, backend=backend)
    if "postgres" in only:
        # on the server STOPPOINT_BENCH_PG_DSN names (skipped, with a line saying so, when none answers)
        sizes = [20, 100] if quick else [20, 1_000, 10_000]
        anyio.run(
            postgres.measure,
            report,
            sizes,
            1 if quick else 3,
            1 if quick else 5,
            1 if quick else 3,
            backend,
            backend=backend,
        )

    if "dashboard" in only:
        anyio.run(dashboard.measure, report, 100 if quick else 1_000, 1 if quick else 5, backend=backend)

    header = f"backend: {backend}{' (quick)' if quick else ''}; {_versions()}"
    if args.markdown:
        print(f"{header}\n\n{report.markdown()}")
    else:
        print(f"{header}\n\n{report.text()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
