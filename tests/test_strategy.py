"""Strategies are small frozen values (API.md §5)."""

import dataclasses

import pytest

import stoppoint as sp


def test_strategies_are_frozen_comparable_and_hashable() -> None:
    assert sp.AtCheckpoint() == sp.AtCheckpoint()
    assert sp.FinishCurrent() == sp.FinishCurrent()
    assert sp.AtCheckpoint() != sp.FinishCurrent()
    assert len({sp.AtCheckpoint(), sp.AtCheckpoint(), sp.FinishCurrent()}) == 2
    assert repr(sp.FinishCurrent()) == "FinishCurrent()"
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        sp.AtCheckpoint().x = 1  # type: ignore[attr-defined]


def test_what_each_strategy_allows() -> None:
    # The executor's two questions (see _strategy.py); pinned here so new strategies keep them.
    assert sp.AtCheckpoint()._stops_running_steps is True
    for strategy in (sp.FinishCurrent(), sp.PollNextN(2), sp.IgnoreInterruptions()):
        assert strategy._stops_running_steps is False
    for strategy in (sp.AtCheckpoint(), sp.FinishCurrent(), sp.PollNextN(0)):
        assert strategy._may_start(0) is False
    assert [sp.PollNextN(2)._may_start(n) for n in range(4)] == [True, True, False, False]
    assert all(sp.IgnoreInterruptions()._may_start(n) for n in range(4))
    assert sp.IgnoreInterruptions()._escalates is False
    for strategy in (sp.AtCheckpoint(), sp.FinishCurrent(), sp.PollNextN(1)):
        assert strategy._escalates is True
