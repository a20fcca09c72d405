"""Pipelines that exist only for tests: sleepers, a poison pill, a side-effect writer.

Worker subprocesses load them with ``FORGELINE_PIPELINES=tests.support.pipelines:Name``
(the subprocess helper puts the repository root on ``PYTHONPATH``); in-process
runtimes take the same path in their settings.

Every run can append to a *journal*, a file named in the job's input, one JSON
line per event (``start``, ``artifact``, ``end``) with the job id, the attempt
and the process id. Lines are written with ``O_APPEND`` straight to the kernel,
so a line written just before a ``kill -9`` survives it, and several worker
processes can share one journal. Tests count executions per job from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forgeline.backends.base import Usage
from forgeline.pipelines.base import Pipeline, PipelineContext

#: The variable a worker subprocess reads its extra pipelines from.
PIPELINES_VARIABLE = "FORGELINE_PIPELINES"


def journal(path: str | None, event: str, ctx: PipelineContext, **fields: Any) -> None:
    """Append one event of this run to the journal at ``path`` (if any)."""
    if path is None:
        return
    line = json.dumps(
        {
            "event": event,
            "job_id": str(ctx.job_id),
            "attempt": ctx.attempt,
            "pid": os.getpid(),
            "t": time.time(),
            **fields,
        }
    )
    # One write(2) per line on an O_APPEND descriptor: lines from concurrent
    # processes never interleave, and nothing waits in a user-space buffer.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Every event written to the journal at ``path``, oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def starts_by_job(events: list[dict[str, Any]]) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """The ``start`` events of each job: one per execution."""
    starts: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for event in events:
        if event["event"] == "start":
            starts.setdefault(uuid.UUID(event["job_id"]), []).append(event)
    return starts


class SleepInput(BaseModel):
    """How long to sleep, and where to record it."""

    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=0.5, ge=0, le=600)
    journal: str | None = None
    #: Free text, so many otherwise identical jobs can differ in input.
    tag: str = ""


class SleepPipeline(Pipeline):
    """Sleeps cooperatively (``asyncio.sleep``), so a cancellation stops it at once."""

    name = "sleep"
    description = "Sleeps for the given number of seconds (tests only)."
    input_model = SleepInput

    async def run(self, ctx: PipelineContext) -> dict[str, Any]:
        job = SleepInput.model_validate(ctx.input)
        journal(job.journal, "start", ctx)
        await asyncio.sleep(job.seconds)
        journal(job.journal, "end", ctx)
        return {"slept_s": job.seconds, "tag": job.tag}


class PoisonInput(BaseModel):
    """Where to record each attempt before dying."""

    model_config = ConfigDict(extra="forbid")

    journal: str | None = None


class SuicidePipeline(Pipeline):
    """The poison pill: kills its own worker process with SIGKILL.

    It refuses to run in a process that did not load it through
    ``FORGELINE_PIPELINES``, so that a mistake never kills the test runner.
    """

    name = "suicide"
    description = "Kills the worker running it with SIGKILL (tests only)."
    input_model = PoisonInput

    async def run(self, ctx: PipelineContext) -> dict[str, Any]:
        job = PoisonInput.model_validate(ctx.input)
        if "SuicidePipeline" not in os.environ.get(PIPELINES_VARIABLE, ""):
            raise RuntimeError(
                f"refusing to kill process {os.getpid()}: it did not load this pipeline "
                f"from {PIPELINES_VARIABLE}"
            )
        journal(job.journal, "start", ctx)
        os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(60)  # not reached: SIGKILL is delivered at once
        raise RuntimeError("survived SIGKILL")


class ArtifactInput(BaseModel):
    """What to write, and how long to wait between the artifact and the result."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(default="forged", max_length=10_000)
    copies: int = Field(default=3, ge=1, le=1000)
    #: Sleep after the artifact is stored: a window to kill the worker in.
    linger_s: float = Field(default=0.0, ge=0, le=600)
    journal: str | None = None


def artifact_body(job: ArtifactInput) -> bytes:
    """The artifact's bytes: a pure function of the input, as idempotency requires."""
    return "\n".join([job.text] * job.copies).encode()


def artifact_usage(job: ArtifactInput) -> Usage:
    """The tokens one run charges: also a pure function of the input."""
    return Usage(prompt_tokens=len(job.text.split()), completion_tokens=job.copies)


class ArtifactPipeline(Pipeline):
    """Stores ``out.txt``, counts usage, lingers, then succeeds."""

    name = "artifact"
    description = "Writes one artifact and charges usage (tests only)."
    input_model = ArtifactInput

    async def run(self, ctx: PipelineContext) -> dict[str, Any]:
        job = ArtifactInput.model_validate(ctx.input)
        journal(job.journal, "start", ctx)
        body = artifact_body(job)
        key = await ctx.put_artifact("out.txt", body, "text/plain")
        journal(job.journal, "artifact", ctx, key=key)
        ctx.add_usage(artifact_usage(job))
        await asyncio.sleep(job.linger_s)
        journal(job.journal, "end", ctx)
        return {"artifact": "out.txt", "size": len(body)}


class CrashInput(BaseModel):
    """Nothing: the pipeline always crashes."""

    model_config = ConfigDict(extra="forbid")


class CrashPipeline(Pipeline):
    """Crashes with a bug while a secret from the environment is in a local variable.

    If a rendered traceback showed local variables, the secret would be in the logs.
    """

    name = "crash"
    description = "Raises an unexpected error holding a secret in a local (tests only)."
    input_model = CrashInput

    async def run(self, ctx: PipelineContext) -> dict[str, Any]:
        secret = os.environ.get("FORGELINE_OPENAI_API_KEY", "")
        return {"length": len(secret) // 0}
