"""A small in-process service that runs flows in the background and stops them by run id.

Run it with `python examples/service.py`. `FlowService` owns a task group (entered by its `async with`) and a
registry of the runs it started, keyed by run id: `start()` returns a new run's id as soon as the run is going,
`status()` gives its live report (with the progress its steps report), `interrupt()` asks it to stop from any task,
and `await result()` gives its outcome. Finished runs stay available until more than `keep_finished` of them have
piled up; the oldest are then forgotten.

The flow is a batch ETL: `extract` lists the orders of a batch, `transform` fetches each order from an upstream
API and converts its amount to euros (reporting its progress per order), and `load` stores the rows. The API
client and the warehouse are live objects the service creates once (in a web server, in its lifespan) and shares
between runs: the steps take them as `sp.Resource[...]` parameters, given to each run as `resources=`, so they are
neither flow inputs (a store could not keep them) nor module globals.

`main()` starts three batches from one task. Another task, the "operator" (think of the HTTP handler of
`DELETE /runs/{run_id}`), cancels the "south" batch by its run id while that batch waits for a slow answer about
its 4th order. That order is finished, never cut off; `transform` then stops at its next stopping point and `load`
never begins. The two other batches complete.
"""

import contextlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

import stoppoint as sp

Outcome = sp.Completed[Any] | sp.Interrupted


class UnknownRunError(LookupError):
    """No run of that id: it never existed, or it finished long ago and was forgotten."""


class FlowService:
    """Runs of one flow going on in the background, kept by run id.

    Use it as `async with FlowService(flow) as service:`; the block owns the task group the runs go on in. Leaving
    the block interrupts the runs still going (gracefully: they stop at their next stopping point) and waits for
    them; pass `grace=` so that a step stuck in I/O is cancelled rather than holding up the shutdown. If the block
    raises, the runs are cancelled at once.

    Args:
        flow: The flow to run.
        resources: The live objects every run gets (clients, connections), by the name of the steps'
            `sp.Resource[...]` parameters; never stored, so a run resumed later needs them again.
        keep_finished: How many finished runs to keep for `status()` and `result()`, the most recent ones.
        grace: Seconds after an interrupt after which the steps still running are cancelled (None: never).
    """

    def __init__(
        self,
        flow: sp.Flow,
        *,
        resources: Mapping[str, Any] | None = None,
        keep_finished: int = 100,
        grace: float | None = None,
    ) -> None:
        if keep_finished < 0:
            raise ValueError(f"keep_finished must be >= 0, got {keep_finished!r}")
        self._flow = flow
        self._resources = dict(resources or {})
        self._keep_finished = keep_finished
        self._grace = grace
        self._runs: dict[str, sp.FlowRun] = {}  # started and not yet forgotten, in the order they started
        self._finished: deque[str] = deque()  # the kept finished runs, in the order they finished
        self._started = 0
        self._task_group: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._task_group is not None, "FlowService was not entered"
        task_group, self._task_group = self._task_group, None  # no new runs from now on
        if exc is None:
            for run_id in self.running:
                self.interrupt(run_id, "the service is shutting down")
        return await task_group.__aexit__(exc_type, exc, tb)

    @property
    def running(self) -> list[str]:
        """Ids of the runs still going, in the order they started."""
        return [run_id for run_id, handle in self._runs.items() if not handle.done]

    @property
    def known(self) -> list[str]:
        """Ids of every run `status()` and `result()` know: those going and the finished ones kept."""
        return list(self._runs)

    async def start(self, inputs: Mapping[str, Any] | None = None) -> str:
        """Start a run of the flow in the background and return its id once it is going.

        Raises:
            RuntimeError: The service is not running (outside its `async with` block).
            sp.FlowInputError: Missing or unknown inputs or resources (nothing is started).
        """
        if self._task_group is None:
            raise RuntimeError("FlowService is not running: start runs inside `async with FlowService(...)`")
        self._started += 1
        run_id = f"{self._flow.name}-{self._started}"
        handle = await self._flow.start(
            self._task_group, inputs, run_id=run_id, grace=self._grace, resources=self._resources
        )
        self._runs[run_id] = handle
        self._task_group.start_soon(self._retire, handle, name=f"retire {run_id}")
        return run_id

    def interrupt(self, run_id: str, reason: str = "cancelled", *, force: bool = False) -> bool:
        """Ask a run to stop at its next stopping point (or at once, with `force=True`), from any task.

        Returns:
            True if the run got the request; False if there is no such run or it has already ended.
        """
        handle = self._runs.get(run_id)
        return handle is not None and handle.interrupt(reason, force=force)

    def status(self, run_id: str) -> sp.RunReport:
        """The run's report now: each step's status and progress (`finished_at` is None while it goes on).

        Raises:
            UnknownRunError: No such run (or it was forgotten).
        """
        return self._handle(run_id).report

    async def result(self, run_id: str) -> Outcome:
        """Wait for the run to end and return its `Completed` or `Interrupted`.

        Raises:
            UnknownRunError: No such run (or it was forgotten).
            sp.StepFailed: One of its steps raised.
        """
        return await self._handle(run_id).outcome()

    def _handle(self, run_id: str) -> sp.FlowRun:
        try:
            return self._runs[run_id]
        except KeyError:
            raise UnknownRunError(f"no run {run_id!r} (known: {', '.join(self._runs) or 'none'})") from None

    async def _retire(self, handle: sp.FlowRun) -> None:
        """Once the run has ended, count it among the finished runs and forget the oldest beyond `keep_finished`."""
        with contextlib.suppress(Exception):  # a failure is for `result()` to raise, not this task
            await handle.outcome()
        self._finished.append(handle.run_id)
        while len(self._finished) > self._keep_finished:
            del self._runs[self._finished.popleft()]


