"""The `stoppoint` commands of queues and workers: submit a run, serve runs, interrupt a run from anywhere.

    stoppoint submit FILE.py:FLOW [--input k=v ...] [--inputs-json FILE] [--run-id ID] [--queue Q] [--store STORE]
    stoppoint worker FILE.py[:FLOW] ... [--store STORE] [--max-runs N] [--queue Q[=LIMIT] ...]
    stoppoint interrupt RUN_ID [--force] [--reason TEXT] [--store STORE]

`--store` is an SQLite file or a PostgreSQL URL, with `--schema`, as for every command (`_cli`).

`worker` runs until SIGINT or SIGTERM: the first stops it gracefully (its runs stop at their next stopping
point and are queued again, for another worker; exit code 0), a second SIGINT forces it (their steps in flight
are cancelled; exit code 130), as `_cli_signals` says for every command. `interrupt` exits 0 when the stop was
requested, 1 when there was nothing to stop (the message says why), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from datetime import datetime
from typing import Any

import anyio

from ._cli import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, absolute_target, import_file, load_target, parse_inputs
from ._cli_signals import CommandSignals
from ._cli_store import (
    _check_run_id,
    _existing_store,
    _fail,
    _find,
    _store,
    add_store_options,
    lease_of,
    store_name,
    store_place,
    store_words,
)
from ._display import printable
from ._errors import FlowInputError
from ._flow import Flow, plan_of
from ._launch import submit
from ._lease import Queue
from ._signal import interrupt_channel
from ._store import CLI_TARGET_LABEL, BasicStore, RunStatus, Store
from ._worker import Worker

__all__ = ["add_commands", "cmd_interrupt", "cmd_submit", "cmd_worker", "load_flows"]


def _leased(store: BasicStore, path: object) -> Store:
    """`store` as a `Store` (leases, queues, interrupts), or a usage error saying it is not one."""
    if not isinstance(store, Store):
        _fail(f"the store at {path} keeps no leases (a store of stoppoint 0.1): it cannot queue nor interrupt runs")
    return store


# -- submit -------------------------------------------------------------------------------------------------


async def cmd_submit(args: argparse.Namespace, signals: CommandSignals) -> int:
    flow = load_target(args.target)
    inputs = parse_inputs(flow, args.input or [], args.inputs_json)
    run_id = _check_run_id(args.run_id) if args.run_id is not None else None
    if not args.queue:
        _fail("--queue: a queue's name cannot be empty")
    async with _store(args.store, schema=args.schema) as opened:
        store = _leased(opened, store_name(opened))
        labels = {CLI_TARGET_LABEL: absolute_target(args.target)}
        run_id = await submit(plan_of(flow), store, inputs, run_id, args.queue, labels)
        record = await _find(store, run_id)
    assert record is not None
    if record.status is RunStatus.COMPLETED:
        print(f"run {printable(run_id)} of flow {printable(flow.name)} is completed already: nothing to run")
    else:
        print(f"run {printable(run_id)} of flow {printable(flow.name)} queued in {printable(args.queue)!s}")
    return EXIT_COMPLETED


# -- worker -------------------------------------------------------------------------------------------------


def load_flows(targets: list[str]) -> list[Flow]:
    """The flows named by `FILE.py:FLOW` targets, and every flow of the files named alone (`FILE.py`), each
    file imported once."""
    flows: dict[int, Flow] = {}
    modules: dict[str, Any] = {}
    for target in targets:
        path_text, sep, name = target.rpartition(":")
        if sep and path_text and name:
            flow = load_target(target)
            flows.setdefault(id(flow), flow)
            continue
        module = modules.get(target)
        if module is None:
            module = modules[target] = import_file(target, target)
        found = [value for value in vars(module).values() if isinstance(value, Flow)]
        if not found:
            _fail(f"target {target!r}: {target!r} defines no Flow")
        for flow in found:
            flows.setdefault(id(flow), flow)
    return list(flows.values())


def _queue(text: str) -> Queue:
    """`--queue NAME` or `--queue NAME=LIMIT` (at most LIMIT of its runs at once, across workers)."""
    name, sep, limit = text.partition("=")
    if not name:
        _fail(f"--queue {text!r}: expected NAME or NAME=LIMIT")
    if not sep:
        return Queue(name)
    if not limit.isdigit() or int(limit) < 1:
        _fail(f"--queue {text!r}: the limit must be a whole number >= 1")
    return Queue(name, concurrency=int(limit))


class _Lines:
    """Prints the worker's events, one line each: claimed and ended runs, and what the worker does."""

    def __init__(self, store_path: object) -> None:
        self._store_path = store_path

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        line = self._line(event, fields)
        if line is None:
            return
        out = sys.stderr if event in ("worker.claim_failed", "worker.refusal_not_stored") else sys.stdout
        with contextlib.suppress(OSError):  # a reader gone away does not stop the worker
            print(f"{datetime.now().strftime('%H:%M:%S')} {line}", file=out, flush=True)

    def _line(self, event: str, fields: dict[str, Any]) -> str | None:
        run = f"run {printable(str(fields.get('run_id')))} of flow {printable(str(fields.get('flow')))}"
        if event == "worker.started":
            flows, queues = ", ".join(fields["flows"]), ", ".join(fields["queues"])
            return f"worker {fields['owner']}: serving flows {flows} from queues {queues} of {self._store_path}"
        if event == "worker.claimed":
            return f"claimed {run} (epoch {fields['epoch']}, was {fields['was']})"
        if event == "worker.run_refused":
            return f"refused {run}: {fields['error']} (stored interrupted)"
        if event == "worker.claim_failed":
            return f"claiming failed: {fields['error']} (trying again in {fields['retry_in']:g} s)"
        if event == "worker.refusal_not_stored":
            return f"{run}: could not store why it was refused: {fields['error']}"
        if event == "worker.stopping":
            count = fields["running"]
            if not count:
                return "stopping"
            return (
                f"stopping: {count} run(s) stop at their next stopping point and are queued again; "
                "press Ctrl-C again to force"
            )
        if event == "worker.stopped":
            return "stopped"
        if event == "worker.run_ended":
            return f"ended {run}: {_ending(fields)}"
        return None


