"""Timing helpers and the report every scenario writes into: rows (a measurement and its ratio
against a baseline measured in the same run) and targets (met / not met)."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field


async def per_item(bodies: Mapping[str, Callable[[int], Awaitable[object]]], n: int, repeats: int) -> dict[str, float]:
    """Median seconds per item of `await body(n)` (a loop of n items) for each body, over
    `repeats` rounds.

    Each round runs every body once, in turn, so that the machine's slow drift (tens of percent
    over a minute on shared machines) affects a body and its baseline alike. Garbage is collected
    before each run, so one run does not pay for the garbage of the one before it; the collector
    stays on while a run is timed, since it is part of what a run costs.
    """
    samples: dict[str, list[float]] = {name: [] for name in bodies}
    for _ in range(repeats):
        for name, body in bodies.items():
            gc.collect()
            t0 = time.perf_counter()
            await body(n)
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(times) for name, times in samples.items()}


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `samples`, nearest-rank."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e9:.1f} ns"


def _format_bytes(size: float) -> str:
    return f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size:.0f} B"


@dataclass
class Row:
    name: str
    value: float  # seconds, or bytes when `unit` is "bytes"
    baseline: str | None = None  # name of the row this one is compared with
    ratio: float | None = None
    p99: float | None = None
    unit: str = "s"
    note: str = ""

    def shown(self) -> str:
        if self.unit == "bytes":
            return _format_bytes(self.value)
        text = _format_time(self.value)
        if self.p99 is not None:
            text += f" (p99 {_format_time(self.p99)})"
        return text


@dataclass
class Target:
    label: str
    measured: str
    met: bool | None  # None: not measured in this run (say why in `measured`)


@dataclass
class Section:
    title: str
    rows: list[Row] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: float,
        *,
        baseline: str | None = None,
        p99: float | None = None,
        unit: str = "s",
        note: str = "",
    ) -> Row:
        ratio = None
        if baseline == name:
            ratio = 1.0
        elif baseline is not None:
            base = self.get(baseline)
            ratio = value / base.value if base.value else math.inf
        row = Row(name, value, baseline, ratio, p99, unit, note)
        self.rows.append(row)
        return row

    def get(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"section {self.title!r} has no row {name!r}")


@dataclass
class Report:
    sections: list[Section] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def section(self, title: str) -> Section:
        section = Section(title)
        self.sections.append(section)
        return section

    def target(self, label: str, ratio: float | None, limit: float | None, *, unit: str = "x", why: str = "") -> None:
        """A target `ratio <= limit` (None ratio: not measured, `why` says why)."""
        if ratio is None or limit is None:
            self.targets.append(Target(label, why or "not measured", None))
            return
        shown = f"{ratio:.2f}{unit}" if unit == "x" else f"{ratio * 1e3:.2f} ms"
        limit_shown = f"{limit:g}{unit}" if unit == "x" else f"{limit * 1e3:.2f} ms"
        self.targets.append(Target(label, f"{shown} (limit {limit_shown}){' ' + why if why else ''}", ratio <= limit))

    def text(self) -> str:
        lines = []
        width = max((len(row.name) for section in self.sections for row in section.rows), default=40)
        for section in self.sections:
            lines.append(f"## {section.title}")
            for row in section.rows:
                ratio = f"{row.ratio:8.2f}x {row.baseline}" if row.ratio is not None else ""
                lines.append(f"  {row.name:<{width}}  {row.shown():>26}  {ratio}{'  ' + row.note if row.note else ''}")
            lines.append("")
        lines.append("## Targets")
        for target in self.targets:
            state = "skipped" if target.met is None else ("met" if target.met else "NOT MET")
            lines.append(f"  [{state:^7}] {target.label}: {target.measured}")
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = []
        for section in self.sections:
            lines += [f"### {section.title}", "", "| scenario | median | ratio | against |", "|---|---:|---:|---|"]
            for row in section.rows:
                ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
                name = row.name + (f" ({row.note})" if row.note else "")
                lines.append(f"| {name} | {row.shown()} | {ratio} | {row.baseline or ''} |")
            lines.append("")
        lines += ["### Targets", "", "| target | measured | |", "|---|---|---|"]
        for target in self.targets:
            state = "skipped" if target.met is None else ("met" if target.met else "**not met**")
            lines.append(f"| {target.label} | {target.measured} | {state} |")
        return "\n".join(lines) + "\n"
