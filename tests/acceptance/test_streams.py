"""Live output over SSE and WebSocket, as clients on a flaky network see it.

Every test runs forgeline's commands as subprocesses against the real test
model server, and reads streams the way a browser or the CLI does. The
promise under test is the one of ``forgeline.events.stream``: whatever
happens to the connection, the API process, or the worker, a client that
resumes with the last sequence number it has receives every event of the
job exactly once, in order, and the text after the last ``attempt`` event
is the job's result.

Covers RELIABILITY.md items 9 (SIGTERM with live streams) and 10 (an idle
generation behind nginx), both marked slow. Nothing sleeps to wait for
something: every wait polls with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from forgeline.api.routes.events import HEARTBEAT_S
from tests.acceptance.conftest import ProcessFactory
from tests.support.auth import AUTH
from tests.support.openai_server import OpenAIServer
from tests.support.processes import ForgelineProcess, free_port
from tests.support.sse import (
    SseEvent,
    SseParser,
    Transcript,
    aread_events,
    events_url,
    read_events,
)

PROMPT = "a lighthouse keeper finds a door in the sea"
FINAL_STATUSES = {"succeeded", "failed", "cancelled"}
#: Recovery timings for worker subprocesses: a dead worker's job is handed back
#: within about 2.5 s (valid: stall 2 s > drain 1 s + two heartbeats of 0.25 s).
QUICK_TIMINGS: dict[str, Any] = {
    "drain_timeout_s": 1.0,
    "heartbeat_interval_s": 0.25,
    "stall_threshold_s": 2.0,
    "sweep_interval_s": 0.25,
    "retry_backoff_s": 0.0,
}
#: A cancelled running job must have stopped streaming within this long.
CANCEL_BUDGET_S = 1.0
#: A pod's grace period on Cloud Run; the API must exit well inside it.
GRACE_BUDGET_S = 10.0


# -- helpers ------------------------------------------------------------------------


def numbered_pieces(count: int) -> list[str]:
    """A reply of ``count`` distinct words, so any lost or repeated piece shows in the text."""
    return [f"w{i} " for i in range(count - 1)] + ["end."]


def long_story(server: OpenAIServer, pieces: int, per_second: float) -> str:
    """Make every reply ``pieces`` words at ``per_second``; the whole reply's text."""
    server.pieces = numbered_pieces(pieces)
    server.piece_delay_s = 1 / per_second
    return "".join(server.pieces)


def story_input(pieces: int) -> dict[str, Any]:
    """Input of a story job long enough for the model server's whole reply."""
    return {"prompt": PROMPT, "max_tokens": pieces}


def submit(base_url: str, job_input: dict[str, Any], *, cancel_on_disconnect: bool = False) -> str:
    """Submit a story job; its id."""
    body = {"pipeline": "story", "input": job_input, "cancel_on_disconnect": cancel_on_disconnect}
    response = httpx.post(f"{base_url}/api/v1/jobs", headers=AUTH, json=body, timeout=10)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def get_job(base_url: str, job_id: str) -> dict[str, Any]:
    """The job as the API shows it."""
    response = httpx.get(f"{base_url}/api/v1/jobs/{job_id}", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, *, what: str, interval_s: float = 0.02
) -> Any:
    """Poll ``predicate`` until it is truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true after {timeout_s:g} s: {what}")
        time.sleep(interval_s)


async def async_wait_until(
    predicate: Callable[[], Any], timeout_s: float, *, what: str, interval_s: float = 0.02
) -> Any:
    """Poll ``predicate`` from a coroutine until it is truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true after {timeout_s:g} s: {what}")
        await asyncio.sleep(interval_s)


