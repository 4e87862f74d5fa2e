"""The examples run and stop where they say they stop."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import stoppoint as sp

DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy.py"
RESUME = Path(__file__).resolve().parent.parent / "examples" / "resume.py"


def load_example(path: Path) -> ModuleType:
    """Import an example by path (examples/ is not a package), as a fresh module each time."""
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_deploy_script_prints_report(tmp_path: Path) -> None:
    """As the README's first command runs it: stopped, persisted under .stoppoint/ (of the working
    directory), resumed."""
    result = subprocess.run(
        [sys.executable, str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "DEPLOY_PART_SECONDS": "0.05"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^outcome:\s+Interrupted$", out, re.MULTILINE), out
    assert re.search(r"^completed:\s+server$", out, re.MULTILINE), out
    assert re.search(r"^stopped:\s+upload at deploy\.py:\d+$", out, re.MULTILINE), out
    assert re.search(r"^not started:\s+config, start$", out, re.MULTILINE), out
    assert "operator pressed stop" in out
    assert re.search(r"^saved:\s+upload: \['app.tar.gz'", out, re.MULTILINE), out
    assert re.search(r"^outcome:\s+Completed$", out, re.MULTILINE), out
    # The resume goes on from the part where the upload stopped: no part is sent twice.
    for part in ("app.tar.gz", "static.tar.gz", "migrations.sql"):
        assert len(re.findall(rf"^  uploaded part \d/3: {re.escape(part)} ", out, re.MULTILINE)) == 1, out
    assert re.search(r"^resumed:\s+server \(outputs from the store", out, re.MULTILINE), out
    assert (tmp_path / ".stoppoint" / "deploy.db").is_file()


@pytest.mark.anyio
async def test_deploy_main_is_interrupted_in_upload_then_resumed(
    anyio_backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example(DEPLOY)
    example.PART_SECONDS = 0.05
    outcome, resumed = await example.main(tmp_path / "deploy.db")
    out = capsys.readouterr().out
    assert isinstance(outcome, sp.Interrupted)
    assert not outcome.forced
    assert outcome.signal.reason == "operator pressed stop"
    assert outcome.signal.source == "example"
    report = outcome.report
    assert report.completed == ["server"]
    assert report.stopped == ["upload"]
    assert report.not_started == ["config", "start"]
    # The upload stops at the stopping point of its `async for ... in ctx.iterate(...)` loop.
    loop_line = next(
        number
        for number, line in enumerate(DEPLOY.read_text().splitlines(), start=1)
        if "async for" in line and "ctx.iterate(" in line
    )
    assert report.steps["upload"].stopped_at == f"deploy.py:{loop_line}"
    assert list(outcome.checkpoint.outputs) == ["server"]
    # The parts sent before the stop were saved (ctx.save), and the resume sent only the others.
    sent = outcome.checkpoint.progress["upload"]
    assert sent == list(example.PARTS[: len(sent)])
    assert 1 <= len(sent) < len(example.PARTS)
    _, after = out.split("resuming run", 1)
    assert re.findall(r"uploaded part (\d)/3", after) == [str(n) for n in range(len(sent) + 1, 4)]
    # The same run, resumed from the store: `server` is not run again, the rest completes.
    assert isinstance(resumed, sp.Completed)
    assert resumed.report.run_id == report.run_id
    assert [name for name, step in resumed.report.steps.items() if step.resumed] == ["server"]
    assert resumed.report.completed == ["server", "upload", "config", "start"]
    assert resumed.value.url.startswith("https://example.com/")


@pytest.mark.anyio
async def test_service_main_interrupts_one_run_by_id(anyio_backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    """examples/service.py: "south" is stopped by run id in `transform` after 4 of 6 orders; the others complete."""
    from decimal import Decimal

    service_py = DEPLOY.parent / "service.py"
    example = load_example(service_py)
    outcomes = await example.main()
    assert list(outcomes) == ["etl-1", "etl-2", "etl-3"]  # by run id, in the order the runs started

    north, south, west = outcomes.values()
    assert isinstance(north, sp.Completed)
    assert north.value == example.LoadSummary("north", 5, Decimal("531.29"))
    assert north.report.completed == ["extract", "transform", "load"]
    assert north.report.interrupts == []
    assert isinstance(west, sp.Completed)
    assert west.value == example.LoadSummary("west", 4, Decimal("1185.03"))
    assert west.report.completed == ["extract", "transform", "load"]

    assert isinstance(south, sp.Interrupted)
    assert not south.forced
    assert south.signal.reason == "cancelled by the operator"
    assert south.signal.source == "api"
    report = south.report
    assert report.run_id == "etl-2"
    assert report.completed == ["extract"]
    assert report.stopped == ["transform"]
    assert report.not_started == ["load"]
    # The order in flight when the operator cancelled (the 4th) was finished; the step stopped before the 5th,
    # at the stopping point of its `async for ... in ctx.iterate(...)` loop.
    transform = report.steps["transform"]
    assert transform.progress == sp.Progress(done=4, total=6, message="order 204")
    loop_line = next(
        number
        for number, line in enumerate(service_py.read_text().splitlines(), start=1)
        if "async for" in line and "ctx.iterate(" in line
    )
    assert transform.stopped_at == f"service.py:{loop_line}"
    assert south.checkpoint.outputs == {"extract": [201, 202, 203, 204, 205, 206]}

    out = capsys.readouterr().out
    assert "operator:  etl-2 is running transform at 3/6 (last: order 203); cancelling it" in out
    assert "running:   none" in out
    assert "warehouse: orders_north (5 rows), orders_west (4 rows)" in out


def test_resume_example_finishes_in_a_second_process() -> None:
    """examples/resume.py: process 1 is stopped in `render`; process 2 reuses fetch and aggregate from the file."""
    example = load_example(RESUME)
    result = example.main()
    first, second = result["first"], result["second"]
    assert first["outcome"] == "interrupted"
    assert first["ran"] == ["fetch", "aggregate", "render"]
    assert first["reason"] == "maintenance window"
    assert first["stopped_at"].startswith("resume.py:")
    assert first["progress"] == 2  # interrupted after page 2: the stopping point before page 3 stops it
    assert first["stored_status"] == ["interrupted"]
    assert second["outcome"] == "completed"
    assert second["resumed"] == ["fetch", "aggregate"]
    assert second["ran"] == ["render", "publish"]
    assert second["value"] == "4 pages, total 108.00"
    assert second["stored_status"] == ["completed"]


ETL = Path(__file__).resolve().parent.parent / "examples" / "etl.py"
TESTING_MY_FLOW = Path(__file__).resolve().parent.parent / "examples" / "testing_my_flow.py"


@pytest.mark.anyio
async def test_etl_stops_part_way_through_the_batch_and_resumes(anyio_backend: str) -> None:
    example = load_example(ETL)
    stopped, resumed = await example.main()
    step = stopped.report.steps["transform"]
    assert step.status is sp.StepStatus.INTERRUPTED
    assert step.progress is not None
    assert step.progress.done == 30_000  # stopped within `every=1000` records of the stop
    assert stopped.report.completed == ["extract"]
    saved = stopped.checkpoint.progress["transform"]
    assert saved["done"] == 30_000
    assert len(saved["out"]) == 30_000
    assert isinstance(resumed, sp.Completed)
    assert resumed.value == sum((i % 97) * 2 for i in range(100_000))
    assert example.began_at == [0, 30_000]  # the resume went on from the last save, not from record 0


def test_the_users_test_file_passes_with_the_plugin() -> None:
    """examples/testing_my_flow.py, as a user runs it: pytest, with stoppoint's plugin fixtures."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTING_MY_FLOW)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=TESTING_MY_FLOW.parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed" in result.stdout, result.stdout


