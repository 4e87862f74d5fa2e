"""`stoppoint run` makes a new run: of several commands started at once with one `--run-id`, exactly one runs.

The command looks the id up first (a stored run is `resume`'s), but another command can store it right after.
So the store the command hands its run is this proxy: its `claim()` passes the command's labels (the run's
target) and refuses a run that is stored already, and its `load()` finds nothing, so that `run()` goes straight
to the claim. The store's claim is atomic: a racing command whose run is live gets `RunOwned`; one whose run
was stored meanwhile and ended gets `RunIdTaken`. Everything else is the store's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._errors import StoreError
from ._lease import Claim
from ._store import RunState, Store, StoredRun

__all__ = ["NewRun", "RunIdTaken"]


class RunIdTaken(StoreError):
    """Another command stored the run id first."""


class NewRun:
    """A `Store` (delegating to `store`) for a run that must be new: see the module docstring."""

    def __init__(self, store: Store, labels: Mapping[str, str]) -> None:
        self._store = store
        self._labels = dict(labels)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def load(self, flow: str, run_id: str) -> StoredRun | None:
        return None  # a run stored meanwhile is another command's, not this one's to resume

    async def claim(
        self,
        flow: str,
        run_id: str,
        owner: str,
        *,
        new: RunState | None = None,
        labels: Mapping[str, str] | None = None,
        reopen: bool = False,
    ) -> Claim | None:
        claim = await self._store.claim(flow, run_id, owner, new=new, labels={**self._labels, **(labels or {})})
        if claim is not None and claim.stored is not None:
            if claim.lease is not None:
                await self._store.release(claim.lease)
            raise RunIdTaken(
                f"run {run_id!r} is already in the store: another command started it meanwhile, and may be "
                "running it now"
            )
        return claim