def wait_final(base_url: str, job_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll the job until it is final; the job."""
    job: dict[str, Any] = {}

    def final() -> bool:
        nonlocal job
        job = get_job(base_url, job_id)
        return job["status"] in FINAL_STATUSES

    wait_until(final, timeout_s, what=f"job {job_id} final (last seen: {job})", interval_s=0.05)
    return job


def read_to_end(
    client: httpx.Client, base_url: str, job_id: str, transcript: Transcript | None = None
) -> Transcript:
    """Follow a job's stream from where ``transcript`` stands to its final event."""
    transcript = transcript or Transcript()
    transcript.connections += 1
    for event in read_events(
        client, events_url(base_url, job_id), last_event_id=transcript.last_seq
    ):
        transcript.add(event)
    assert transcript.final is not None, "the stream ended before the final event"
    return transcript


def assert_whole(transcript: Transcript, story: str) -> None:
    """The job succeeded with ``story``, and the stream carried it exactly once, in order."""
    final = transcript.final
    assert final is not None
    assert final.data["status"] == "succeeded", final.data
    assert transcript.seqs == list(range(1, len(transcript.events) + 1))
    assert final.data["result"]["text"] == story
    assert transcript.text() == story


def start_replicas(start_forgeline: ProcessFactory) -> tuple[ForgelineProcess, ForgelineProcess]:
    """Two ``forgeline api`` replicas on one database, started side by side; once both are ready."""
    replicas = (start_forgeline("api", wait=False), start_forgeline("api", wait=False))
    for replica in replicas:
        replica.wait_ready()
    return replicas


def ws_url(process: ForgelineProcess, job_id: str, after: int | None = None) -> str:
    """The WebSocket endpoint of a job on ``process``."""
    query = "" if after is None else f"?after={after}"
    return f"ws://127.0.0.1:{process.port}/api/v1/jobs/{job_id}/ws{query}"


def ws_connect(url: str) -> ClientConnection:
    """A WebSocket client connection straight to ``url`` (no proxy from the environment)."""
    return connect(url, proxy=None, open_timeout=10, close_timeout=2, additional_headers=AUTH)


def ws_events(connection: ClientConnection) -> Iterator[SseEvent]:
    """Messages of a job's WebSocket stream, as events; ends when the server closes."""
    with contextlib.suppress(ConnectionClosedOK):
        while True:
            message = json.loads(connection.recv(timeout=30))
            yield SseEvent(message.get("seq"), message["type"], message["data"])


# -- resuming across dropped connections --------------------------------------------

RECONNECTS = 200


def test_two_hundred_random_reconnects_lose_and_repeat_nothing(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """200 connections dropped at random lines during one generation, each resumed with
    Last-Event-ID, give the final text exactly, with no gap and no duplicate."""
    # Long enough for 200 reconnects on a slow machine; sped up once they are done.
    pieces = 4000
    story = long_story(openai_server, pieces, per_second=300)
    serve = start_forgeline("serve")
    rng = random.Random(20240917)
    job_id = submit(serve.url, story_input(pieces))
    url = events_url(serve.url, job_id)
    transcript = Transcript()
    dropped_at: list[dt.datetime] = []

    with httpx.Client(headers=AUTH, timeout=10) as client:
        while transcript.final is None:
            assert transcript.connections < 20 * RECONNECTS, "the stream never reached its end"
            transcript.connections += 1
            # Cut after a random number of lines, between events or inside one;
            # past the 200th cut, read the rest in one go.
            lines = rng.randint(0, 7) if len(dropped_at) < RECONNECTS else None
            for event in read_events(
                client, url, last_event_id=transcript.last_seq, max_lines=lines
            ):
                transcript.add(event)
            if transcript.final is None:
                dropped_at.append(dt.datetime.now(dt.UTC))
            if len(dropped_at) == RECONNECTS:
                openai_server.piece_delay_s = 0.0  # let the rest of the story through

    job = get_job(serve.url, job_id)
    finished_at = dt.datetime.fromisoformat(job["finished_at"])
    ran_s = (finished_at - dt.datetime.fromisoformat(job["started_at"])).total_seconds()
    during = sum(1 for moment in dropped_at if moment < finished_at)
    print(
        f"{len(dropped_at)} reconnects, {during} while the job ran ({ran_s:.1f} s); "
        f"{len(transcript.events)} events, {len(transcript.of_type('token'))} token events"
    )
    assert during >= RECONNECTS
    assert_whole(transcript, story)
    assert [e.data["attempt"] for e in transcript.of_type("attempt")] == [1]


async def test_a_replica_killed_mid_stream_resumes_on_the_other(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """Clients on either API replica see the whole stream; after kill -9 of a client's
    replica it resumes on the other with Last-Event-ID, with no gap and no duplicate."""
    pieces = 600
    story = long_story(openai_server, pieces, per_second=200)
    doomed, survivor = start_replicas(start_forgeline)
    start_forgeline("worker", wait=False)
    job_id = submit(doomed.url, story_input(pieces))

    async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:

        async def watch(process: ForgelineProcess) -> Transcript:
            watched = Transcript(connections=1)
            async for event in aread_events(client, events_url(process.url, job_id)):
                watched.add(event)
            return watched

        async def read_until_the_replica_dies() -> None:
            async for event in aread_events(client, events_url(doomed.url, job_id)):
                moved.add(event)
                if len(moved.of_type("token")) == 5:
                    doomed.kill()

        watcher = asyncio.create_task(watch(survivor))
        moved = Transcript(connections=1)
        with pytest.raises(httpx.TransportError):
            await read_until_the_replica_dies()
        assert moved.final is None, "the job ended before its replica was killed"
        killed_after = moved.last_seq

        moved.connections += 1
        async for event in aread_events(
            client, events_url(survivor.url, job_id), last_event_id=moved.last_seq
        ):
            moved.add(event)
        watched = await asyncio.wait_for(watcher, timeout=30)

    print(f"replica killed after event {killed_after} of {moved.last_seq}")
    assert_whole(moved, story)
    assert_whole(watched, story)
    assert moved.events == watched.events


def test_a_worker_killed_mid_stream_restarts_the_story_with_an_attempt_event(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """kill -9 of the worker mid-stream: a second worker retries, the stream announces
    attempt 2, and the text after it is the model server's whole story."""
    pieces = 300
    story = long_story(openai_server, pieces, per_second=200)
    api = start_forgeline("api")
    first = start_forgeline("worker", wait=False, **QUICK_TIMINGS)
    job_id = submit(api.url, story_input(pieces))
    transcript = Transcript(connections=1)
    killed_at = 0.0

    with httpx.Client(headers=AUTH, timeout=30) as client:
        for event in read_events(client, events_url(api.url, job_id)):
            transcript.add(event)
            if len(transcript.of_type("token")) == 5 and not killed_at:
                first.kill()
                killed_at = time.monotonic()
                openai_server.piece_delay_s = 0.001  # the retried attempt need not be slow
                start_forgeline("worker", wait=False, **QUICK_TIMINGS)
    print(f"retried attempt finished {time.monotonic() - killed_at:.1f} s after the kill")

    attempts = [event.data["attempt"] for event in transcript.of_type("attempt")]
    assert attempts == [1, 2]
    first_attempt = transcript.all_text().removesuffix(transcript.text())
    assert story.startswith(first_attempt)
    assert 0 < len(first_attempt) < len(story)
    assert_whole(transcript, story)
    assert openai_server.replies[-1] == story


# -- WebSocket ----------------------------------------------------------------------


def test_websocket_streams_and_resumes_like_sse(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """Over /ws the job's events arrive whole and in order, and resume after ?after=N
    and after a first message {"after": N}, with no gap and no duplicate."""
    pieces = 300
    story = long_story(openai_server, pieces, per_second=200)
    serve = start_forgeline("serve")
    job_id = submit(serve.url, story_input(pieces))
    rng = random.Random(7)
    transcript = Transcript()

    while transcript.final is None:
        assert transcript.connections < 200, "the stream never reached its end"
        transcript.connections += 1
        # Alternate how the position is given: query parameter, or first message.
        by_query = transcript.connections % 2 == 0
        url = ws_url(serve, job_id, transcript.last_seq if by_query else None)
        with ws_connect(url) as connection:
            if not by_query:
                connection.send(json.dumps({"after": transcript.last_seq}))
            for count, event in enumerate(ws_events(connection), start=1):
                transcript.add(event)
                if count >= rng.randint(1, 4):
                    break

    assert transcript.connections > 4
    assert_whole(transcript, story)
    with httpx.Client(headers=AUTH, timeout=10) as client:
        assert read_to_end(client, serve.url, job_id).events == transcript.events


def test_websocket_refuses_unknown_jobs_and_bad_positions(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """/ws refuses an unknown or malformed job id, and closes with 4400 on a bad first message."""
    serve = start_forgeline("serve")
    for unknown in (str(uuid.uuid4()), "not-a-job"):
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(ws_url(serve, unknown, 0)).close()
        assert refused.value.response.status_code == 403

    job_id = submit(serve.url, story_input(5))
    with ws_connect(ws_url(serve, job_id)) as connection:
        connection.send(json.dumps({"after": -1}))
        with pytest.raises(ConnectionClosed):
            connection.recv(timeout=10)
    assert connection.close_code == 4400
    with ws_connect(ws_url(serve, job_id)) as connection:
        connection.send("hello")
        with pytest.raises(ConnectionClosed):
            connection.recv(timeout=10)
    assert connection.close_code == 4400


def test_websocket_client_leaving_cancels_a_cancel_on_disconnect_job(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """With cancel_on_disconnect, the job ends cancelled when its only WebSocket client leaves."""
    pieces = 400
    long_story(openai_server, pieces, per_second=80)  # 5 s: longer than the reconnect grace
    serve = start_forgeline("serve")
    job_id = submit(serve.url, story_input(pieces), cancel_on_disconnect=True)
    transcript = Transcript(connections=1)

    with ws_connect(ws_url(serve, job_id, 0)) as connection:
        for event in ws_events(connection):
            transcript.add(event)
            if len(transcript.of_type("token")) == 3:
                break  # the client goes away mid-generation
    assert transcript.final is None

    assert wait_final(serve.url, job_id, timeout_s=10)["status"] == "cancelled"


# -- cancellation -------------------------------------------------------------------


def test_cancel_stops_a_streaming_job_within_a_second_and_keeps_its_tokens(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """POST /cancel ends a streaming story within 1 s with a final ``cancelled`` event;
    the tokens already streamed stay in the job's log."""
    pieces = 2000
    story = long_story(openai_server, pieces, per_second=100)
    serve = start_forgeline("serve")
    job_id = submit(serve.url, story_input(pieces))
    transcript = Transcript(connections=1)
    asked_at = ended_at = 0.0

    with httpx.Client(headers=AUTH, timeout=10) as client:
        for event in read_events(client, events_url(serve.url, job_id)):
            transcript.add(event)
            if len(transcript.of_type("token")) == 5 and not asked_at:
                asked_at = time.monotonic()
                response = client.post(f"{serve.url}/api/v1/jobs/{job_id}/cancel")
                assert response.status_code == 202, response.text
        ended_at = time.monotonic()
        wait_until(
            lambda: openai_server.active_streams == 0, 5, what="the model request was closed"
        )
        stopped_at = time.monotonic()
        replay = read_to_end(client, serve.url, job_id)

    latency_s = ended_at - asked_at
    print(
        f"cancel: final event {latency_s * 1000:.0f} ms after POST /cancel, "
        f"model stream closed by {(stopped_at - asked_at) * 1000:.0f} ms"
    )
    final = transcript.final
    assert final is not None
    assert final.data["status"] == "cancelled"
    assert latency_s < CANCEL_BUDGET_S
    assert stopped_at - asked_at < CANCEL_BUDGET_S
    assert get_job(serve.url, job_id)["status"] == "cancelled"
    kept = replay.all_text()
    assert story.startswith(kept)
    assert 0 < len(kept) < len(story)
    assert replay.events == transcript.events


@pytest.mark.parametrize("cancel_on_disconnect", [True, False])
def test_cancel_on_disconnect_decides_what_a_client_leaving_does(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer, cancel_on_disconnect: bool
) -> None:
    """With cancel_on_disconnect the job ends cancelled when its only SSE client leaves;
    without it the job runs to completion."""
    pieces = 400
    story = long_story(openai_server, pieces, per_second=80)  # longer than the reconnect grace
    serve = start_forgeline("serve")
    job_id = submit(serve.url, story_input(pieces), cancel_on_disconnect=cancel_on_disconnect)
    transcript = Transcript(connections=1)

    with httpx.Client(headers=AUTH, timeout=10) as client:
        for event in read_events(client, events_url(serve.url, job_id)):
            transcript.add(event)
            if len(transcript.of_type("token")) == 3:
                break  # the client goes away mid-generation
    assert transcript.final is None

    job = wait_final(serve.url, job_id, timeout_s=10)
    if cancel_on_disconnect:
        assert job["status"] == "cancelled", job
        assert job["result"] is None
    else:
        assert job["status"] == "succeeded", job
        assert job["result"]["text"] == story


def test_cancel_on_disconnect_counts_clients_on_every_replica(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """A client leaving replica A does not cancel the job while another follows it on B;
    when that one leaves too, the job is cancelled."""
    pieces = 1000
    long_story(openai_server, pieces, per_second=100)
    first, second = start_replicas(start_forgeline)
    start_forgeline("worker")
    job_id = submit(first.url, story_input(pieces), cancel_on_disconnect=True)

    # Reads wait past a heartbeat: the worker may still be starting on a busy machine.
    with httpx.Client(headers=AUTH, timeout=httpx.Timeout(10, read=30)) as client:
        staying = read_events(client, events_url(second.url, job_id))
        next(staying)  # B's stream is open
        leaving = Transcript(connections=1)
        for event in read_events(client, events_url(first.url, job_id)):
            leaving.add(event)
            if len(leaving.of_type("token")) == 3:
                break  # A's client goes away mid-generation
        time.sleep(2.5)  # past the reconnect grace
        job = httpx.get(f"{first.url}/api/v1/jobs/{job_id}", headers=AUTH, timeout=5).json()
        assert job["status"] == "running", job
        staying.close()  # B's client goes away too

    assert wait_final(first.url, job_id, timeout_s=15)["status"] == "cancelled"


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_leaving_the_stream_of_a_queued_job_cancels_it(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer, transport: str
) -> None:
    """A cancel_on_disconnect job still queued (its stream silent) is cancelled when its
    only client leaves."""
    api = start_forgeline("api")  # no worker: the job stays queued
    job_id = submit(api.url, story_input(5), cancel_on_disconnect=True)

    if transport == "sse":
        with (
            httpx.Client(headers=AUTH, timeout=10) as client,
            contextlib.closing(read_events(client, events_url(api.url, job_id))) as events,
        ):
            first = next(events)
    else:
        with ws_connect(ws_url(api, job_id, 0)) as connection:
            first = next(ws_events(connection))
    assert first.data == {"status": "queued"}

    assert wait_final(api.url, job_id, timeout_s=5)["status"] == "cancelled"


# -- RELIABILITY 9: SIGTERM with live streams -----------------------------------------

STREAMS = 52
STREAM_JOBS = 4


@dataclass
class Follower:
    """One SSE client of the draining test: where its first stream ended, and why."""

    job_id: str
    transcript: Transcript = field(default_factory=Transcript)
    ended_by: str = ""
    farewell: dict[str, Any] = field(default_factory=dict)
    #: The last sequence number received when the farewell came.
    farewell_after: int = 0


async def follow_until_the_end_or_a_farewell(
    client: httpx.AsyncClient, base_url: str, follower: Follower
) -> None:
    """Read one stream until its final event or its ``reconnect`` event (or a failure)."""
    follower.transcript.connections += 1
    try:
        async for event in aread_events(client, events_url(base_url, follower.job_id)):
            if event.type == "reconnect":
                follower.ended_by, follower.farewell = "reconnect", event.data
                follower.farewell_after = follower.transcript.last_seq
                continue
            follower.transcript.add(event)
    except httpx.TransportError as exc:
        follower.ended_by = f"broken: {exc!r}"
        return
    if not follower.ended_by:
        follower.ended_by = "final" if follower.transcript.final else "ended early"


async def readiness(client: httpx.AsyncClient, base_url: str) -> str:
    """What ``/readyz`` says: its status code, or ``refused``.

    A stopping server may also drop a kept-alive connection unanswered; that
    is a refusal too.
    """
    try:
        response = await client.get(f"{base_url}/readyz", timeout=2)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return "refused"
    return str(response.status_code)


@pytest.mark.slow
async def test_sigterm_with_fifty_live_streams_drains_and_clients_resume_elsewhere(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """SIGTERM to an API with 52 live streams: not ready at once, no new streams, every
    stream ends whole or with ``reconnect``, each resumes on another replica with no gap
    or duplicate, and the process exits within 10 s."""
    pieces = 1200
    story = long_story(openai_server, pieces, per_second=100)
    leaving, staying = start_replicas(start_forgeline)
    start_forgeline("worker", wait=False)
    job_ids = [submit(leaving.url, story_input(pieces)) for _ in range(STREAM_JOBS)]
    followers = [Follower(job_ids[i % STREAM_JOBS]) for i in range(STREAMS)]
    limits = httpx.Limits(max_connections=STREAMS * 3, max_keepalive_connections=STREAMS * 3)

    async with httpx.AsyncClient(headers=AUTH, timeout=30, limits=limits) as client:
        readers = [
            asyncio.create_task(follow_until_the_end_or_a_farewell(client, leaving.url, f))
            for f in followers
        ]
        await async_wait_until(
            lambda: all(f.transcript.of_type("token") for f in followers),
            30,
            what="every stream is receiving tokens",
        )

        signalled_at = time.monotonic()
        leaving.signal(signal.SIGTERM)
        ready = await readiness(client, leaving.url)  # at once, no retry
        not_ready_s = time.monotonic() - signalled_at
        late = Follower(job_ids[0])
        await follow_until_the_end_or_a_farewell(client, leaving.url, late)
        await asyncio.wait_for(asyncio.gather(*readers), timeout=GRACE_BUDGET_S)
        await async_wait_until(
            lambda: leaving.process.poll() is not None,
            GRACE_BUDGET_S + 5,
            what="the API process exited",
        )
        exit_s = time.monotonic() - signalled_at

        for follower in followers:
            follower.transcript.connections += 1
            async for event in aread_events(
                client,
                events_url(staying.url, follower.job_id),
                last_event_id=follower.transcript.last_seq,
            ):
                follower.transcript.add(event)

    endings = {f.ended_by for f in followers}
    print(
        f"SIGTERM with {STREAMS} streams: /readyz {ready} after {not_ready_s * 1000:.0f} ms, "
        f"exit after {exit_s:.2f} s (status {leaving.process.returncode}); "
        f"first streams ended by {sorted(endings)}; late client: {late.ended_by}"
    )
    assert ready in {"503", "refused"}
    assert exit_s < GRACE_BUDGET_S
    assert leaving.process.returncode == 0, leaving.output()[-3000:]
    assert endings <= {"final", "reconnect"}, [f.ended_by for f in followers]
    assert "reconnect" in endings, "every job ended before the signal: nothing was drained"
    for follower in followers:
        if follower.ended_by == "reconnect":
            assert follower.farewell["after"] == follower.farewell_after
        assert_whole(follower.transcript, story)
    # A client arriving after the signal is refused, or only told to go elsewhere.
    assert late.ended_by.startswith("broken: ConnectError") or late.ended_by == "reconnect"


# -- RELIABILITY 10: an idle generation behind nginx ----------------------------------

#: How long the model server stays silent in the middle of the generation.
IDLE_S = 61
#: Deliberately shorter than the idle period: only heartbeats keep the connection.
PROXY_READ_TIMEOUT_S = 30

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
{user}
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream forgeline {{
        server 127.0.0.1:{upstream_port};
        keepalive 4;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://forgeline;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # Buffering stays on: the app's X-Accel-Buffering: no must turn it off.
            proxy_read_timeout {read_timeout}s;
            proxy_send_timeout {read_timeout}s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    """Debian's nginx, installed with apt-get when missing and running as root."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "nginx-light"]
    for command in (install, ["apt-get", "update"], install):
        result = subprocess.run(command, env=env, capture_output=True, timeout=600, check=False)
        if command is install and result.returncode == 0:
            break
    return shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/bin")


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Starts nginx proxying to a port; returns its base URL. Stopped at teardown."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed and cannot be (apt-get needs root)")
    started: list[subprocess.Popen[bytes]] = []

    def start(upstream_port: int) -> str:
        root = tmp_path / "nginx"
        root.mkdir()
        port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                root=root,
                port=port,
                upstream_port=upstream_port,
                read_timeout=PROXY_READ_TIMEOUT_S,
                user="user root;" if os.geteuid() == 0 else "",
            )
        )
        with (root / "stdout.log").open("ab") as log:
            process = subprocess.Popen(
                [binary, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError((root / "error.log").read_text(errors="replace"))
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 10, what="nginx answers", interval_s=0.05)
        return url

    yield start
    for process in started:
        process.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.slow
def test_a_generation_idle_for_a_minute_stays_connected_through_nginx(
    start_forgeline: ProcessFactory,
    openai_server: OpenAIServer,
    start_nginx: Callable[[int], str],
) -> None:
    """Behind nginx with a 30 s read timeout, a stream silent for 61 s is kept alive by
    heartbeat comments and delivers its final event on the same connection."""
    openai_server.pieces = ["Silence, then one word."]
    openai_server.piece_delay_s = IDLE_S
    serve = start_forgeline("serve")
    assert serve.port is not None
    proxy = start_nginx(serve.port)
    job_id = submit(proxy, story_input(1))
    parser = SseParser()
    arrivals: list[tuple[float, SseEvent]] = []
    heartbeats_before_token = 0

    connected_at = time.monotonic()
    with httpx.Client(
        headers=AUTH, timeout=httpx.Timeout(10, read=PROXY_READ_TIMEOUT_S + 15)
    ) as client:
        for event in read_events(client, events_url(proxy, job_id), parser=parser):
            arrivals.append((time.monotonic() - connected_at, event))
            if event.type == "token":
                heartbeats_before_token = len(parser.comments)

    kinds = [event.type for _, event in arrivals]
    started = next(t for t, event in arrivals if event.type == "attempt")
    first_token = next(t for t, event in arrivals if event.type == "token")
    print(
        f"through nginx: attempt at {started:.1f} s, token at {first_token:.1f} s, "
        f"{heartbeats_before_token} heartbeats while idle, final at {arrivals[-1][0]:.1f} s"
    )
    assert kinds[-1] == "final"
    assert arrivals[-1][1].data["status"] == "succeeded"
    assert started < 10, "events were held back by the proxy"
    assert first_token - started > IDLE_S - 1
    assert first_token - started > PROXY_READ_TIMEOUT_S * 2
    assert heartbeats_before_token >= IDLE_S // HEARTBEAT_S - 1
    assert all(comment.startswith("ping") for comment in parser.comments)
    assert [e.seq for _, e in arrivals] == list(range(1, len(arrivals) + 1))
