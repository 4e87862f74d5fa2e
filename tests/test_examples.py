"""The examples run and stop where they say they stop."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import stoppoint as sp

DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy.py"


def load_example(path: Path) -> ModuleType:
    """Import an example by path (examples/ is not a package), as a fresh module each time."""
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_script_prints_report() -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=DEPLOY.parent.parent,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^outcome:\s+Interrupted$", out, re.MULTILINE), out
    assert re.search(r"^completed:\s+server$", out, re.MULTILINE), out
    assert re.search(r"^stopped:\s+upload at deploy\.py:\d+$", out, re.MULTILINE), out
    assert re.search(r"^not started:\s+config, start$", out, re.MULTILINE), out
    assert "operator pressed stop" in out


@pytest.mark.anyio
async def test_deploy_main_is_interrupted_in_upload(anyio_backend: str) -> None:
    example = load_example(DEPLOY)
    outcome = await example.main()
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
