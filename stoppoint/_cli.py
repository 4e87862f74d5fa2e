"""The `stoppoint` command: run a flow from a file, stop it with Ctrl-C, resume it, list and show runs.

    stoppoint run FILE.py:FLOW [--input k=v ...] [--inputs-json FILE] [--run-id ID] [--store STORE]
                               [--strategy at-checkpoint|finish-current|poll-next-N|ignore] [--grace SECONDS]
    stoppoint resume RUN_ID [--store STORE]
    stoppoint runs [--flow NAME] [--store STORE]
    stoppoint show RUN_ID [--json] [--events] [--store STORE]
    stoppoint submit | worker | interrupt ...   (queues and workers: `_cli_worker`)
    stoppoint ui [--store STORE] [--host 127.0.0.1] [--port 8765] [--token TOKEN]   (the dashboard: `_cli_ui`)

Runs are kept in an embedded SQLite file, `.stoppoint/runs.db` under the current directory unless
`--store` says otherwise: another file's path, or a PostgreSQL URL (`postgresql://...` or `postgres://...`,
a `PostgresStore`, in the schema `--schema NAME` names, `stoppoint` by default: `_cli_postgres`). Next to each
run the store keeps the target it was started from, so `resume RUN_ID` needs nothing else. Exit codes: 0
completed, 130 interrupted, 1 a step failed, 2 a usage or definition error (the message names it). What SIGINT
and SIGTERM do is `_cli_signals`'s.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import json
import math
import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import anyio
import pydantic

from ._cli_claim import NewRun, RunIdTaken
from ._cli_signals import CommandSignals, StartUpInterrupted
from ._cli_store import (
    DEFAULT_STORE,
    UsageError,
    _check_run_id,
    _command,
    _existing_store,
    _fail,
    _find,
    _resume_command,
    _store,
    _stored_run,
    _target_of,
    add_store_options,
    lease_of,
)
from ._display import Display, event_line, lease_text, print_styled, printable, status_style, step_lines, summary
from ._errors import FlowDefinitionError, FlowInputError, StepFailed, StoppointError
from ._flow import Flow, plan_of
from ._outcome import Interrupted, RunReport
from ._signal import interrupt_channel
from ._store import CLI_TARGET_LABEL, EVENTS_KEPT, BasicStore, EventStore, RunStatus
from ._strategy import AtCheckpoint, FinishCurrent, IgnoreInterruptions, PollNextN, Strategy
from ._types import Unresolved, adapter, input_type, type_name

__all__ = ["main"]

EXIT_COMPLETED, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# -- targets and inputs ---------------------------------------------------------------------------------


def load_target(target: str) -> Flow:
    """The `Flow` named by `FILE.py:FLOW` (the file is imported as a module of its own)."""
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        _fail(f"target {target!r}: expected FILE.py:FLOW, such as examples/deploy.py:deploy")
    module = import_file(target, path_text)
    flow = getattr(module, name, None)
    if flow is None:
        flows = sorted(key for key, value in vars(module).items() if isinstance(value, Flow))
        _fail(
            f"target {target!r}: {path_text!r} has no flow named {name!r}"
            + (f" (its flows: {', '.join(flows)})" if flows else " (it defines no Flow)")
        )
    if not isinstance(flow, Flow):
        _fail(f"target {target!r}: {name!r} is a {type(flow).__name__}, not a stoppoint Flow")
    return flow


def import_file(target: str, path_text: str) -> ModuleType:
    """The Python file `path_text` (of `target`, for messages), imported as a module of its own."""
    path = Path(path_text)
    if not path.is_file():
        _fail(f"target {target!r}: no such file {path_text!r}")
    module_name = f"stoppoint_target_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        _fail(f"target {target!r}: cannot import {path_text!r} (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pydantic look their module up while it loads
    sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # SystemExit: a file that calls sys.exit() or argparse on import
        _fail(f"target {target!r}: importing {path_text!r} raised {type(exc).__name__}: {exc}")
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def absolute_target(target: str) -> str:
    """`FILE.py:FLOW` with FILE made absolute, so that a run resumes from any directory."""
    path_text, _, name = target.rpartition(":")
    return f"{Path(path_text).resolve()}:{name}"


def _input_annotations(flow: Flow) -> dict[str, Any]:
    """Each flow input's annotation, from the first step that takes it, looking into included
    flows (Any if it has none or it cannot be resolved)."""
    plan = plan_of(flow)
    annotations: dict[str, Any] = {}
    for name in plan.input_users:
        annotation = input_type(plan, name)
        annotations[name] = Any if isinstance(annotation, Unresolved) else annotation
    return annotations


def parse_inputs(flow: Flow, pairs: Sequence[str], inputs_json: str | None) -> dict[str, Any]:
    """`--inputs-json FILE` then `--input k=v` (later wins), each validated against its step
    parameter's annotation with pydantic (`"5"` becomes 5 for an `int`, JSON for lists and models)."""
    annotations = _input_annotations(flow)
    values: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            loaded = json.loads(Path(inputs_json).read_text(encoding="utf-8"))
        except OSError as exc:
            _fail(f"--inputs-json {inputs_json!r}: cannot read it: {exc.strerror or exc}")
        except UnicodeDecodeError as exc:
            _fail(f"--inputs-json {inputs_json!r}: not UTF-8 text: {exc}")
        except json.JSONDecodeError as exc:
            _fail(f"--inputs-json {inputs_json!r}: not JSON: {exc}")
        except RecursionError:  # json's parser recurses once per level
            _fail(f"--inputs-json {inputs_json!r}: nested too deep to read as JSON")
        if not isinstance(loaded, dict):
            _fail(f"--inputs-json {inputs_json!r}: expected a JSON object of inputs, got {type(loaded).__name__}")
        for key, value in loaded.items():
            values[key] = _validated(flow, annotations, key, value, from_text=False)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            _fail(f"--input {pair!r}: expected NAME=VALUE")
        values[key] = _validated(flow, annotations, key, text, from_text=True)
    return values


