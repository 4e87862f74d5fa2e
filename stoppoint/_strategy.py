"""Strategies: when an interrupt takes effect.

The interrupt receiver says *whether* a run was asked to stop; a strategy only says *when* that
takes effect. The executor asks two questions of it, once per decision, never per checkpoint:

* `_stops_running_steps`: do steps already running stop at their next stopping point?
* `_may_start(n)`: may another step start, `n` steps having started since the first interrupt?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["AtCheckpoint", "FinishCurrent", "Strategy"]


@dataclass(frozen=True, slots=True)
class Strategy:
    """Base class of the strategies; pass an instance of a subclass to `Flow.run(strategy=)`."""

    _stops_running_steps: ClassVar[bool] = False

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
