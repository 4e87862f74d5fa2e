"""Leases: who owns a stored run now, and the queues workers claim runs from.

A run with a store has one owner at a time, the process executing it. The lease says who (`owner`), which
claim this is (`epoch`, +1 at every claim: the fencing token every write of the run carries) and until when
(`expires_at`); the owner renews it every `lease / 3` seconds (see `_renewal.py`).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime

from ._store import StoredRun

__all__ = ["Claim", "Lease", "Queue", "check_lease", "process_owner"]

_OWNER: str | None = None
_OWNER_PID: int | None = None


def process_owner() -> str:
    """This process's owner name, `host:pid/token`: unique per process start (the token is random, so a
    reused pid is another owner), stable for the process's life (a fork gets its own)."""
    global _OWNER, _OWNER_PID
    pid = os.getpid()
    if _OWNER is None or pid != _OWNER_PID:
        _OWNER, _OWNER_PID = f"{socket.gethostname()}:{pid}/{secrets.token_hex(4)}", pid
    return _OWNER


def check_lease(store: str, lease: object) -> float:
    """The `lease=` a store was made with, as seconds (`store` names the store in the message).

    Raises:
        TypeError: `lease` is not a finite number of seconds > 0 (a bool is not a number here).
    """
    if isinstance(lease, bool) or not isinstance(lease, int | float) or not 0 < lease < float("inf"):
        raise TypeError(f"{store}(lease=...): lease must be a number of seconds > 0, got {lease!r}")
    return float(lease)


@dataclass(frozen=True, slots=True)
class Lease:
    """One claim of one run: what every write of the run carries, so that the store refuses it once
    another claim came since.

    Attributes:
        flow: The flow's name.
        run_id: The run's id.
        owner: Who claimed it (`host:pid/token`).
        epoch: The claim's number: 1 for the first, +1 at every claim after.
        expires_at: Until when the claim holds without a renewal (UTC), as the store computed it.
    """

    flow: str
    run_id: str
    owner: str
    epoch: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Claim:
    """What `Store.claim()` and `Store.claim_next()` return.

    Attributes:
        lease: The claim, or None when the stored run is completed (nothing to run, nothing claimed).
        stored: The run as it was stored when claimed (its latest checkpoint and report), or None when
            the claim created it.
    """

    lease: Lease | None
    stored: StoredRun | None


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue of submitted runs, with an optional limit on how many of its runs run at once, across
    every worker of the store (the store enforces it when a worker claims).

    Args:
        name: The queue's name (`flow.submit(..., queue=name)`).
        concurrency: At most this many of its runs running at a time, in all workers; None: no limit.

    Raises:
        TypeError: `name` is not a non-empty str, or `concurrency` not None or an int >= 1.
    """

    name: str
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Queue(name): name must be a non-empty str, got {self.name!r}")
        limit = self.concurrency
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise TypeError(f"Queue({self.name!r}): concurrency must be None or an int >= 1, got {limit!r}")