# -- the flow: a batch ETL ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    id: int
    customer: str
    amount: Decimal
    currency: str


@dataclass(frozen=True)
class Row:
    order_id: int
    customer: str
    amount_eur: Decimal


@dataclass(frozen=True)
class LoadSummary:
    batch: str
    rows: int
    total_eur: Decimal


EUR_PER = {"EUR": Decimal("1"), "USD": Decimal("0.92"), "GBP": Decimal("1.17")}

ORDERS: dict[str, tuple[Order, ...]] = {
    "north": (
        Order(101, "acme", Decimal("120.00"), "USD"),
        Order(102, "globex", Decimal("80.50"), "EUR"),
        Order(103, "initech", Decimal("42.00"), "GBP"),
        Order(104, "acme", Decimal("15.25"), "EUR"),
        Order(105, "umbrella", Decimal("300.00"), "USD"),
    ),
    "south": (
        Order(201, "hooli", Decimal("99.99"), "USD"),
        Order(202, "acme", Decimal("10.00"), "GBP"),
        Order(203, "stark", Decimal("1200.00"), "EUR"),
        Order(204, "wayne", Decimal("640.00"), "USD"),
        Order(205, "globex", Decimal("5.00"), "EUR"),
        Order(206, "hooli", Decimal("70.00"), "GBP"),
    ),
    "west": (
        Order(301, "initech", Decimal("250.00"), "EUR"),
        Order(302, "stark", Decimal("12.00"), "GBP"),
        Order(303, "wayne", Decimal("1000.00"), "USD"),
        Order(304, "umbrella", Decimal("0.99"), "EUR"),
    ),
}


@dataclass
class SlowRequest:
    """A request the fake API holds: `in_flight` is set when it arrives, and it is answered once `answer` is set."""

    in_flight: anyio.Event = field(default_factory=anyio.Event)
    answer: anyio.Event = field(default_factory=anyio.Event)


class OrdersApi:
    """Stands in for the upstream orders API (in memory; every call yields to the event loop, as I/O would).

    `slow(order_id)` makes the fetch of that order wait for an answer the caller gives when it likes: a slow
    request, made deterministic so that the demo prints the same every time.
    """

    def __init__(self, orders: Mapping[str, Sequence[Order]]) -> None:
        self._orders = {order.id: order for batch in orders.values() for order in batch}
        self._batches = {batch: [order.id for order in batch_orders] for batch, batch_orders in orders.items()}
        self._slow: dict[int, SlowRequest] = {}

    def slow(self, order_id: int) -> SlowRequest:
        """Make the fetch of `order_id` slow; returns what to wait on and what to set to answer it."""
        request = self._slow[order_id] = SlowRequest()
        return request

    async def list_orders(self, batch: str) -> list[int]:
        await anyio.lowlevel.checkpoint()
        return list(self._batches[batch])

    async def fetch(self, order_id: int) -> Order:
        request = self._slow.get(order_id)
        if request is None:
            await anyio.lowlevel.checkpoint()
        else:
            request.in_flight.set()
            await request.answer.wait()
        return self._orders[order_id]


