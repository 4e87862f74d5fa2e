"""The README's transcript of the `stoppoint` command is what a real run prints (it cannot go stale).

The transcript's commands are run as written, in a directory holding the real `examples/deploy.py`,
with one SIGINT where the transcript shows `^C`; the output must match the transcript line for line,
but for the clock (HH:MM:SS, step durations) and the run's random id. A `...` line stands for any lines.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def transcript() -> list[str]:
    """The lines of the README's `stoppoint` transcript (the first text block of its cli section)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("<!-- --8<-- [start:cli] -->", 1)[1]
    block = re.search(r"```text\n(.*?)\n```", section, re.DOTALL)
    assert block is not None, "the README's cli section has no text block"
    return block.group(1).splitlines()


def sessions(lines: list[str]) -> list[tuple[list[str], list[str]]]:
    """(command words, expected output lines) for each `$ ` line of the transcript."""
    found: list[tuple[list[str], list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            command = line[2:].split("#", 1)[0]
            found.append((shlex.split(command), []))
        else:
            found[-1][1].append(line)
    return found


def normalised(line: str, run_id: str | None) -> str:
    line = re.sub(r"^\d\d:\d\d:\d\d ", "HH:MM:SS ", line)
    line = re.sub(r"\(\d+\.\d\d s\)", "(N.NN s)", line)
    if run_id is not None:
        line = line.replace(run_id, "RUN_ID")
    return line.rstrip()


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line; a `...` line of `expected` matches any number of lines."""
    pattern = "\n".join(".*?" if line == "..." else re.escape(line) for line in expected)
    pattern = pattern.replace("\n.*?\n", "(?:\n.*?)*?\n")
    return re.fullmatch(pattern, "\n".join(actual), re.DOTALL) is not None


def test_the_readme_transcript_is_what_the_command_prints(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "deploy.py").symlink_to(ROOT / "examples" / "deploy.py")
    [(run_words, run_expected), (resume_words, resume_expected)] = sessions(transcript())
    assert run_words[:2] == ["stoppoint", "run"], run_words
    assert resume_words[:2] == ["stoppoint", "resume"], resume_words
    readme_id = resume_words[2]
    env = {**os.environ, "DEPLOY_PART_SECONDS": "1.0"}  # the part in flight when ^C lands is finished

    # The run, with one SIGINT where the transcript shows ^C (after the line that comes before it).
    cue = run_expected[run_expected.index("^C") - 1]
    process = subprocess.Popen(
        [sys.executable, "-m", "stoppoint", *run_words[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert process.stdout is not None
    lines: list[str] = []
    run_id: str | None = None
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if run_id is None and (found := re.match(r"run (\S+) of flow", line)):
                run_id = found.group(1)
            if normalised(line, run_id) == normalised(cue, readme_id):
                process.send_signal(signal.SIGINT)
                break
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    lines += out.splitlines()
    assert process.returncode == 130, err
    assert run_id is not None, lines
    expected = [normalised(line, readme_id) for line in run_expected if line != "^C"]
    actual = [normalised(line, run_id) for line in lines]
    assert matches(expected, actual), "\n".join(["README:", *expected, "", "real run:", *actual])

    # The resume, as the transcript types it, with the real run id.
    resumed = subprocess.run(
        [sys.executable, "-m", "stoppoint", "resume", run_id, *resume_words[3:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**env, "DEPLOY_PART_SECONDS": "0.01"},
    )
    assert resumed.returncode == 0, resumed.stderr
    expected = [normalised(line, readme_id) for line in resume_expected]
    actual = [normalised(line, run_id) for line in resumed.stdout.splitlines()]
    assert matches(expected, actual), "\n".join(["README:", *expected, "", "real run:", *actual])


def test_the_transcript_matcher_tells_lines_apart() -> None:
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a", "...", "d"], ["a", "d"])
    assert not matches(["a", "...", "d"], ["a", "b", "c"])
    assert not matches(["a", "b"], ["a", "c"])
    assert normalised("14:48:13 step.completed server (0.00 s)", None) == "HH:MM:SS step.completed server (N.NN s)"


def readme_testing_snippet() -> str:
    """The Python block of the README's "Testing your flows" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("<!-- --8<-- [start:testing] -->", 1)[1].split("<!-- --8<-- [end:testing] -->", 1)[0]
    block = re.search(r"```python\n(.*?)\n```", section, re.DOTALL)
    assert block is not None, "the README's testing section has no python block"
    return block.group(1)


def test_the_readme_testing_snippet_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its top-level awaits run in one coroutine, with `deploy` importable as `examples/` puts it."""
    monkeypatch.setenv("DEPLOY_PART_SECONDS", "0.001")
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.delitem(sys.modules, "deploy", raising=False)
    body = textwrap.indent(readme_testing_snippet(), "    ")
    namespace: dict[str, object] = {}
    exec(compile(f"async def snippet():\n{body}\n", str(README), "exec"), namespace)
    anyio.run(namespace["snippet"])  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "deploy", raising=False)
