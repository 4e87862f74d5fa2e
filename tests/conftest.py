import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

import stoppoint as sp

from . import pg
from .pg import PgTarget


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[sp.Store]:
    """Each store that comes with stoppoint (test_store.py has its own, with more); PostgresStore in the test's
    own schema (`pg_schema`)."""
    if request.param == "memory":
        yield sp.MemoryStore()
    elif request.param == "sqlite":
        async with sp.SQLiteStore(tmp_path / "runs.db") as sqlite:
            yield sqlite
    else:
        target = request.getfixturevalue("pg_schema")
        async with sp.PostgresStore(target.dsn, schema=target.schema) as postgres:
            yield postgres


Channel = tuple[sp.Interrupter, MemoryObjectReceiveStream[sp.InterruptSignal]]


@pytest.fixture
def channel() -> Iterator[Channel]:
    """An interrupt channel, closed after the test (anyio warns about unclosed streams)."""
    interrupter, receiver = sp.interrupt_channel()
    with interrupter, receiver:
        yield interrupter, receiver


def line_after() -> int:
    """The line number after the caller's line (where the stopping point under test is)."""
    frame = inspect.currentframe()
    assert frame is not None
    assert frame.f_back is not None
    return frame.f_back.f_lineno + 1


def statuses(report: sp.RunReport) -> dict[str, sp.StepStatus]:
    """Each step's status, by name."""
    return {name: step.status for name, step in report.steps.items()}


class FakeSleep:
    """Stands in for the timers' sleep (`stoppoint._control._sleep`): records the seconds asked
    for, sets `entered`, and returns once the test sets `released`. Grace and deadline tests drive
    time with it instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.entered = anyio.Event()
        self.released = anyio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.entered.set()
        await self.released.wait()


@pytest.fixture
def fake_sleep(monkeypatch: pytest.MonkeyPatch) -> FakeSleep:
    sleep = FakeSleep()
    monkeypatch.setattr("stoppoint._control._sleep", sleep)
    return sleep


def kinds(events: list[sp.RunEvent]) -> list[tuple[str, str | None]]:
    """(event name, step) of each event, in order."""
    return [(event.event, getattr(event, "step", None)) for event in events]


@pytest.fixture
def unconfigured_structlog() -> Iterator[None]:
    """structlog as an application that never configured it leaves it (then restored)."""
    config = structlog.get_config()
    configured = structlog.is_configured()
    structlog.reset_defaults()
    try:
        yield
    finally:
        if configured:
            structlog.configure(**config)
        else:
            structlog.reset_defaults()


async def until(check: Callable[[], Awaitable[bool]], within: float = 10.0, every: float = 0.01) -> None:
    """Wait, bounded, until `check()` is true: for states only another process or a clock changes (a
    lease expiring, a file another process writes), which no event in this process can announce."""
    with anyio.fail_after(within):
        while not await check():  # noqa: ASYNC110 - what changes is outside this process's events
            await anyio.sleep(every)


def a_then_b(ran: list[str]) -> sp.Flow:
    """Flow "ab": step a returns 1, step b (after a) returns a + 1; each appends its name to `ran`."""
    flow = sp.Flow("ab")

    @flow.step
    async def a() -> int:
        ran.append("a")
        return 1

    @flow.step
    async def b(a: int) -> int:
        ran.append("b")
        return a + 1

    return flow


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The DSN of a PostgreSQL server for the session (tests/pg.py: `STOPPOINT_TEST_PG_DSN`, else
    127.0.0.1:5432/test, else a throwaway cluster, stopped and removed at the session's end). Without one the
    test skips, saying how to run it; it fails instead in CI, or when `STOPPOINT_TEST_PG_DSN` is set."""
    with contextlib.ExitStack() as stack:
        try:
            dsn = pg.find_server(stack)
        except pg.NoServer as error:
            missing = error
        else:
            yield dsn
            return
    pg.unavailable(missing)  # outside the except: its report is the reason alone, not a chained traceback


@pytest.fixture
def pg_schema(pg_server: str) -> Iterator[PgTarget]:
    """A fresh schema name on the session's server (`stoppoint_test_<hex>`, not created: the store creates
    its own), with the DSN; the schema is dropped, with all it holds, after the test."""
    with pg.fresh_schema(pg_server) as target:
        yield target