class Warehouse:
    """Stands in for the warehouse the rows are loaded into (a table per batch)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[Row]] = {}

    async def insert(self, table: str, rows: Sequence[Row]) -> int:
        await anyio.lowlevel.checkpoint()
        self.tables.setdefault(table, []).extend(rows)
        return len(rows)


etl = sp.Flow("etl")


@etl.step
async def extract(ctx: sp.StepContext, api: sp.Resource[OrdersApi], batch: str) -> list[int]:
    await ctx.checkpoint()
    return await api.list_orders(batch)


@etl.step
async def transform(ctx: sp.StepContext, api: sp.Resource[OrdersApi], extract: list[int]) -> list[Row]:
    rows: list[Row] = []
    # A stopping point before each order: once interrupted, the step stops there, between two orders.
    async for order_id in ctx.iterate(extract):
        order = await api.fetch(order_id)
        amount_eur = (order.amount * EUR_PER[order.currency]).quantize(Decimal("0.01"))
        rows.append(Row(order.id, order.customer, amount_eur))
        ctx.progress(len(rows), len(extract), f"order {order.id}")
    return rows


@etl.step
async def load(ctx: sp.StepContext, warehouse: sp.Resource[Warehouse], batch: str, transform: list[Row]) -> LoadSummary:
    await ctx.checkpoint()
    count = await warehouse.insert(f"orders_{batch}", transform)
    return LoadSummary(batch, count, sum((row.amount_eur for row in transform), Decimal("0.00")))


# -- the demo ------------------------------------------------------------------------------------------------------


async def operator(service: FlowService, run_id: str, slow: SlowRequest) -> None:
    """Another task (the HTTP handler of `DELETE /runs/{run_id}`, say): cancel a run by its id.

    Its cue is the slow request: the operator sees the run waiting on it and cancels the run.
    """
    await slow.in_flight.wait()
    step = service.status(run_id).steps["transform"]
    assert step.progress is not None
    progress = step.progress
    print(
        f"operator:  {run_id} is {step.status} transform at {progress.done:g}/{progress.total:g} "
        f"(last: {progress.message}); cancelling it"
    )
    service.interrupt(run_id, "cancelled by the operator")


def describe(outcome: Outcome) -> str:
    """One line about an outcome: the value of a completed run, the steps of an interrupted one."""
    match outcome:
        case sp.Completed(LoadSummary() as summary):
            return f"Completed: loaded {summary.rows} rows, EUR {summary.total_eur}"
        case sp.Interrupted(signal, report):
            parts = [f"Interrupted ({signal.reason})", f"completed {', '.join(report.completed) or '-'}"]
            for name in report.stopped:
                step = report.steps[name]
                where = f"{name} stopped at {step.stopped_at}"
                if step.progress is not None:
                    where += f" after {step.progress.done:g}/{step.progress.total:g}"
                parts.append(where)
            parts.append(f"not started {', '.join(report.not_started) or '-'}")
            return "; ".join(parts)
    return f"unexpected outcome {outcome!r}"


async def main() -> dict[str, Outcome]:
    """Start three batches, have the operator cancel "south" by its run id, and return the outcomes by run id."""
    api = OrdersApi(ORDERS)
    slow = api.slow(204)  # south's 4th order
    warehouse = Warehouse()
    # Created once, like an HTTP client or a connection pool in a web server's lifespan, and given to every run.
    async with FlowService(etl, resources={"api": api, "warehouse": warehouse}) as service:
        run_ids = {batch: await service.start({"batch": batch}) for batch in ORDERS}
        for batch, run_id in run_ids.items():
            print(f"started:   {run_id} for batch {batch}")
        async with anyio.create_task_group() as handlers:
            handlers.start_soon(operator, service, run_ids["south"], slow)
        slow.answer.set()  # the slow request is answered at last: the order in flight is finished
        outcomes = {run_id: await service.result(run_id) for run_id in run_ids.values()}
        print(f"running:   {', '.join(service.running) or 'none'}")
    for batch, run_id in run_ids.items():
        print(f"{run_id} ({batch}): {describe(outcomes[run_id])}")
    print(f"warehouse: {', '.join(f'{table} ({len(rows)} rows)' for table, rows in sorted(warehouse.tables.items()))}")
    return outcomes


if __name__ == "__main__":
    anyio.run(main)
