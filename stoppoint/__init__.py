"""stoppoint: interruptible async work that stops at the stopping points you choose.

Declare async steps on a `Flow`, run it, and stop it from anywhere with an `Interrupter`: the run
halts at the next stopping point and returns either `Completed` or `Interrupted`, with a report of
what finished, what stopped where, and what never started.
"""

from typing import TYPE_CHECKING

from ._checkpoint import Checkpoint as Checkpoint
from ._context import Shield as Shield
from ._context import StepContext as StepContext
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointMismatch as CheckpointMismatch
from ._errors import FlowDefinitionError as FlowDefinitionError
from ._errors import FlowInputError as FlowInputError
from ._errors import LeaseLost as LeaseLost
from ._errors import RunOwned as RunOwned
from ._errors import StepFailed as StepFailed
from ._errors import StepTimeout as StepTimeout
from ._errors import StoppointError as StoppointError
from ._errors import StopRequested as StopRequested
from ._errors import StoreError as StoreError
from ._events import Event as Event
from ._events import FlowCompletedEvent as FlowCompletedEvent
from ._events import FlowFailedEvent as FlowFailedEvent
from ._events import FlowInterruptedEvent as FlowInterruptedEvent
from ._events import FlowStartedEvent as FlowStartedEvent
from ._events import InterruptReceivedEvent as InterruptReceivedEvent
from ._events import RunEvent as RunEvent
from ._events import StepCancelledEvent as StepCancelledEvent
from ._events import StepCompletedEvent as StepCompletedEvent
from ._events import StepFailedEvent as StepFailedEvent
from ._events import StepProgressEvent as StepProgressEvent
from ._events import StepRetryingEvent as StepRetryingEvent
from ._events import StepStartedEvent as StepStartedEvent
from ._events import StepStoppedEvent as StepStoppedEvent
from ._feed import EventStream as EventStream
from ._flow import Flow as Flow
from ._handle import FlowRun as FlowRun
from ._interruptible import Interruptible as Interruptible
from ._interruptible import interruptible as interruptible
from ._lease import Claim as Claim
from ._lease import Lease as Lease
from ._lease import Queue as Queue
from ._memory import MemoryStore as MemoryStore
from ._os_signals import OnSignals as OnSignals
from ._os_signals import interrupt_on_signals as interrupt_on_signals
from ._outcome import Completed as Completed
from ._outcome import Interrupted as Interrupted
from ._outcome import Progress as Progress
from ._outcome import RunReport as RunReport
from ._outcome import StepReport as StepReport
from ._outcome import StepStatus as StepStatus
from ._resource import Resource as Resource
from ._retry import Retry as Retry
from ._signal import Interrupter as Interrupter
from ._signal import InterruptSignal as InterruptSignal
from ._signal import interrupt_channel as interrupt_channel
from ._sqlite import SQLiteStore as SQLiteStore
from ._store import BasicStore as BasicStore
from ._store import EventStore as EventStore
from ._store import LabelStore as LabelStore
from ._store import RunRecord as RunRecord
from ._store import RunState as RunState
from ._store import RunStatus as RunStatus
from ._store import StepRow as StepRow
from ._store import Store as Store
from ._store import StoredEvents as StoredEvents
from ._store import StoredRun as StoredRun
from ._strategy import AtCheckpoint as AtCheckpoint
from ._strategy import FinishCurrent as FinishCurrent
from ._strategy import IgnoreInterruptions as IgnoreInterruptions
from ._strategy import PollNextN as PollNextN
from ._strategy import Strategy as Strategy
from ._worker import Worker as Worker

__version__ = "0.1.0"

__all__ = [
    "AtCheckpoint",
    "BasicStore",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatch",
    "Claim",
    "Completed",
    "Event",
    "EventStore",
    "EventStream",
    "FinishCurrent",
    "Flow",
    "FlowCompletedEvent",
    "FlowDefinitionError",
    "FlowFailedEvent",
    "FlowInputError",
    "FlowInterruptedEvent",
    "FlowRun",
    "FlowStartedEvent",
    "IgnoreInterruptions",
    "InterruptReceivedEvent",
    "InterruptSignal",
    "Interrupted",
    "Interrupter",
    "Interruptible",
    "LabelStore",
    "Lease",
    "LeaseLost",
    "MemoryStore",
    "OnSignals",
    "PollNextN",
    "PostgresStore",
    "Progress",
    "Queue",
    "Resource",
    "Retry",
    "RunEvent",
    "RunOwned",
    "RunRecord",
    "RunReport",
    "RunState",
    "RunStatus",
    "SQLiteStore",
    "Shield",
    "StepCancelledEvent",
    "StepCompletedEvent",
    "StepContext",
    "StepFailed",
    "StepFailedEvent",
    "StepProgressEvent",
    "StepReport",
    "StepRetryingEvent",
    "StepRow",
    "StepStartedEvent",
    "StepStatus",
    "StepStoppedEvent",
    "StepTimeout",
    "StopRequested",
    "StoppointError",
    "Store",
    "StoreError",
    "StoredEvents",
    "StoredRun",
    "Strategy",
    "Worker",
    "dashboard",
    "interrupt_channel",
    "interrupt_on_signals",
    "interruptible",
]

_LAZY = ("PostgresStore", "dashboard")

# Public objects say they live in `stoppoint`, so reprs, docs and pickled names use the public path.
for _name in __all__:
    if _name in _LAZY:
        continue  # imported on first use (below): psycopg and starlette are optional extras
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("stoppoint._"):
        _obj.__module__ = __name__
del _name, _obj


if TYPE_CHECKING:
    from ._postgres import PostgresStore as PostgresStore
    from ._ui import dashboard as dashboard


def __getattr__(name: str) -> object:
    """`stoppoint.PostgresStore` and `stoppoint.dashboard`, imported on first use, so that `import stoppoint`
    needs neither psycopg (the `postgres` extra) nor starlette (the `ui` extra)."""
    if name == "PostgresStore":
        from ._postgres import PostgresStore

        PostgresStore.__module__ = __name__
        globals()[name] = PostgresStore
        return PostgresStore
    if name == "dashboard":
        from ._ui import dashboard

        dashboard.__module__ = __name__
        globals()[name] = dashboard
        return dashboard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
