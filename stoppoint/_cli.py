"""The `stoppoint` command: run a flow from a file, stop it with Ctrl-C, resume it, list and show runs.

    stoppoint run FILE.py:FLOW [--input k=v ...] [--inputs-json FILE] [--run-id ID] [--store STORE]
                               [--strategy at-checkpoint|finish-current|poll-next-N|ignore] [--grace SECONDS]
    stoppoint resume RUN_ID [--store STORE]
    stoppoint runs [--flow NAME] [--store STORE]
    stoppoint show RUN_ID [--json] [--store STORE]
    stoppoint submit | worker | interrupt ...   (queues and workers: `_cli_worker`)

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
import shlex
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import anyio
import pydantic

from ._cli_claim import NewRun, RunIdTaken
from ._cli_signals import CommandSignals, StartUpInterrupted
from ._display import Display, lease_text, print_styled, printable, status_style, step_lines, summary
from ._errors import FlowDefinitionError, FlowInputError, StepFailed, StoppointError
from ._flow import Flow, plan_of
from ._outcome import Interrupted, RunReport
from ._signal import interrupt_channel
from ._sqlite import SQLiteStore
from ._store import CLI_TARGET_LABEL, BasicStore, LabelStore, RunRecord, RunStatus
from ._strategy import AtCheckpoint, FinishCurrent, IgnoreInterruptions, PollNextN, Strategy
from ._types import Unresolved, adapter, input_type, type_name

if TYPE_CHECKING:
    from ._postgres import PostgresStore

    OpenStore: TypeAlias = SQLiteStore | PostgresStore

__all__ = ["main"]

DEFAULT_STORE = Path(".stoppoint") / "runs.db"
EXIT_COMPLETED, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A problem with what the command was asked to do (exit code 2)."""


def _fail(message: str) -> NoReturn:
    raise UsageError(message)


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


# -- the store ------------------------------------------------------------------------------------------


def lease_of(args: argparse.Namespace) -> float:
    """`--lease SECONDS` (a command that owns runs takes it), checked."""
    lease = getattr(args, "lease", None)
    if lease is None:
        return DEFAULT_LEASE
    if not (math.isfinite(lease) and lease > 0):
        _fail(f"--lease {lease}: expected a number of seconds > 0")
    return float(lease)


DEFAULT_LEASE = 15.0
DSN_SCHEMES = ("postgresql://", "postgres://")


def is_dsn(store_arg: str | None) -> bool:
    """Whether `--store` names a PostgreSQL database (a URL) rather than an SQLite file (a path)."""
    return store_arg is not None and store_arg.startswith(DSN_SCHEMES)


def shown_dsn(dsn: str) -> str:
    """The URL without its password (in the user part or a `password=` parameter), to print: the commands
    the CLI prints end up in terminals and logs; libpq finds the password in PGPASSWORD or ~/.pgpass."""
    parts = urlsplit(dsn)
    user, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}{at}{hosts}"
    query = "&".join(item for item in parts.query.split("&") if item and not item.startswith("password="))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _sqlite_only(schema: str | None) -> None:
    if schema is not None:
        _fail(f"--schema {schema!r}: only a PostgreSQL store (--store postgresql://...) has schemas")


def _store(path: str | None, lease: float = DEFAULT_LEASE, schema: str | None = None) -> OpenStore:
    """The store to run in (made, with `.stoppoint/`, if it does not exist yet)."""
    if is_dsn(path):
        from ._cli_postgres import postgres_store

        assert path is not None
        return postgres_store(path, lease, schema)
    _sqlite_only(schema)
    store_path = Path(path) if path is not None else DEFAULT_STORE
    if path is None:
        store_path.parent.mkdir(parents=True, exist_ok=True)
    elif not store_path.parent.is_dir():
        _fail(f"--store {path!r}: its directory does not exist")
    return SQLiteStore(store_path, lease=lease)


async def _existing_store(
    path: str | None, run_id: str | None = None, lease: float = DEFAULT_LEASE, schema: str | None = None
) -> OpenStore | None:
    """The store to look into, or None if there is none yet (looking creates nothing: neither a file nor
    a schema)."""
    if is_dsn(path):
        from ._cli_postgres import existing_postgres_store

        assert path is not None
        found: OpenStore | None = await existing_postgres_store(path, lease, schema)
    else:
        _sqlite_only(schema)
        store_path = Path(path) if path is not None else DEFAULT_STORE
        found = SQLiteStore(store_path, lease=lease) if store_path.exists() else None
    if found is None and run_id is not None:
        _fail(f"no run {run_id!r}: there is no store {store_place(path, schema)} yet")
    return found