def _validated(flow: Flow, annotations: dict[str, Any], key: str, value: Any, *, from_text: bool) -> Any:
    if key not in annotations:
        known = ", ".join(sorted(annotations)) or "none"
        _fail(f"flow {flow.name!r} has no input {key!r} (its inputs: {known})")
    annotation = annotations[key]
    if annotation is Any:
        return value
    where = f"input {key!r} of flow {flow.name!r}"
    try:
        validator = adapter(annotation)
    except Exception as exc:  # a type pydantic cannot validate: it cannot come from a command line either
        _fail(f"{where}: its type {type_name(annotation)} cannot be given on the command line ({exc})")
    try:
        if not from_text:
            return validator.validate_python(value)
        if value.lstrip()[:1] in ("[", "{", '"'):  # lists, dicts and models are given as JSON
            return validator.validate_json(value)
        return validator.validate_strings(value)
    except pydantic.ValidationError as exc:
        problem = exc.errors()[0]["msg"] if exc.errors() else str(exc)
        _fail(f"{where}: {_shown(value)} is not a valid {type_name(annotation)}: {problem}")
    except Exception as exc:  # a validator of the user's that raised what pydantic does not wrap (TypeError)
        _fail(f"{where}: {_shown(value)} cannot be validated as {type_name(annotation)}: {exc!r}")