def _ending(fields: dict[str, Any]) -> str:
    status = fields["status"]
    if status == "failed":
        return f"failed (step {fields['step']!r}: {fields['error']})"
    if status == "error":
        return f"error ({fields['error']})"
    if status == "queued":
        return f"queued again ({fields['reason']})"
    if status == "interrupted":
        forced = ", forced" if fields.get("forced") else ""
        return f"interrupted ({fields['reason']}{forced})"
    return str(status)


async def cmd_worker(args: argparse.Namespace, signals: CommandSignals) -> int:
    flows = load_flows(args.targets)
    queues = [_queue(text) for text in args.queue or ["default"]]
    if args.max_runs < 1:
        _fail(f"--max-runs {args.max_runs}: expected a whole number >= 1")
    async with _store(args.store, lease_of(args), args.schema) as opened:
        store = _leased(opened, store_name(opened))
        try:
            worker = Worker(store, flows, queues=queues, max_runs=args.max_runs)
        except (TypeError, ValueError) as exc:
            _fail(str(exc).removeprefix("Worker(flows): ").removeprefix("Worker(queues): "))
        except FlowInputError as exc:  # a flow takes resources, which only code can give (sp.Worker(resources=))
            _fail(f"{exc}; the command cannot give resources: run sp.Worker(store, flows, resources=...) from code")
        worker._listener = _Lines(store_name(opened))
        forced = False
        interrupter, receiver = interrupt_channel()
        with interrupter, receiver, signals.running(interrupter, resume=_again(args)):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def obey() -> None:
                        """The first signal stops the worker, a forced one (the second) cancels it."""
                        nonlocal forced
                        async for signal in receiver:
                            if signal.force:
                                forced = True
                                scope.cancel()
                                return
                            worker.stop()

                    tg.start_soon(obey)
                    await worker.run()
                    tg.cancel_scope.cancel()
            code = EXIT_INTERRUPTED if forced else EXIT_COMPLETED
            signals.ended(code)
    return code