def store_place(path: str | None, schema: str | None) -> str:
    """Where `--store` and `--schema` point, for messages: `at PATH`, `in schema S of URL`."""
    if is_dsn(path):
        assert path is not None
        return f"in schema {schema or 'stoppoint'!r} of {shown_dsn(path)}"
    return f"at {path if path is not None else DEFAULT_STORE}"


def store_name(store: OpenStore) -> str:
    """The store, for messages: an SQLite file's path, `PostgresStore(host:port/db, 'schema')`."""
    return str(store.path) if isinstance(store, SQLiteStore) else repr(store)


def store_words(store_arg: str | None, schema: str | None) -> list[str]:
    """`--store` (and `--schema`) for a printed command: a file other than the default one by its absolute
    path, so that the command works from any directory; a PostgreSQL URL without its password."""
    if is_dsn(store_arg):
        assert store_arg is not None
        return ["--store", shown_dsn(store_arg), *(["--schema", schema] if schema is not None else [])]
    if store_arg is None or (store := Path(store_arg).resolve()) == DEFAULT_STORE.resolve():
        return []
    return ["--store", str(store)]


def _check_run_id(run_id: str) -> str:
    if not run_id:
        _fail("--run-id: a run id cannot be empty")
    try:
        run_id.encode("utf-8")
    except UnicodeEncodeError:
        _fail(f"run id {run_id!r}: not valid UTF-8 text")
    return run_id


def _resume_command(run_id: str, store_arg: str | None, schema: str | None = None) -> str:
    """The command to resume `run_id`, quoted for a shell (see `_command`)."""
    return _command("resume", run_id, store_arg, schema)


def _command(verb: str, run_id: str, store_arg: str | None, schema: str | None = None) -> str:
    """`stoppoint VERB RUN_ID`, quoted for a shell, with the store's options (`store_words`)."""
    return shlex.join(["stoppoint", verb, run_id, *store_words(store_arg, schema)])


async def _target_of(store: LabelStore, record: RunRecord) -> str | None:
    """The `FILE.py:FLOW` the run was started from (the run's `stoppoint.target` label, which `run`
    sets); None for a run stored from Python."""
    return (await store.labels(record.flow, record.run_id)).get(CLI_TARGET_LABEL)


async def _find(store: BasicStore, run_id: str) -> RunRecord | None:
    """The stored record of `run_id`, whatever its flow."""
    for record in await store.list_runs():
        if record.run_id == run_id:
            return record
    return None


@contextlib.asynccontextmanager
async def _stored_run(
    store_arg: str | None, run_id: str, lease: float = 15.0, schema: str | None = None
) -> AsyncIterator[tuple[OpenStore, RunRecord]]:
    """The store `--store` names (it must exist) and the record of `run_id` in it (it must be there)."""
    existing = await _existing_store(store_arg, run_id, lease, schema)
    assert existing is not None
    async with existing as store:
        record = await _find(store, run_id)
        if record is None:
            _fail(f"no run {run_id!r} in {store_name(store)} (`stoppoint runs` lists them)")
        yield store, record


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


async def cmd_show(args: argparse.Namespace, signals: CommandSignals) -> int:
    run_id = _check_run_id(args.run_id)
    async with _stored_run(args.store, run_id, schema=args.schema) as (store, record):
        stored = await store.load(record.flow, run_id)  # a running run's steps as its owner last wrote them
        target = await _target_of(store, record)
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
    if status is RunStatus.RUNNING:
        print(f"to stop it: {_command('interrupt', record.run_id, args.store, args.schema)}")
    elif status is RunStatus.QUEUED:
        print(f"waiting for a worker serving queue {printable(record.queue or 'default')!r}")
    return EXIT_COMPLETED


# -- entry point ----------------------------------------------------------------------------------------


def add_store_options(parser: argparse.ArgumentParser, store_help: str) -> None:
    """`--store` and `--schema`, for every command that opens a store."""
    parser.add_argument("--store", metavar="STORE", help=store_help)
    parser.add_argument(
        "--schema",
        metavar="NAME",
        help="with a PostgreSQL store: the schema of its tables, created on first use (default: stoppoint)",
    )


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
    add_store_options(show, store_help)
    from ._cli_worker import add_commands  # it imports this module's helpers: not at the top

    for name, command in {**_COMMANDS, **add_commands(commands, store_help)}.items():
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
