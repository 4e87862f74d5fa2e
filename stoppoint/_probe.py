"""Probes: how `stoppoint.testing` watches a run's stopping points (a hook that costs one attribute
check per step, and nothing per checkpoint, when no probe is attached)."""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["Probe", "attach", "probe_of"]


class Probe(abc.ABC):
    """Told of every stopping point a run passes: `reached(path, flow, step, n)` (`path`: the include
    steps leading to the flow, () at the top), with n = 0 for the
    stopping point before the step starts and 1, 2, ... for each `ctx.checkpoint()` it reaches
    (`iterate()`'s included). A probe may interrupt the run right there with `interrupt()`."""

    deliver: Callable[[Any], None] | None = None  # the run's `on_signal`, once it listens

    def interrupt(self, signal: Any) -> None:
        """Interrupt the run now: the stopping point being reached sees it."""
        assert self.deliver is not None, "the probe is not attached to a running run"
        self.deliver(signal)

    @abc.abstractmethod
    def reached(self, path: tuple[str, ...], flow: str, step: str, n: int) -> None:
        """Step `step` of flow `flow` (reached through the include steps `path`) is at its stopping point `n`."""

    def attached(self, plan: Any) -> None:  # noqa: B027 - a hook a probe may leave alone
        """The run of the flow of `plan` (a `Plan`) is about to listen: check what the probe waits for exists."""

    def counter(self, path: tuple[str, ...], flow: str, step: str) -> Callable[[], None]:
        """What a step's context calls at each of its checkpoints."""
        count = 0

        def checkpoint() -> None:
            nonlocal count
            count += 1
            self.reached(path, flow, step, count)

        return checkpoint


# Probes by the receiver a run listens on: `flow.run(interrupts=interrupt_at(...))` is all a test writes.
_PROBES: weakref.WeakKeyDictionary[Any, Probe] = weakref.WeakKeyDictionary()


def attach(receiver: Any, probe: Probe) -> None:
    _PROBES[receiver] = probe


def probe_of(receiver: Any) -> Probe | None:
    return _PROBES.get(receiver) if receiver is not None else None