def _shown(value: Any) -> str:
    """`value` for an error message, cut short: it may be a whole file's JSON."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:150]}... ({len(text):,} characters)"


def parse_strategy(text: str) -> Strategy:
    if text == "at-checkpoint":
        return AtCheckpoint()
    if text == "finish-current":
        return FinishCurrent()
    if text == "ignore":
        return IgnoreInterruptions()
    match = re.fullmatch(r"poll-next-([0-9]+)", text)
    if match is not None:
        return PollNextN(int(match.group(1)))
    _fail(f"--strategy {text!r}: expected at-checkpoint, finish-current, poll-next-N (N >= 0) or ignore")


# -- commands -------------------------------------------------------------------------------------------


async def _run_flow(
    flow: Flow,
    store: BasicStore,
    run_id: str,
    *,
    inputs: dict[str, Any] | None,
    strategy: Strategy,
    grace: float | None,
    store_arg: str | None,
    schema: str | None,
    signals: CommandSignals,
) -> int:
    if not sys.stdout.isatty():  # before the steps print anything
        print(f"run {printable(run_id)} of flow {printable(flow.name)}", flush=True)
    resume = _resume_command(run_id, store_arg, schema)
    interrupter, receiver = interrupt_channel()
    with interrupter, receiver, signals.running(interrupter, resume=resume):
        async with anyio.create_task_group() as tg:
            handle = await flow.start(
                tg, inputs, interrupts=receiver, strategy=strategy, store=store, run_id=run_id, grace=grace
            )
            signals.watch(handle)
            ignoring = isinstance(strategy, IgnoreInterruptions)
            async with Display(handle, sys.stdout, ignoring=ignoring) as display:
                tg.start_soon(display.follow)
                try:
                    outcome = await handle.outcome()
                    failure: StepFailed | None = None
                    code = EXIT_INTERRUPTED if isinstance(outcome, Interrupted) else EXIT_COMPLETED
                except StepFailed as exc:
                    failure, code = exc, EXIT_FAILED
                signals.ended(code)  # from here on the outcome decides the exit code, whatever arrives
            report = failure.report if failure is not None else handle.report
    with contextlib.suppress(BrokenPipeError):  # the reader went away: the run is over all the same
        print(summary(report, resume=resume if code != EXIT_COMPLETED else None))
        if failure is not None:
            print(f"step {failure.step!r} failed: {type(failure.__cause__).__name__}: {failure.__cause__}")
    return code


async def cmd_run(args: argparse.Namespace, signals: CommandSignals) -> int:
    flow = load_target(args.target)
    inputs = parse_inputs(flow, args.input or [], args.inputs_json)
    strategy = parse_strategy(args.strategy)
    _check_grace(args.grace)
    run_id = _check_run_id(args.run_id) if args.run_id is not None else uuid.uuid4().hex
    async with _store(args.store, lease_of(args), args.schema) as store:
        if await _find(store, run_id) is not None:
            _fail(f"run {run_id!r} is already in the store; use `{_resume_command(run_id, args.store, args.schema)}`")
        # The run's first save claims the id (with the target label): of commands racing past the
        # check above with one id, only one runs.
        new_run = NewRun(store, {CLI_TARGET_LABEL: absolute_target(args.target)})
        return await _run_flow(
            flow,
            new_run,
            run_id,
            inputs=inputs,
            strategy=strategy,
            grace=args.grace,
            store_arg=args.store,
            schema=args.schema,
            signals=signals,
        )


def _check_grace(grace: float | None) -> None:
    if grace is not None and not (math.isfinite(grace) and grace >= 0):
        _fail(f"--grace {grace}: expected a number of seconds >= 0")


async def cmd_resume(args: argparse.Namespace, signals: CommandSignals) -> int:
    run_id = _check_run_id(args.run_id)
    strategy = parse_strategy(args.strategy)
    _check_grace(args.grace)
    async with _stored_run(args.store, run_id, lease_of(args), args.schema) as (store, record):
        target = await _target_of(store, record)
        if target is None:
            _fail(
                f"run {run_id!r} was not started by the stoppoint command, so its FILE.py:FLOW is unknown; "
                "resume it from Python with flow.run(store=..., run_id=...)"
            )
        flow = load_target(target)
        if flow.name != record.flow:
            _fail(f"run {run_id!r} is of flow {record.flow!r}, but {target} is now flow {flow.name!r}")
        return await _run_flow(
            flow,
            store,
            run_id,
            inputs=None,
            strategy=strategy,
            grace=args.grace,
            store_arg=args.store,
            schema=args.schema,
            signals=signals,
        )


async def cmd_runs(args: argparse.Namespace, signals: CommandSignals) -> int:
    existing = await _existing_store(args.store, schema=args.schema)
    records = []
    if existing is not None:
        async with existing as store:
            records = await store.list_runs(args.flow)
    if not records:
        print("no runs" + (f" of flow {args.flow!r}" if args.flow else ""))
        return EXIT_COMPLETED
    at = datetime.now(UTC)
    # A newline or a tab in a run id would break the columns: shown escaped.
    rows = [
        (
            printable(record.run_id),
            printable(record.flow),
            record.status,
            record.updated_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            printable(record.queue) if record.queue is not None else "-",
            str(record.epoch),
            lease_text(record, at),
            printable(record.owner) if record.owner is not None else "-",
        )
        for record in records
    ]
    width = max(len("RUN ID"), *(len(row[0]) for row in rows))
    queue_width = max(len("QUEUE"), *(len(row[4]) for row in rows))
    lease_width = max(len("LEASE"), *(len(row[6]) for row in rows))
    print(
        f"{'RUN ID':<{width}}  {'FLOW':<16} {'STATUS':<12} {'UPDATED':<19}  {'QUEUE':<{queue_width}}  EPOCH  "
        f"{'LEASE':<{lease_width}}  OWNER"
    )
    for run_id, flow, status, updated, queue, epoch, lease, owner in rows:
        tail = f" {updated}  {queue:<{queue_width}}  {epoch:>5}  {lease:<{lease_width}}  {owner}"
        print_styled(
            sys.stdout,
            [(f"{run_id:<{width}}  {flow:<16} ", ""), (f"{status.value:<12}", status_style(status)), (tail, "")],
        )
    return EXIT_COMPLETED


_EVENT_TIME = "%Y-%m-%d %H:%M:%S"  # a stored history may span days: its lines carry the date


async def cmd_show(args: argparse.Namespace, signals: CommandSignals) -> int:
    run_id = _check_run_id(args.run_id)
    async with _stored_run(args.store, run_id, schema=args.schema) as (store, record):
        stored = await store.load(record.flow, run_id)  # a running run's steps as its owner last wrote them
        target = await _target_of(store, record)
        history = None
        if args.events:
            if not isinstance(store, EventStore):
                _fail(f"{type(store).__name__} keeps no events (it is not an EventStore)")
            history = await store.events(record.flow, run_id)
    assert stored is not None
    record = stored.record  # as of the load: the same moment as the report
    report = RunReport.model_validate_json(stored.report_json)
    expires = record.lease_expires_at
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": record.run_id,
                    "flow": record.flow,
                    "status": record.status.value,
                    "target": target,
                    "owner": record.owner,
                    "epoch": record.epoch,
                    "lease_expires_at": expires.isoformat() if expires is not None else None,
                    "queue": record.queue,
                    "report": json.loads(report.model_dump_json()),
                    **(
                        {}
                        if history is None
                        else {
                            "events": [json.loads(event.model_dump_json()) for event in history],
                            "events_dropped": history.dropped,
                        }
                    ),
                },
                indent=2,
            )
        )
        return EXIT_COMPLETED
    status = record.status
    print_styled(
        sys.stdout,
        [
            (f"run {printable(record.run_id)} of flow {printable(record.flow)}: ", ""),
            (status.value, status_style(status)),
        ],
    )
    if record.owner is not None or record.epoch:
        owner = printable(record.owner) if record.owner is not None else "none"
        lease = lease_text(record, datetime.now(UTC))  # "in 12 s", "expired 3 s ago"
        lease = f", lease expires {lease}" if lease.startswith("in ") else f", lease {lease}" if expires else ""
        print(f"  owner: {owner} (epoch {record.epoch}){lease}")
    if record.queue is not None:
        print(f"  queue: {printable(record.queue)}")
    if status in (RunStatus.RUNNING, RunStatus.ORPHANED):
        print("steps:")
        print("\n".join(step_lines(report)))
    resumable = status in (RunStatus.INTERRUPTED, RunStatus.FAILED, RunStatus.ORPHANED) and target is not None
    resume = _command("resume", record.run_id, args.store, args.schema) if resumable else None
    print(summary(report, resume=resume))
    if history is not None:
        print("events:")
        if history.dropped:
            print(f"  ({history.dropped} earlier events dropped: the store keeps the last {EVENTS_KEPT})")
        for event in history:
            print(f"  {printable(event_line(event, record.flow, _EVENT_TIME, history=True))}")
        if not history and not history.dropped:
            print("  (none stored)")
    if status is RunStatus.RUNNING:
        print(f"to stop it: {_command('interrupt', record.run_id, args.store, args.schema)}")
    elif status is RunStatus.QUEUED:
        print(f"waiting for a worker serving queue {printable(record.queue or 'default')!r}")
    return EXIT_COMPLETED


# -- entry point ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stoppoint",
        description="Run flows that stop safely at their stopping points: Ctrl-C once stops at the next one, "
        "twice forces, three times quits.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    store_help = (
        f"the run store: an SQLite file (default: {DEFAULT_STORE}), or a PostgreSQL database, "
        "postgresql://USER@HOST:PORT/DB"
    )
    lease_help = (
        "seconds a run's claim holds without renewal: once its process is gone this long, another may take "
        "it over (default: 15)"
    )

    run = commands.add_parser("run", help="run a flow from a Python file")
    run.add_argument("target", metavar="FILE.py:FLOW", help="the file and the name of the Flow in it")
    run.add_argument("--input", action="append", metavar="NAME=VALUE", help="an input of the flow (repeatable)")
    run.add_argument("--inputs-json", metavar="FILE", help="inputs from a JSON object in FILE")
    run.add_argument("--run-id", metavar="ID", help="the run's id (default: a new random one)")
    add_store_options(run, store_help)
    run.add_argument(
        "--strategy",
        default="at-checkpoint",
        metavar="STRATEGY",
        help="when an interrupt takes effect: at-checkpoint (default), finish-current, poll-next-N, ignore",
    )
    run.add_argument("--grace", type=float, metavar="SECONDS", help="force the stop this long after the first")
    run.add_argument("--lease", type=float, metavar="SECONDS", help=lease_help)

    resume = commands.add_parser("resume", help="go on with a stored run that did not complete")
    resume.add_argument("run_id", metavar="RUN_ID")
    add_store_options(resume, store_help)
    resume.add_argument("--strategy", default="at-checkpoint", metavar="STRATEGY", help="as for run")
    resume.add_argument("--grace", type=float, metavar="SECONDS", help="as for run")
    resume.add_argument("--lease", type=float, metavar="SECONDS", help="as for run")

    runs = commands.add_parser("runs", help="list the stored runs")
    runs.add_argument("--flow", metavar="NAME", help="only the runs of this flow")
    add_store_options(runs, store_help)

    show = commands.add_parser("show", help="show one stored run")
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true", help="print it as JSON")
    show.add_argument("--events", action="store_true", help="print its stored events too, one line each")
    add_store_options(show, store_help)
    from ._cli_ui import add_command as add_ui  # these import this module's helpers: not at the top
    from ._cli_worker import add_commands

    added = {**add_commands(commands, store_help), **add_ui(commands, store_help)}
    for name, command in {**_COMMANDS, **added}.items():
        commands.choices[name].set_defaults(command_function=command)
    return parser


_COMMANDS = {"run": cmd_run, "resume": cmd_resume, "runs": cmd_runs, "show": cmd_show}


def main(argv: Sequence[str] | None = None) -> int:
    """The `stoppoint` command (also `python -m stoppoint`); returns the exit code. SIGINT and
    SIGTERM are the command's while it runs; their handlers are put back when it returns."""
    with CommandSignals() as signals:
        return _main(argv, signals)