SERVICE = Path(__file__).resolve().parent.parent / "examples" / "service.py"


@pytest.mark.anyio
async def test_every_example_flow_resumes_to_the_same_result_from_every_stopping_point(anyio_backend: str) -> None:
    """stoppoint.testing.check_resumable on the flow of each example (small inputs)."""
    from stoppoint.testing import check_resumable

    deploy = load_example(DEPLOY)
    deploy.PART_SECONDS = 0.0
    etl = load_example(ETL)
    etl.SAVE_EVERY = 1000  # saves within the 5,000 records checked
    invoice = load_example(TESTING_MY_FLOW)
    nightly = load_example(RESUME)
    nightly.STOP_AFTER_PAGE = None  # the example's own operator stays out of it
    service = load_example(SERVICE)
    cases: list[tuple[sp.Flow, dict[str, Any], dict[str, Any], int | None]] = [
        (deploy.deploy, {}, {}, 10),
        (etl.etl, {"records": 5000}, {}, 13),
        (invoice.invoice, {"customer": "acme"}, {}, 6),
        (nightly.flow, {"regions": ["north", "south", "east"]}, {}, 7),
        # Live objects (an API client, a warehouse) as resources: not in the checkpoint, given to every resume.
        (
            service.etl,
            {"batch": "north"},
            {"api": service.OrdersApi(service.ORDERS), "warehouse": service.Warehouse()},
            None,
        ),
    ]
    restored = []
    for flow, inputs, resources, points in cases:
        report = await check_resumable(flow, inputs, resources=resources)
        if points is not None:
            assert len(report.points) == points, flow.name
        assert all(report.chains.values())
        restored.append(report.restored)
    # The flows that save their progress (deploy's upload, etl's transform) resumed from it, to the same result.
    assert restored[0] > 0
    assert restored[1] > 0


def test_every_example_file_is_run_by_this_module() -> None:
    """The examples gallery stays tested: each file in examples/ is one this module runs."""
    examples = {path.name for path in (Path(__file__).resolve().parent.parent / "examples").glob("*.py")}
    run_here = {path.name for path in (DEPLOY, RESUME, ETL, TESTING_MY_FLOW, SERVICE, WORKERS, REPLICAS)}
    assert examples == run_here


