"""Strategies: when an interrupt takes effect.

The interrupt receiver says *whether* a run was asked to stop; a strategy only says *when* that
takes effect. The executor asks three questions of it, once per decision, never per checkpoint:

* `_stops_running_steps`: do steps already running stop at their next stopping point?
* `_may_start(n)`: may another step start, `n` steps having started since the first interrupt?
* `_escalates`: may a forced signal (or the end of `grace`) cancel the steps in flight?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["AtCheckpoint", "FinishCurrent", "IgnoreInterruptions", "PollNextN", "Strategy"]


@dataclass(frozen=True, slots=True)
class Strategy:
    """Base class of the strategies; pass an instance of a subclass to `Flow.run(strategy=)` (the
    base class itself is refused)."""

    _stops_running_steps: ClassVar[bool] = False
    _escalates: ClassVar[bool] = True

    def _may_start(self, started_since_interrupt: int) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class AtCheckpoint(Strategy):
    """Stop at the next stopping point (the default).

    Running steps stop at their next `ctx.checkpoint()` (a step without one runs to its end) and no
    new step starts.
    """

    _stops_running_steps: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class FinishCurrent(Strategy):
    """Let running steps finish (their checkpoints do not stop them); start no new step."""


@dataclass(frozen=True, slots=True)
class PollNextN(Strategy):
    """Let `n` more steps start (and finish) after the first interrupt, then act as `FinishCurrent`.

    Steps already running when the interrupt arrives finish and do not count. In a flow that
    includes other flows, the steps of the included flows count (the include step itself does
    not: it only holds them). With `sp.interruptible()`, `n` counts items instead.

    Args:
        n: How many more steps may start: an int >= 0.

    Raises:
        ValueError: `n` is not an int >= 0.
    """

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"PollNextN(n): n must be an int >= 0, got {self.n!r}")

    def _may_start(self, started_since_interrupt: int) -> bool:
        return started_since_interrupt < self.n


@dataclass(frozen=True, slots=True)
class IgnoreInterruptions(Strategy):
    """Run to completion: signals are only recorded in `report.interrupts`, even forced ones."""

    _escalates: ClassVar[bool] = False

    def _may_start(self, started_since_interrupt: int) -> bool:
        return True
