"""Drives benchmark jobs against a forgeline API: submit, follow the stream, measure.

Every job is measured from the client's side, the way an application sees
forgeline: the clock starts just before ``POST /api/v1/jobs`` and stops at
the stream's ``final`` event. The job's own timestamps, read back once it has
finished, give the queue wait and which jobs ran at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from forgeline.benchmark import BenchmarkError
from forgeline.benchmark.stats import JobSample, Outcome
from forgeline.benchmark.stream import JobWatch, SseDecoder

#: What a story job asks for unless ``--input`` says otherwise.
DEFAULT_STORY_INPUT: dict[str, Any] = {"prompt": "A lighthouse keeper finds a door in the sea"}
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
#: Longest silence on a stream before it counts as dropped (the server pings every 15 s).
STREAM_READ_TIMEOUT_S = 45.0
#: How long a dropped stream is retried before the job counts as lost.
RECONNECT_FOR_S = 30.0
RECONNECT_PAUSE_S = 0.5
#: Budget for cancelling a job that ran past the job timeout (best effort).
CANCEL_TIMEOUT_S = 5.0
#: Final statuses of a job, as the benchmark counts them.
FINAL_OUTCOMES = {
    "succeeded": Outcome.SUCCEEDED,
    "failed": Outcome.FAILED,
    "cancelled": Outcome.CANCELLED,
}

JobDone = Callable[[JobSample], None]


@dataclass(frozen=True)
class BenchPlan:
    """What to run: how many jobs of which pipeline, how many at once, against what."""

    base_url: str
    pipeline: str
    job_input: dict[str, Any]
    jobs: int
    concurrency: int
    #: Seconds over which the jobs in flight grow from one to ``concurrency``.
    ramp_s: float = 0.0
    api_key: str | None = None
    #: A job with no final event this long after its submit counts as timed out.
    job_timeout_s: float = 120.0


@dataclass(frozen=True)
class BenchRun:
    """Every job's sample, when the run started (ISO 8601, UTC) and how long it took."""

    samples: list[JobSample]
    started_at: str
    wall_s: float


def default_input(pipeline: str) -> dict[str, Any]:
    """The input each job gets when none is given: a story prompt, or nothing."""
    return dict(DEFAULT_STORY_INPUT) if pipeline == "story" else {}


