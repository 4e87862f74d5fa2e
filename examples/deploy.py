"""A deploy flow that an operator stops halfway through the upload, persisted, then resumed.

Run it with `stoppoint run examples/deploy.py:deploy` (press Ctrl-C during the upload, then run the `stoppoint
resume RUN_ID` it prints), or with `python examples/deploy.py`, which plays the operator itself, as follows.

The flow has four steps, server -> upload -> config -> start. While `upload` sends its parts, another task (the
"operator") interrupts the run once the first part is up. The part being uploaded at that moment is finished,
never cut off; the upload then stops at its next stopping point, and `config` and `start` never begin. The run
returns `sp.Interrupted`, whose report says what happened to each step.

The run is persisted in the embedded store, an SQLite file (`.stoppoint/deploy.db` by default), and `main()`
then runs the flow again with the same run id, which resumes it: `server` is not run again (its output comes
back from the file), the upload goes on from the part where it stopped (it saves the parts it sent after each
one, with `ctx.save()`, and reads them back with `ctx.restored()`), and the deploy completes. Each run of the
script is a new run id.
"""

import os
import uuid
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

import stoppoint as sp

PARTS = ("app.tar.gz", "static.tar.gz", "migrations.sql")
# Seconds to "send" each part: long enough to press Ctrl-C under `stoppoint run` (tests make it short).
PART_SECONDS = float(os.environ.get("DEPLOY_PART_SECONDS", "1.0"))


class ServerInfo(BaseModel):
    host: str
    release_dir: str


class UploadReceipt(BaseModel):
    server: ServerInfo
    parts: list[str]


class AppConfig(BaseModel):
    release_dir: str
    settings: dict[str, str]


class Deployment(BaseModel):
    url: str


deploy = sp.Flow("deploy")

# The upload step sets this event once its first part is up, which is the operator's cue to press stop. `main()`
# makes a fresh one per run: an anyio event belongs to one event loop, and the tests run `main()` once per backend.
first_part_uploaded: anyio.Event | None = None


@deploy.step
async def server(ctx: sp.StepContext, host: str = "web-1.example.com") -> ServerInfo:
    await ctx.checkpoint()
    return ServerInfo(host=host, release_dir=f"/srv/app/releases/{ctx.run_id}")


@deploy.step
async def upload(ctx: sp.StepContext, server: ServerInfo) -> UploadReceipt:
    # The parts an earlier attempt of this run sent (a resume's, a recovery's): they are not sent again.
    uploaded = ctx.restored(list[str], default=[])
    # `ctx.iterate` puts a stopping point before every part: if the run was interrupted, the step stops there.
    async for part in ctx.iterate(PARTS[len(uploaded) :]):
        ctx.progress(len(uploaded), len(PARTS), f"sending {part}")
        await anyio.sleep(PART_SECONDS)  # pretend to send the part
        uploaded.append(part)
        await ctx.save(uploaded)  # committed to the store before it returns: a resume starts after this part
        print(f"  uploaded part {len(uploaded)}/{len(PARTS)}: {part} -> {server.host}:{server.release_dir}")
        if len(uploaded) == 1 and first_part_uploaded is not None:
            first_part_uploaded.set()
    ctx.progress(len(uploaded), len(PARTS), "all parts sent")
    return UploadReceipt(server=server, parts=uploaded)


@deploy.step
async def config(ctx: sp.StepContext, upload: UploadReceipt) -> AppConfig:
    await ctx.checkpoint()
    return AppConfig(release_dir=upload.server.release_dir, settings={"parts": ",".join(upload.parts)})


@deploy.step
async def start(ctx: sp.StepContext, config: AppConfig) -> Deployment:
    await ctx.checkpoint()
    return Deployment(url=f"https://example.com/ (serving {config.release_dir})")


async def operator(interrupter: sp.Interrupter, cue: anyio.Event) -> None:
    """Another task: press stop as soon as the first part is uploaded."""
    await cue.wait()
    interrupter.interrupt("operator pressed stop", source="example")


def print_report(outcome: sp.Completed[Any] | sp.Interrupted) -> None:
    report = outcome.report
    print(f"outcome:     {type(outcome).__name__}")
    match outcome:
        case sp.Completed(value):
            print(f"result:      {value!r}")
        case sp.Interrupted(signal, checkpoint=checkpoint):
            print(f"signal:      {signal.reason!r} (source: {signal.source})")
            for name, state in checkpoint.progress.items():
                print(f"saved:       {name}: {state!r} (a resume goes on from there)")
    resumed = [name for name, step in report.steps.items() if step.resumed]
    if resumed:
        print(f"resumed:     {', '.join(resumed)} (outputs from the store, not run again)")
    print(f"completed:   {', '.join(report.completed) or '-'}")
    for name in report.stopped:
        print(f"stopped:     {name} at {report.steps[name].stopped_at}")
    print(f"not started: {', '.join(report.not_started) or '-'}")


async def main(
    store_path: Path = Path(".stoppoint") / "deploy.db",
) -> tuple[sp.Completed[Any] | sp.Interrupted, sp.Completed[Any] | sp.Interrupted]:
    """Deploy, get stopped by the operator, then resume the same run from the store; both outcomes."""
    global first_part_uploaded
    first_part_uploaded = cue = anyio.Event()
    run_id = f"deploy-{uuid.uuid4().hex[:8]}"
    store_path.parent.mkdir(parents=True, exist_ok=True)
    inputs = {"host": "web-1.example.com"}
    interrupter, receiver = sp.interrupt_channel()
    async with sp.SQLiteStore(store_path) as store:
        with interrupter, receiver:  # closing both avoids "unclosed stream" ResourceWarnings
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(operator, interrupter, cue)
                print(f"deploying in {len(deploy.steps)} steps: {' -> '.join(deploy.steps)} (run {run_id})")
                stopped = await deploy.run(inputs, interrupts=receiver, store=store, run_id=run_id)
                task_group.cancel_scope.cancel()  # the operator need not wait for a cue that will never come
        print_report(stopped)
        first_part_uploaded = None  # no operator this time
        print(f"\nresuming run {run_id} from {store_path}")
        resumed = await deploy.run(inputs, store=store, run_id=run_id)
        print_report(resumed)
    return stopped, resumed


if __name__ == "__main__":
    anyio.run(main)