WORKERS = Path(__file__).resolve().parent.parent / "examples" / "workers.py"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and SIGTERM are POSIX")
def test_workers_example_hands_a_killed_workers_run_over_and_interrupts_one_by_id(tmp_path: Path) -> None:
    """examples/workers.py, as a user runs it: two worker processes, one killed mid-run (the other completes
    its run at epoch 2, without fetching again), a run interrupted by `stoppoint interrupt` from a third."""
    result = subprocess.run(
        [sys.executable, str(WORKERS)], capture_output=True, text=True, timeout=90, check=False, cwd=tmp_path
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    killed = re.search(r"killing (worker-\d) \(pid \d+\) with SIGKILL: it owns order-1, in transform$", out, re.M)
    assert killed, out
    done = re.search(
        r"order-1: completed at epoch 2: total 385 published by (worker-\d) at epoch 2 "
        r"\(fetched by (worker-\d) at epoch 1\)$",
        out,
        re.M,
    )
    assert done, out
    survivor, fetcher = done.groups()
    assert fetcher == killed.group(1)
    assert survivor != fetcher
    assert f"the killed worker's run was completed by {survivor} at epoch 2" in out
    assert "order-1: steps taken from the store, not run again: fetch\n" in out
    assert f"[{survivor}] order-1 epoch 2: transform, 10 parts" in out  # the step in flight ran again
    assert f"[{survivor}] order-1 epoch 2: fetch" not in out
    assert re.search(r"asked \S+ to stop run order-2 of flow orders at its next stopping point$", out, re.M), out
    assert re.search(
        r"order-2: stored interrupted: transform interrupted after \d+ of 100 parts, "
        r"'customer cancelled' \(from cli\)$",
        out,
        re.M,
    ), out
    assert re.search(rf"{survivor} exited with code 0$", out, re.M), out


REPLICAS = Path(__file__).resolve().parent.parent / "examples" / "replicas.py"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and SIGTERM are POSIX")
def test_replicas_example_serves_any_run_from_any_replica(tmp_path: Path, pg_server: str) -> None:
    """examples/replicas.py, as a user runs it, on the session's server: three HTTP replicas with a worker each;
    the one running order-1 is killed and another finishes the run; order-2 is stopped through a replica that
    does not run it, then resumed; SIGTERM hands order-3 over at once (queued, never orphaned)."""
    from .pg import PgTarget, schema_exists

    result = subprocess.run(
        [sys.executable, str(REPLICAS), pg_server],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=tmp_path,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in result.stderr, result.stderr

    killed = re.search(r"killing (replica-\d) \(pid \d+\) with SIGKILL: it runs order-1, in transform$", out, re.M)
    assert killed, out
    victim = killed.group(1)
    done = re.search(
        r"order-1: completed at epoch 2: total 22140 published by (replica-\d) at epoch 2 "
        r"\(fetched by (replica-\d) at epoch 1\)$",
        out,
        re.M,
    )
    assert done, out
    survivor, fetcher = done.groups()
    assert fetcher == victim
    assert survivor != victim
    assert "order-1: steps taken from the store, not run again: fetch\n" in out
    assert f"[{survivor}] order-1 epoch 2: transform, 40 parts" in out  # the step in flight ran again
    assert "order-1 epoch 2: fetch" not in out

    routed = re.search(r"order-2 runs on (replica-\d); POST /runs/order-2/interrupt to (replica-\d)$", out, re.M)
    assert routed, out
    owner, other = routed.groups()
    assert owner != other
    assert victim not in (owner, other)
    assert f"{other} answered: requested True\n" in out
    assert re.search(
        rf"order-2: stored interrupted: transform interrupted after \d+ of 40 parts, 'customer cancelled' "
        rf"\(http via {other}\)$",
        out,
        re.M,
    ), out
    assert re.search(r"order-2: completed at epoch 2: total 22140 published by replica-\d at epoch 2 ", out), out

    leaving = re.search(r"sending SIGTERM to (replica-\d): it runs order-3$", out, re.M)
    assert leaving, out
    assert f"[{leaving.group(1)}] shutting down: stopping the worker" in out
    assert f"[{leaving.group(1)}] worker stopped" in out
    assert re.search(r"order-3: queued, epoch 1 ", out), out  # released by the worker's stop ...
    assert "order-3: orphaned" not in out  # ... never left to expire
    assert re.search(r"order-3: completed at epoch 2: total 22140 published by replica-\d at epoch 2 ", out), out
    assert len(re.findall(r"^ *[\d.]+ s  replica-\d exited: on SIGTERM$", out, re.M)) == 2, out

    dropped = re.search(r"^dropped schema (replicas_demo_\w+)$", out, re.M)
    assert dropped, out
    assert not schema_exists(PgTarget(pg_server, dropped.group(1)))
