"""Standalone interruptible iteration: `interruptible(source, interrupts, strategy=...)`."""

from __future__ import annotations

__all__ = ["interruptible"]


def interruptible() -> None:
    """Placeholder while the module is being written."""