def _main(argv: Sequence[str] | None, signals: CommandSignals) -> int:
    command: str | None = None
    try:
        args = _parser().parse_args(argv)
        command = args.command
        command_function: Callable[[argparse.Namespace, CommandSignals], Awaitable[int]] = args.command_function
        return anyio.run(command_function, args, signals)
    except BaseExceptionGroup as group:  # raised inside a task group: report the one error in it
        errors = group.exceptions
        while len(errors) == 1 and isinstance(errors[0], BaseExceptionGroup):
            errors = errors[0].exceptions
        if len(errors) == 1 and isinstance(errors[0], UsageError | StoppointError):
            return _error(errors[0])
        if len(errors) == 1 and isinstance(errors[0], KeyboardInterrupt):
            return _interrupted(errors[0], command)
        raise
    except (UsageError, StoppointError) as exc:
        return _error(exc)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, command)
    except BrokenPipeError:  # the reader went away (`stoppoint runs | head`)
        sys.stderr.close()
        return EXIT_FAILED


def _interrupted(exc: KeyboardInterrupt, command: str | None) -> int:
    """Ctrl-C or SIGTERM before the run started (say, while the file was imported): one line."""
    name = exc.signal_name if isinstance(exc, StartUpInterrupted) else "SIGINT"
    before = " before the run started" if command in ("run", "resume") else ""
    with contextlib.suppress(OSError):
        print(f"stoppoint: interrupted ({name}){before}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _error(exc: BaseException) -> int:
    """Usage and definition errors, bad inputs, stores that cannot be used: exit code 2."""
    shown = (
        str(exc)
        if isinstance(exc, UsageError | FlowDefinitionError | FlowInputError | RunIdTaken)
        else f"{type(exc).__name__}: {exc}"
    )
    print(f"stoppoint: error: {shown}", file=sys.stderr)
    return EXIT_USAGE


def entry_point() -> NoReturn:
    """The console script. Its handlers of SIGINT and SIGTERM stay to the end of the process, so
    that a signal after the run has ended cannot change the exit code."""
    signals = CommandSignals().install()
    # Registered first, so run last: once the interpreter has joined its threads and run every
    # other exit handler, a signal would meet Python's default handlers again; keep it pending.
    if hasattr(signal, "pthread_sigmask"):
        atexit.register(signal.pthread_sigmask, signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(_main(None, signals))