def _again(args: argparse.Namespace) -> str:
    """This command again, for the message on quitting: the store keeps the runs as of their last saves."""
    return shlex.join(["stoppoint", "worker", *args.targets, *store_words(args.store, args.schema)])


# -- interrupt ----------------------------------------------------------------------------------------------


async def cmd_interrupt(args: argparse.Namespace, signals: CommandSignals) -> int:
    run_id = _check_run_id(args.run_id)
    existing = await _existing_store(args.store, schema=args.schema)
    if existing is None:
        return _nothing(f"no run {run_id!r}: there is no store {store_place(args.store, args.schema)} yet")
    async with existing as opened:
        store = _leased(opened, store_name(opened))
        record = await _find(store, run_id)
        if record is None:
            return _nothing(f"no run {run_id!r} in {store_name(opened)} (`stoppoint runs` lists them)")
        requested = await store.interrupt(record.flow, run_id, args.reason, force=args.force, source="cli")
        after = await _find(store, run_id)
    run = f"run {printable(run_id)} of flow {printable(record.flow)}"
    if not requested:
        status = after.status.value if after is not None else record.status.value
        return _nothing(f"{run} is {status} and nobody is running it")
    if after is not None and after.status is RunStatus.INTERRUPTED and after.owner is None:
        print(f"{run} was {record.status.value}, run by nobody: marked interrupted ({args.reason})")
    elif args.force:
        print(f"asked {printable(record.owner or 'its owner')} to stop {run} now, cancelling its steps in flight")
    else:
        print(f"asked {printable(record.owner or 'its owner')} to stop {run} at its next stopping point")
    return EXIT_COMPLETED


def _nothing(why: str) -> int:
    print(f"stoppoint: nothing to stop: {why}", file=sys.stderr)
    return EXIT_FAILED


# -- the parsers --------------------------------------------------------------------------------------------


def add_commands(commands: Any, store_help: str) -> dict[str, Any]:
    """Add `submit`, `worker` and `interrupt` to the command's subparsers; their functions by name."""
    sub = commands.add_parser("submit", help="queue a run of a flow for a worker")
    sub.add_argument("target", metavar="FILE.py:FLOW", help="the file and the name of the Flow in it")
    sub.add_argument("--input", action="append", metavar="NAME=VALUE", help="an input of the flow (repeatable)")
    sub.add_argument("--inputs-json", metavar="FILE", help="inputs from a JSON object in FILE")
    sub.add_argument("--run-id", metavar="ID", help="the run's id (default: a new random one)")
    sub.add_argument("--queue", default="default", metavar="Q", help="the queue (default: default)")
    add_store_options(sub, store_help)

    work = commands.add_parser("worker", help="run queued and orphaned runs of flows, until Ctrl-C or SIGTERM")
    work.add_argument(
        "targets", nargs="+", metavar="FILE.py[:FLOW]", help="the flows to run (a file alone: all of its flows)"
    )
    add_store_options(work, store_help)
    work.add_argument(
        "--lease", type=float, metavar="SECONDS", help="seconds a run's claim holds without renewal (default: 15)"
    )
    work.add_argument("--max-runs", type=int, default=10, metavar="N", help="at most N runs at once (default: 10)")
    work.add_argument(
        "--queue",
        action="append",
        metavar="Q[=LIMIT]",
        help="a queue to serve (repeatable; default: default); LIMIT: at most that many of its runs at once, "
        "across all workers",
    )

    stop = commands.add_parser("interrupt", help="ask a run to stop, wherever it runs")
    stop.add_argument("run_id", metavar="RUN_ID")
    stop.add_argument("--force", action="store_true", help="do not wait for a stopping point: cancel its steps")
    stop.add_argument("--reason", default="interrupted from the command line", metavar="TEXT", help="shown in reports")
    add_store_options(stop, store_help)
    return {"submit": cmd_submit, "worker": cmd_worker, "interrupt": cmd_interrupt}