class Benchmark:
    """Runs a :class:`BenchPlan` and returns what every job saw::

        async with Benchmark(plan) as benchmark:  # checks the server once
            run = await benchmark.run(on_job_done=print)

    Jobs run ``concurrency`` at a time (a semaphore). With a ramp, the
    semaphore opens with one slot and the others open one by one, evenly
    over ``ramp_s``. A problem that would fail every job the same way (the
    server is unreachable, refuses the key, does not know the pipeline)
    stops the run with a :class:`BenchmarkError`; anything else is recorded
    as that job's outcome.
    """

    def __init__(self, plan: BenchPlan) -> None:
        self.plan = plan
        self.base_url = plan.base_url.rstrip("/")
        try:
            parts = urlsplit(self.base_url)
            usable = parts.scheme in {"http", "https"} and bool(parts.hostname)
        except ValueError:
            usable = False
        if not usable:
            raise BenchmarkError(f"--url must be an http:// or https:// URL, not {self.base_url!r}")
        headers = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
        # A submit and a stream per job in flight, and a few to spare.
        connections = 2 * plan.concurrency + 4
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )
        self._on_job_done: JobDone | None = None

    async def __aenter__(self) -> Benchmark:
        """Check the server once (URL, key, pipeline) before any job is sent."""
        try:
            await self._preflight()
        except BaseException:
            await self._http.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def run(self, *, on_job_done: JobDone | None = None) -> BenchRun:
        """Run every job; return the samples in submit order."""
        self._on_job_done = on_job_done
        return await self._run_jobs()

    async def _run_jobs(self) -> BenchRun:
        plan = self.plan
        ramping = plan.ramp_s > 0 and plan.concurrency > 1
        slots = asyncio.Semaphore(1 if ramping else plan.concurrency)
        samples: list[JobSample] = []
        started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        origin = time.perf_counter()
        ramp = asyncio.create_task(self._ramp_up(slots)) if ramping else None
        try:
            async with asyncio.TaskGroup() as group:
                for index in range(plan.jobs):
                    group.create_task(self._job(slots, index, origin, samples))
        except* BenchmarkError as stopped:
            raise stopped.exceptions[0] from None
        finally:
            if ramp is not None:
                ramp.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ramp
        wall_s = time.perf_counter() - origin
        return BenchRun(sorted(samples, key=lambda s: s.index), started_at, wall_s)

    async def _ramp_up(self, slots: asyncio.Semaphore) -> None:
        step_s = self.plan.ramp_s / (self.plan.concurrency - 1)
        for _ in range(self.plan.concurrency - 1):
            await asyncio.sleep(step_s)
            slots.release()  # one more job may be in flight from now on

    async def _job(
        self,
        slots: asyncio.Semaphore,
        index: int,
        origin: float,
        samples: list[JobSample],
    ) -> None:
        async with slots:
            sample = await self._measure(JobWatch(index, origin))
        samples.append(sample)
        if self._on_job_done is not None:
            self._on_job_done(sample)

    async def _measure(self, watch: JobWatch) -> JobSample:
        timeout_s = self.plan.job_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._submit_and_follow(watch)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            # The run stops (Ctrl-C, or another job found a fatal problem):
            # leave no job of ours queued or running on the server.
            if watch.job_id is not None and watch.final_at is None:
                await asyncio.shield(self._cancel(watch.job_id))
            raise
        if watch.job_id is not None:
            await self._cancel(watch.job_id)
        return watch.sample(Outcome.TIMEOUT, "timeout", f"no final event within {timeout_s:g} s")

    async def _submit_and_follow(self, watch: JobWatch) -> JobSample:
        body = {"pipeline": self.plan.pipeline, "input": self.plan.job_input}
        try:
            response = await self._http.post("/api/v1/jobs", json=body)
        except httpx.TransportError as exc:
            return watch.sample(Outcome.REJECTED, "unreachable", _describe(exc))
        watch.submit_s = time.perf_counter() - watch.sent
        status = response.status_code
        if status in {401, 403}:
            raise self._key_refused(response)
        if status == 429 or status >= 500:
            # Load the server sheds: part of what a benchmark measures.
            return watch.sample(Outcome.REJECTED, _code(response), _reason(response))
        if status >= 400:
            # Unknown pipeline, invalid input: every other job would fail the same way.
            raise BenchmarkError(f"{self.base_url} refused the job: {_reason(response)}")
        watch.job_id = str(response.json()["id"])
        try:
            final = await self._follow(watch)
        except _StreamLost as lost:
            return watch.sample(Outcome.LOST, lost.code, lost.message)
        await self._read_job(watch)
        outcome = FINAL_OUTCOMES.get(str(final.get("status")), Outcome.FAILED)
        error = final.get("error") or {}
        return watch.sample(outcome, error.get("code"), error.get("message"))

    async def _follow(self, watch: JobWatch) -> dict[str, Any]:
        """Read the job's stream to its final event, resuming after a drop; return that event."""
        path = f"/api/v1/jobs/{watch.job_id}/events"
        timeout = httpx.Timeout(
            REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=STREAM_READ_TIMEOUT_S
        )
        last = 0
        failing_since: float | None = None
        while True:
            headers = {"Last-Event-ID": str(last), "Accept": "text/event-stream"}
            try:
                stream = self._http.stream("GET", path, headers=headers, timeout=timeout)
                async with stream as response:
                    if response.status_code >= 400:
                        await response.aread()
                        problem = self._stream_refused(response)
                    else:
                        decoder = SseDecoder()
                        problem = "the stream ended before the final event"
                        async for line in response.aiter_lines():
                            event = decoder.feed(line)
                            if event is None:
                                continue
                            failing_since = None
                            if event.type == "reconnect":
                                break  # the server is going away: resume elsewhere
                            last = event.seq
                            final = watch.see(event, time.perf_counter())
                            if final is not None:
                                return final
            except httpx.TransportError as exc:
                problem = _describe(exc)
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > RECONNECT_FOR_S:
                raise _StreamLost("stream_lost", f"lost the stream: {problem}")
            await asyncio.sleep(RECONNECT_PAUSE_S)

    def _stream_refused(self, response: httpx.Response) -> str:
        """Why the stream was refused; raises when retrying cannot help."""
        status = response.status_code
        if status in {401, 403}:
            raise self._key_refused(response)
        if status < 500 and status != 429:
            raise _StreamLost(_code(response), _reason(response))
        return f"HTTP {status}: {_reason(response)}"

    async def _read_job(self, watch: JobWatch) -> None:
        """Keep the finished job's timestamps; without them only the queue wait is missing."""
        with contextlib.suppress(httpx.TransportError, ValueError):
            response = await self._http.get(f"/api/v1/jobs/{watch.job_id}")
            if response.status_code == 200:
                watch.record_job(response.json())

    async def _cancel(self, job_id: str) -> None:
        """Ask the server to stop a job the benchmark gave up on, so it frees its worker."""
        with contextlib.suppress(httpx.TransportError):
            await self._http.post(f"/api/v1/jobs/{job_id}/cancel", timeout=CANCEL_TIMEOUT_S)

    async def _preflight(self) -> None:
        """Fail once, clearly, for a wrong URL, a refused key or an unknown pipeline."""
        try:
            response = await self._http.get("/api/v1/pipelines")
        except httpx.TransportError as exc:
            raise BenchmarkError(
                f"cannot reach forgeline at {self.base_url}: {_describe(exc)}"
            ) from None
        if response.status_code in {401, 403}:
            raise self._key_refused(response)
        try:
            names = [str(item["name"]) for item in response.json()["items"]]
            if response.status_code != 200:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise BenchmarkError(
                f"{self.base_url} is not a forgeline API: GET /api/v1/pipelines answered "
                f"HTTP {response.status_code}"
            ) from None
        if self.plan.pipeline not in names:
            raise BenchmarkError(
                f"unknown pipeline {self.plan.pipeline!r}; {self.base_url} runs: "
                f"{', '.join(names) or 'none'}"
            )

    def _key_refused(self, response: httpx.Response) -> BenchmarkError:
        status = response.status_code
        if self.plan.api_key is None:
            return BenchmarkError(
                f"{self.base_url} requires an API key (HTTP {status}: {_reason(response)}); "
                "pass --key"
            )
        return BenchmarkError(
            f"{self.base_url} rejected the API key (HTTP {status}: {_reason(response)})"
        )


class _StreamLost(Exception):
    """The job's stream could not be read to its end."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _envelope(response: httpx.Response) -> dict[str, Any]:
    """The ``error`` object of forgeline's error envelope, or an empty one."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return {}
    return error if isinstance(error, dict) else {}


def _code(response: httpx.Response) -> str:
    """The envelope's error code, or ``http_<status>``."""
    return str(_envelope(response).get("code") or f"http_{response.status_code}")


def _reason(response: httpx.Response) -> str:
    """The envelope's message with the problems it details, or the HTTP reason."""
    error = _envelope(response)
    message = str(error.get("message") or response.reason_phrase or "no reason given")
    details = error.get("details")
    if isinstance(details, list):
        problems = [
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in details
            if isinstance(item, dict) and "loc" in item and "msg" in item
        ]
        if problems:
            message += f" ({'; '.join(problems)})"
    return message


def _describe(exc: httpx.HTTPError) -> str:
    # Some httpx errors (timeouts) carry no message of their own.
    return str(exc) or type(exc).__name__
